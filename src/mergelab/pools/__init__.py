"""Model pools: the abstract :class:`~mergelab.pools.base.ModelPool` (one interface, capability flags) and the
checkpoint pool merged by streaming (:mod:`mergelab.pools.checkpoint`); the in-memory pools live with their model
family (:mod:`mergelab.text.pool`, :mod:`mergelab.causal_lm.pool`, :mod:`mergelab.vision.pool`)."""
