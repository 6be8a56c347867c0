"""What a merged dir says about itself: the recipe (``mergelab_recipe.json``), the model card (``README.md``) and,
where MergeKit defines the same merge, ``mergekit_config.yml``; and MergeKit configs read back into mergelab runs.

- :mod:`mergelab.provenance.identity`: content hashes of checkpoints and the package versions (no torch);
- :mod:`mergelab.provenance.mergekit`: mergelab merge -> MergeKit YAML, and MergeKit YAML -> mergelab overrides;
- :mod:`mergelab.provenance.card`: the Hugging Face model card;
- :mod:`mergelab.provenance.recipe`: :class:`~mergelab.provenance.recipe.MergeRecord` and the files a run writes.
"""
