"""CLIP vision merging: zero-shot image suites read through ``datasets`` (:mod:`.suite`), the pool of a pretrained
CLIP model and one fine-tuned vision tower per task, only the vision tower merged (:mod:`.pool`), and the frozen
zero-shot heads and Lightning module that score a tower (:mod:`.model`)."""
