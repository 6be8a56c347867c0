"""PART OF streaming: pools.checkpoint"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from mergelab.engine.chunks import DEFAULT_CHUNK_ELEMS
from mergelab.engine.streaming import VOCAB_POLICIES, plan_tensors, stream_merge
from mergelab.io.reader import LazyCheckpoint
from mergelab.methods.base import TaskVectorMethod


class CheckpointPool:
    """A pool of large checkpoints (hub ids or local safetensors dirs) merged by streaming, never loaded whole.

    Args:
        pretrained: the pretrained model.
        experts: expert name -> hub id or local dir (the names label the coefficients in reports).
        include / exclude: regexes over tensor names selecting what is merged (the rest stays pretrained);
            default: every floating-point tensor, embeddings and lm_head included (as MetaGPT
            re-implementations do).
        vocab: ``extend`` | ``base`` | ``error`` for experts with extra embedding rows (see :func:`stream_merge`).
        max_shard_bytes: output shard size.
        chunk_elems: elements per row block and task in memory.
    """

    def __init__(
        self,
        pretrained: str,
        experts: Mapping[str, str],
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        vocab: str = "extend",
        max_shard_bytes: int = 2**30,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    ) -> None:
        if not experts:
            raise ValueError("model.experts is empty: a checkpoint pool needs at least one expert")
        if vocab not in VOCAB_POLICIES:
            raise ValueError(f"model.vocab must be one of {VOCAB_POLICIES}, got {vocab!r}")
        self.pretrained, self.experts = str(pretrained), {k: str(v) for k, v in experts.items()}
        self.include, self.exclude, self.vocab = list(include), list(exclude), vocab
        self.max_shard_bytes, self.chunk_elems = int(max_shard_bytes), int(chunk_elems)

    def open_checkpoints(self) -> tuple[LazyCheckpoint, list[LazyCheckpoint], list[str]]:
        """The pretrained checkpoint, the experts (opened lazily; the caller closes them) and the merged tensors."""
        base = LazyCheckpoint(self.pretrained, name="pretrained")
        experts = [LazyCheckpoint(p, name=t) for t, p in self.experts.items()]
        try:
            merged, _ = plan_tensors(base, experts, self.include, self.exclude, self.vocab)
        except BaseException:
            for ck in (base, *experts):
                ck.close()
            raise
        return base, experts, merged

    def merge(self, method: TaskVectorMethod, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Stream-merge the pool with ``method`` into ``out_dir``."""
        return stream_merge(
            method,
            self.pretrained,
            list(self.experts.values()),
            out_dir,
            include=self.include,
            exclude=self.exclude,
            vocab=self.vocab,
            max_shard_bytes=self.max_shard_bytes,
            chunk_elems=self.chunk_elems,
            overwrite=overwrite,
            task_names=list(self.experts),
        )
