"""Scoring under Lightning, for every suite family: :func:`run_test` runs ``trainer.test`` over one loader per task
(sharded across ranks under a multi-process strategy) and returns the per-task scores; :func:`average` and
:func:`normalized` turn them into the unweighted mean and the per-task merged / expert ratios that reports show."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from mergelab.pools.base import Scores
from mergelab.training.distributed import shard_eval_loader, trainer_arguments

if TYPE_CHECKING:
    import lightning as L


def run_test(
    model: L.LightningModule,
    loaders: Sequence[Any],
    trainer_kwargs: Mapping[str, Any],
    callbacks: Sequence[L.Callback] = (),
) -> Scores:
    """``trainer.test`` over one dataloader per task (in ``model.eval_tasks`` order); returns ``model.scores``.

    Under a multi-process strategy each rank scores its share of the batches (:func:`shard_eval_loader`, no
    example repeated) and the modules' torchmetrics sum their states across ranks when computed, so every rank
    returns the scores one process would.
    """
    import lightning as L  # when something is scored: a merge-only run never needs it

    trainer = L.Trainer(
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
        **{**trainer_arguments(trainer_kwargs), "use_distributed_sampler": False},
    )
    trainer.test(model, dataloaders=[shard_eval_loader(d) for d in loaders], verbose=False)
    return dict(model.scores)


def average(scores: Scores, key: str = "acc") -> float:
    """Unweighted mean of one metric over tasks."""
    return sum(s[key] for s in scores.values()) / len(scores)


def normalized(scores: Scores, reference: Scores, key: str = "acc") -> dict[str, float]:
    """Per task merged / expert score (the normalized accuracy of the merging literature)."""
    return {t: scores[t][key] / reference[t][key] if reference[t][key] > 0 else float("nan") for t in scores}
