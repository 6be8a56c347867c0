"""Scoring under Lightning, for every suite family: :func:`run_test` runs ``trainer.test`` over one loader per task
(sharded across ranks under a multi-process strategy) and returns the per-task scores; :func:`average` and
:func:`normalized` turn them into the unweighted mean and the per-task merged / expert ratios that reports show.

What is scored is named on the console: each test bar (or, where bars are off, one log line) says which model, split
and task it scores, from :func:`run_test`'s ``description`` or the :func:`scoring` block it runs in."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, TextIO

from mergelab.pools.base import Scores
from mergelab.training.distributed import is_global_zero, run_trainer, shard_eval_loader, trainer_arguments

if TYPE_CHECKING:
    import lightning as L
    from lightning.pytorch.callbacks import ProgressBar

log = logging.getLogger(__name__)

#: What the scoring in progress scores (``<model> · <split>``), set by :func:`scoring`: the run names what it scores
#: there, whichever pool API (``evaluate``, a suite's ``evaluate_checkpoint``) reaches :func:`run_test`.
_DESCRIPTION: ContextVar[str | None] = ContextVar("scoring_description", default=None)


@contextmanager
def scoring(what: str, split: str) -> Iterator[str]:
    """Inside the block, :func:`run_test` names its bar (or log line) ``<what> · <split>`` (e.g.
    ``ties {k: 20} · validation``); yields that description."""
    description = f"{what} · {split}"
    token = _DESCRIPTION.set(description)
    try:
        yield description
    finally:
        _DESCRIPTION.reset(token)


def live_console(stream: TextIO) -> bool:
    """Whether progress bars drawn on ``stream`` are redrawn in place: a terminal or a notebook. In a file, a pipe or
    a CI log every redraw would stay, one after the other."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def described_progress_bar(description: str, tasks: Sequence[str]) -> ProgressBar:
    """Lightning's default progress bar (rich when installed, else tqdm) whose test bar reads
    ``<description> · <task>`` (``tasks``: the task of each dataloader, in order; empty: the description alone)."""
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
    from lightning.pytorch.callbacks.progress.rich_progress import _RICH_AVAILABLE  # Lightning's own test (2.4-2.6)

    base: type[ProgressBar] = RichProgressBar if _RICH_AVAILABLE else TQDMProgressBar
    escape = str  # tqdm shows a description as it is
    if _RICH_AVAILABLE:
        from rich.markup import escape  # rich reads "[...]" as markup: a grid point's list value must stay text

    class DescribedProgressBar(base):  # type: ignore[valid-type,misc]
        task: str | None = None

        def on_test_batch_start(
            self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
        ) -> None:
            # Set before the base class reads test_description, which it does when a new dataloader starts.
            self.task = tasks[dataloader_idx] if dataloader_idx < len(tasks) else None
            super().on_test_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)

        @property
        def test_description(self) -> str:
            return escape(description if self.task is None else f"{description} · {self.task}")

    return DescribedProgressBar()


def run_test(
    model: L.LightningModule,
    loaders: Sequence[Any],
    trainer_kwargs: Mapping[str, Any],
    callbacks: Sequence[L.Callback] = (),
    description: str | None = None,
) -> Scores:
    """``trainer.test`` over one dataloader per task (in ``model.eval_tasks`` order); returns ``model.scores``.

    ``description`` (default: the enclosing :func:`scoring` block's) names what is scored: on the test bar, with the
    task of each dataloader. Bars are drawn only when ``trainer_kwargs`` enables them and stdout is a terminal (or
    a notebook); otherwise, as in a log file or CI, there is no bar and the description is logged once.

    Under a multi-process strategy each rank scores its share of the batches (:func:`shard_eval_loader`, no
    example repeated) and the modules' torchmetrics sum their states across ranks when computed, so every rank
    returns the scores one process would.
    """
    description = description or _DESCRIPTION.get()
    arguments = trainer_arguments(trainer_kwargs)
    bars = bool(arguments.get("enable_progress_bar", True)) and live_console(sys.stdout)
    hooks = list(callbacks)
    if bars and description:
        tasks = list(getattr(model, "eval_tasks", None) or [])
        hooks.append(described_progress_bar(description, tasks if len(tasks) == len(loaders) else []))
    elif description and is_global_zero():  # no bar: one line per scoring, from one rank
        log.info("scoring %s", description)
    kwargs = {
        **arguments,
        "logger": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "callbacks": hooks,
        "enable_progress_bar": bars,
        "use_distributed_sampler": False,
    }
    run_trainer(kwargs, "test", model, dataloaders=[shard_eval_loader(d) for d in loaders], verbose=False)
    return dict(model.scores)


#: Version of what mergelab's scores mean (the scoring loops and metric definitions), in every cached score's key:
#: bump it when a score's definition changes, so no cache serves numbers computed the old way.
SCORER_VERSION = 2


def average(scores: Scores, key: str = "acc") -> float:
    """Unweighted mean of one metric over tasks."""
    return sum(s[key] for s in scores.values()) / len(scores)


def normalized(scores: Scores, reference: Scores, key: str = "acc") -> dict[str, float]:
    """Per task merged / expert score (the normalized accuracy of the merging literature)."""
    return {t: scores[t][key] / reference[t][key] if reference[t][key] > 0 else float("nan") for t in scores}
