"""Training and multi-process plumbing: fine-tuning experts on demand behind a content-keyed build cache
(:mod:`.experts`), and running the Lightning flows on several processes with the results of one process
(:mod:`.distributed`)."""
