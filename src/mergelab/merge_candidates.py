"""A method row's candidate merges: one per grid point, scored on the tune split until one is kept.

A pool that scores in memory (``scorable``) merges each candidate inside the scoring trainer
(:class:`InMemoryMerge`); any other pool writes it to a dir under the run dir and its suite scores it from there
(:class:`OnDiskMerge`). Both answer the same calls, so tuning and the run flow never ask which one they hold.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from mergelab.io.atomic import build_into_place, move_dir_into_place
from mergelab.methods.base import MergeMethod
from mergelab.pools.base import ModelPool
from mergelab.suites import scoring as ev

#: Where a pool that is not scorable in memory writes its candidate merges (under the run dir) until one is kept.
CANDIDATES_DIR = ".candidates"


def point_label(name: str, params: Mapping[str, Any]) -> str:
    """A candidate as the console names it: its row and grid point, e.g. ``ties {k: 20, scaling: 0.4}``."""
    return f"{name} {{{', '.join(f'{k}: {v}' for k, v in params.items())}}}" if params else name


class InMemoryMerge:
    """A candidate merge of a ``scorable`` pool: merged into the scoring module's backbone when first scored.

    ``label`` names it on the console when it is scored (see :func:`point_label`)."""

    def __init__(
        self, pool: ModelPool, method: MergeMethod, trainer_kwargs: Mapping[str, Any], label: str = "merged"
    ) -> None:
        self.pool, self.trainer_kwargs, self.label = pool, trainer_kwargs, label
        from mergelab.callbacks import MergeCallback  # Lightning: only pools that score in memory need it

        # The merge itself happens inside the evaluation trainer, as a callback, when testing starts.
        self.callback, self.model = MergeCallback(method, pool), pool.model()
        self.raw: dict[str, Any] | None = None  # the suite's own output of the last scoring (lm-eval's results)

    @property
    def method(self) -> MergeMethod:
        return self.callback.method

    def score(self, split: str, tasks: list[str] | None = None, kwargs: Mapping[str, Any] | None = None) -> ev.Scores:
        """Scores on ``split`` (under the run's trainer arguments, or ``kwargs``: tuning's precision)."""
        with ev.scoring(self.label, split):
            scores = self.pool.evaluate(
                self.model, split, kwargs or self.trainer_kwargs, tasks, callbacks=[self.callback]
            )
        self.raw = getattr(getattr(self.pool, "suite", None), "last_results", None)
        return scores

    def realize(self) -> None:
        """Compute the merge (scoring does it too)."""
        self.callback.merged_state()

    def write(self, out_dir: Path, overwrite: bool, finish: Callable[[Path], Any] | None = None) -> Path:
        """Save the merged model to ``out_dir``, ``finish(dir)`` adding files to it before it is moved into place."""
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        return build_into_place(lambda d: self.pool.save_merged(self.callback.merged_state(), d), out_dir, finish)

    def discard(self) -> None:
        return None


class OnDiskMerge:
    """A candidate merge of a pool not scorable in memory: written to ``work_dir`` (under the run dir) when first
    needed, and scored from there by the suite's ``evaluate_checkpoint`` (on the suite's own split); ``label`` names
    it on the console when it is scored."""

    def __init__(
        self,
        pool: ModelPool,
        method: MergeMethod,
        suite: Any,
        trainer_kwargs: Mapping[str, Any],
        work_dir: Path,
        label: str = "merged",
    ) -> None:
        self.pool, self.method, self.suite, self.trainer_kwargs = pool, method, suite, trainer_kwargs
        self.work_dir, self.path, self.label = work_dir, None, label

    def realize(self) -> Path:
        if self.path is None:
            self.path = self.pool.write_merged(self.method, self.work_dir, overwrite=True)
        return self.path

    def score(self, split: str, tasks: list[str] | None = None, kwargs: Mapping[str, Any] | None = None) -> ev.Scores:
        """Scores of the written merge (under the run's trainer arguments, or ``kwargs``)."""
        path = self.realize()
        with ev.scoring(self.label, split):
            scores = self.suite.evaluate_checkpoint(path, kwargs or self.trainer_kwargs, self.pool.trust_remote_code)
        self.raw = getattr(self.suite, "last_results", None)
        return {t: s for t, s in scores.items() if tasks is None or t in tasks}

    def write(self, out_dir: Path, overwrite: bool, finish: Callable[[Path], Any] | None = None) -> Path:
        """Move the merged dir to ``out_dir``, ``finish(dir)`` adding files to it first (it is still a work dir)."""
        src = self.realize()
        if finish is not None:
            finish(src)
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        move_dir_into_place(src, out_dir)
        self.path = None
        return out_dir

    def discard(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.path = None


#: A candidate merge of either kind.
Candidate = InMemoryMerge | OnDiskMerge


def candidate_merge(
    pool: ModelPool,
    method: MergeMethod,
    suite: Any,
    trainer_kwargs: Mapping[str, Any],
    run_dir: Path,
    name: str,
    i: int,
    params: Mapping[str, Any],
) -> Candidate:
    """The ``i``-th candidate of row ``name`` (grid point ``params``), of the kind the pool scores."""
    label = point_label(name, params)
    if pool.scorable:
        return InMemoryMerge(pool, method, trainer_kwargs, label)
    return OnDiskMerge(pool, method, suite, trainer_kwargs, run_dir / CANDIDATES_DIR / f"{name}-{i}", label)
