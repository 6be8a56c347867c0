"""Text classification: the suites of ``data/embedded``-style dirs (:mod:`.suite`), the pool of a pretrained sequence
classifier and one expert per task whose backbones are merged (:mod:`.pool`), and scoring the merged backbone
with each task's own head (:mod:`.model`)."""
