"""Running the Lightning flows on several processes (DDP, FSDP) with the same results as one process.

With Lightning's subprocess launcher every rank re-runs the whole entry point, so the rules are:

- files (results, caches of built experts and scores, merged models, loggers) are written by global rank 0
  only; the other ranks wait at a :func:`barrier` until rank 0 has written what they are about to read;
- evaluation shards whole batches across ranks (:class:`RankBatches`): each example is scored in exactly
  the batch it would be in with one process and none is repeated, and the torchmetrics states are summed
  across ranks when computed (every rank computes them, at the end of its test epoch), so the scores equal
  one process's;
- every rank takes the same decisions (a cache hit on one rank is a hit on all), since the collectives of a
  Trainer only complete when every rank runs it.

In one process every function here is a no-op or the identity."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch.distributed as dist
from hydra.utils import instantiate
from torch.utils.data import DataLoader, Dataset, Sampler


def initialized() -> bool:
    """Whether a process group is up (a multi-process Trainer ran in this process)."""
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) without a process group."""
    if initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_global_zero() -> bool:
    """Whether this process writes files: global rank 0, or the only process.

    Before the process group is up, the rank comes from the launcher's environment: ``RANK`` (torchrun),
    ``SLURM_PROCID`` (SLURM tasks), else ``LOCAL_RANK`` and ``NODE_RANK`` (Lightning's subprocess launcher).
    """
    if initialized():
        return dist.get_rank() == 0
    env = os.environ
    for key in ("RANK", "SLURM_PROCID"):
        if key in env:
            return int(env[key]) == 0
    return int(env.get("LOCAL_RANK", 0)) == 0 and int(env.get("NODE_RANK", 0)) == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for in one process)."""
    if initialized():
        dist.barrier()


#: Key set in a batch that only keeps a rank in step (see :class:`RankBatches`); modules skip such batches.
FILLER = "_mergelab_filler"


def is_filler(batch: Any) -> bool:
    """Whether ``batch`` is a filler batch, which an evaluation module must not score."""
    return isinstance(batch, Mapping) and bool(batch.get(FILLER, False))


class RankBatches(Sampler[list[tuple[int, bool]]]):
    """The batches of ``batches`` (a batch sampler) that belong to this rank: batch i goes to rank i % world.

    Rank and world size are read when iterating, i.e. inside the Trainer, once its processes exist. No batch is
    repeated or padded (unlike ``DistributedSampler``). A rank left without a batch (fewer batches than ranks)
    gets the first batch as a filler, so that it runs the test loop and its hooks (where the metrics are
    synced) like the others; the filler is marked (:data:`FILLER`) and not scored. Indices are yielded as
    ``(index, is_filler)``, read by :func:`shard_eval_loader`'s dataset and collate wrappers. With one process
    every batch is yielded, in order, and none is a filler.
    """

    def __init__(self, batches: Iterable[list[int]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        rank, size = world()
        batches = list(self.batches)
        mine = batches[rank::size]
        if not mine:
            yield [(i, True) for i in batches[0]]
        for batch in mine:
            yield [(i, False) for i in batch]

    def __len__(self) -> int:
        rank, size = world()
        return max(1, len(range(rank, len(self.batches), size)))  # type: ignore[arg-type]


class _Flagged(Dataset):
    """A map-style dataset indexed by ``(index, is_filler)`` pairs."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, bool]) -> tuple[Any, bool]:
        return self.dataset[key[0]], key[1]


def shard_eval_loader(loader: DataLoader) -> DataLoader:
    """The same evaluation loader (a map-style dataset, dict batches), its batches split across ranks.

    See :class:`RankBatches`: each example is scored once, in the batch it is in with one process.
    """
    if loader.batch_sampler is None:
        raise ValueError("evaluation loaders must batch (batch_size or batch_sampler set)")
    collate = loader.collate_fn

    def collate_flagged(items: list[tuple[Any, bool]]) -> Any:
        batch = collate([x for x, _ in items])
        if items[0][1]:
            batch[FILLER] = True
        return batch

    return DataLoader(
        _Flagged(loader.dataset),
        batch_sampler=RankBatches(loader.batch_sampler),
        collate_fn=collate_flagged,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
    )


def multi_process(trainer_cfg: Mapping[str, Any]) -> bool:
    """Whether ``cfg.trainer`` asks for more than one process (several devices or nodes)."""
    devices, nodes = trainer_cfg.get("devices", 1), int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, str):
        devices = devices.strip()
        if devices in ("auto", "-1"):
            devices = -1
        elif "," in devices:  # device ids, as in "0,1"
            devices = len([d for d in devices.split(",") if d.strip()])
        else:  # a count, as in "2"
            devices = int(devices)
    elif isinstance(devices, Sequence):
        devices = len(devices)
    return nodes > 1 or devices == -1 or int(devices) > 1


def check_launch(trainer_cfg: Mapping[str, Any], multirun: bool) -> None:
    """Refuse a multi-process trainer in a local ``-m`` sweep.

    Lightning's subprocess launcher starts the other ranks by re-running the command line, which in a sweep
    would re-run the whole sweep in each of them. Under SLURM (or torchrun) the ranks exist already and each
    runs its job, so that is fine.
    """
    external = any(k in os.environ for k in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))
    if multirun and not external and multi_process(trainer_cfg):
        raise ValueError(
            f"trainer: devices={trainer_cfg.get('devices')} num_nodes={trainer_cfg.get('num_nodes', 1)} in a local "
            "-m sweep: Lightning would start each rank by re-running the whole sweep. Run the jobs one at a time, "
            "or submit the sweep with hydra/launcher=submitit_slurm (tasks_per_node = trainer.devices)"
        )


def trainer_arguments(trainer_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg.trainer`` as Trainer arguments: values with a ``_target_`` (a strategy, a plugin) are instantiated.

    Called once per Trainer, so every Trainer gets its own strategy object (they hold per-run state); other
    values are passed as they are.
    """
    return {
        k: instantiate(v, _convert_="all") if isinstance(v, Mapping) and "_target_" in v else v
        for k, v in trainer_kwargs.items()
    }


def run_trainer(kwargs: Mapping[str, Any], stage: str, module: Any, **arguments: Any) -> dict[str, Any]:
    """``Trainer(**kwargs).<stage>(module, **arguments)`` (stage ``fit`` or ``test``); returns the trainer's
    ``callback_metrics`` as floats, after freeing what the run holds.

    Lightning's trainer and module refer to each other (and the trainer's connectors to the module), so a dropped
    trainer, the optimizers' state (2x the weights with Adam), the gradients and the module itself would otherwise
    live until Python's next cyclic collection: experts fine-tuned, or merged models scored, one after another in
    one process would pile up meanwhile. Here the state and gradients are cleared, the module's link to the trainer
    cut and the trainer collected, so ``module`` goes as soon as its caller drops it.
    """
    import lightning as L  # only where something is trained or scored

    trainer = L.Trainer(**kwargs)
    getattr(trainer, stage)(module, **arguments)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for optimizer in trainer.optimizers:
        optimizer.state.clear()
    module.zero_grad(set_to_none=True)
    module.trainer = None
    del trainer
    gc.collect()
    return metrics


def lightning_precisions() -> list[str]:
    """Every precision value Lightning's Trainer accepts (``32-true``, ``bf16-mixed``, ``16``, ``64``, ...)."""
    import typing

    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    values: list[Any] = []
    pending: list[Any] = [_PRECISION_INPUT]
    while pending:
        hint = pending.pop(0)
        args = typing.get_args(hint)
        if args:
            pending += list(args)
        else:
            values.append(hint)
    return list(dict.fromkeys(str(v) for v in values))


#: Precisions every supported Lightning accepts (a test checks each is in :func:`lightning_precisions`): these are
#: accepted without importing Lightning, which costs a streaming run that never trains ~200 MiB of memory.
COMMON_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16-true", "16-mixed", "16-true", "64-true")


def check_precision(key: str, value: Any) -> None:
    """Refuse a precision Lightning would refuse only when its first Trainer starts, naming ``key``."""
    if value is None or (not isinstance(value, bool) and str(value) in COMMON_PRECISIONS):
        return
    accepted = lightning_precisions()
    if isinstance(value, bool) or str(value) not in accepted:
        raise ValueError(f"{key} must be one of {accepted}, got {value!r}")
