"""Evaluation suites in general: the options, ``tasks.yaml`` reader and data helpers every suite family shares
(:mod:`.base`), and scoring a model on a suite under Lightning with the averages reported (:mod:`.scoring`); the
families themselves live in :mod:`mergelab.text`, :mod:`mergelab.causal_lm` and :mod:`mergelab.vision`."""
