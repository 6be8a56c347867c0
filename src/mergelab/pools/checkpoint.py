"""A pool of checkpoints larger than memory: merged by streaming tensor by tensor, never loaded whole."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergelab.engine.chunks import DEFAULT_CHUNK_ELEMS
from mergelab.engine.streaming import VOCAB_POLICIES, plan_tensors, stream_merge
from mergelab.io.reader import LazyCheckpoint
from mergelab.methods.base import TaskVectorMethod
from mergelab.pools.base import ModelPool, PoolSources


class CheckpointPool(ModelPool):
    """A pool of large checkpoints (hub ids or local safetensors dirs) merged by streaming, never loaded whole.

    Capabilities: not ``in_memory`` (weights are read from the files row block by row block), not ``scorable``
    (a merge is written to disk by :meth:`write_merged` and scored from there by a suite that evaluates
    checkpoints, e.g. lm-eval's), no ``needs_suite`` (``eval=none`` merges only), no ``multi_process`` (the merge is
    disk-bound and runs in one process; AWD fits one tensor at a time). Only task-vector methods merge it.

    Args:
        pretrained: the pretrained model.
        experts: expert name -> hub id or local dir (the names label the coefficients in reports).
        include / exclude: regexes over tensor names selecting what is merged (the rest stays pretrained);
            default: every floating-point tensor, embeddings and lm_head included (as MetaGPT
            re-implementations do).
        vocab: ``extend`` | ``base`` | ``error`` for experts with extra embedding rows (see :func:`stream_merge`).
        max_shard_bytes: output shard size.
        chunk_elems: elements per row block and task in memory.
        trust_remote_code: passed to transformers when a suite loads the merged checkpoint to score it.
    """

    kind = "checkpoint pool"
    in_memory = False
    scorable = False
    needs_suite = False
    multi_process = False

    def __init__(
        self,
        pretrained: str,
        experts: Mapping[str, str],
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        vocab: str = "extend",
        max_shard_bytes: int = 2**30,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        trust_remote_code: bool = False,
    ) -> None:
        if not experts:
            raise ValueError("model.experts is empty: a checkpoint pool needs at least one expert")
        if vocab not in VOCAB_POLICIES:
            raise ValueError(f"model.vocab must be one of {VOCAB_POLICIES}, got {vocab!r}")
        super().__init__({k: str(v) for k, v in experts.items()}, exclude, trust_remote_code=trust_remote_code)
        try:
            self.include = [re.compile(p) for p in include]
        except re.error as e:
            raise ValueError(f"model.include: invalid regex: {e}") from e
        self.pretrained, self.experts = str(pretrained), {k: str(v) for k, v in experts.items()}
        self.vocab = vocab
        self.max_shard_bytes, self.chunk_elems = int(max_shard_bytes), int(chunk_elems)
        # Known from the config alone: methods may read them before setup (AWD's fit names its tensors by task).
        self.tasks = list(self.experts)
        self.resolved = dict(self.experts)
        self.expert_of = {t: t for t in self.tasks}
        self.suite: Any = None

    def setup(self, suite: Any, trainer_kwargs: Mapping[str, Any]) -> None:
        """Check the checkpoints fit together (headers only) and, with a suite, that it can score a checkpoint dir.

        ``suite=None``: merge only. With a suite, :attr:`expert_of` matches each suite task with the expert the
        suite names for it (``eval.experts``, default: the expert of its own name) where the pool has that expert,
        for the record only: the experts are not scored here.
        """
        if suite is not None:
            if not callable(getattr(suite, "evaluate_checkpoint", None)):
                raise ValueError(
                    f"{self.describe()} is merged to disk, then scored from there by a suite that evaluates "
                    f"checkpoints (eval=lm_harness); eval '{suite.name}' cannot: set eval=none or eval=lm_harness"
                )
            matched = dict(getattr(suite, "experts", None) or {})
            self.expert_of = {t: matched.get(t, t) for t in suite.task_names if matched.get(t, t) in self.experts}
        self.suite = suite
        with self.tensor_sources():  # unreadable or mismatched checkpoints fail before any work
            pass

    def check_method(self, method: Any, where: str) -> None:
        """Only task-vector methods stream (their merge is computed row block by row block)."""
        if not isinstance(method, TaskVectorMethod):
            raise ValueError(f"{where} cannot stream: it is not a task-vector method ({self.describe()})")

    @contextmanager
    def tensor_sources(self) -> Iterator[PoolSources]:
        """The checkpoints, opened lazily (row blocks are read on demand) and closed afterwards."""
        base, experts, merged = self.open_checkpoints()
        try:
            yield PoolSources(base, list(experts), merged, str(self.pretrained))
        finally:
            for ck in (base, *experts):
                ck.close()

    def open_checkpoints(self) -> tuple[LazyCheckpoint, list[LazyCheckpoint], list[str]]:
        """The pretrained checkpoint, the experts (opened lazily; the caller closes them) and the merged tensors."""
        base = LazyCheckpoint(self.pretrained, name="pretrained")
        experts = [LazyCheckpoint(p, name=t) for t, p in self.experts.items()]
        try:
            merged, _ = plan_tensors(base, experts, self.include_patterns, self.exclude_patterns, self.vocab)
        except BaseException:
            for ck in (base, *experts):
                ck.close()
            raise
        return base, experts, merged

    @property
    def include_patterns(self) -> list[str]:
        return [p.pattern for p in self.include]

    @property
    def exclude_patterns(self) -> list[str]:
        return [p.pattern for p in self.exclude]

    def write_merged(self, method: Any, out_dir: str | Path, overwrite: bool = False) -> Path:
        """Stream-merge the pool with ``method`` (a task-vector method) into ``out_dir``."""
        self.check_method(method, f"method {type(method).__name__}")
        return stream_merge(
            method,
            self.pretrained,
            list(self.experts.values()),
            out_dir,
            include=self.include_patterns,
            exclude=self.exclude_patterns,
            vocab=self.vocab,
            max_shard_bytes=self.max_shard_bytes,
            chunk_elems=self.chunk_elems,
            overwrite=overwrite,
            task_names=list(self.experts),
        )
