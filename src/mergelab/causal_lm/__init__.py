"""Causal language models: generative task suites scored by exact match or choice log-likelihood (:mod:`.suite`),
the pool of a pretrained LM and its fine-tuned experts, whole-model merged (:mod:`.pool`), the Lightning module that
scores them (:mod:`.model`), and scoring with EleutherAI's lm-evaluation-harness (:mod:`.lm_harness`)."""
