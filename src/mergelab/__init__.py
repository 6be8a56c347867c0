"""mergelab: merge fine-tuned experts of one pretrained model and score the result on every task."""

__version__ = "0.1.0"
