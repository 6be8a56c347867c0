"""What :func:`mergelab.run.run` needs from a model pool and an evaluation suite, whatever the model family.

A pool (sequence classifiers in :mod:`mergelab.text.pool`, causal LMs in :mod:`mergelab.causal_lm.pool`) holds the
pretrained model and one expert per task of a suite; merge methods read its state dicts, and it builds the
LightningModules that the suite's tasks are scored with (each exposing the merged weights as ``backbone``, which
:class:`mergelab.callbacks.MergeCallback` loads into)."""

from __future__ import annotations

import copy
import re
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn

from mergelab import task_vectors as tv

Scores = dict[str, dict[str, float]]  # task -> {metric: value}; every task has the main metric "acc"


def copy_with_state(module: nn.Module, state: Mapping[str, torch.Tensor] | None) -> nn.Module:
    """A copy of ``module`` with ``state`` (possibly partial: e.g. only the merged parameters) loaded, in eval mode.

    Every pool builds its scored and saved models this way, so the pool's own pretrained module is never changed.
    """
    out = copy.deepcopy(module)
    if state is not None:
        out.load_state_dict(dict(state), strict=False)
    return out.eval()


class ModelPool(ABC):
    """The pretrained model and one expert per task, with the parameters that merge methods operate on.

    Args:
        experts: task -> hub id or local dir of its expert (None entries, or None for all: the pool builds them).
        exclude: regexes over parameter names that are not merged (they stay pretrained).
        cache_dir: where built experts (and converted checkpoints) and cached reference scores live.
        trust_remote_code: passed to transformers; off unless the user turns it on.
    """

    def __init__(
        self,
        experts: Mapping[str, str | None] | None = None,
        exclude: Sequence[str] = (),
        cache_dir: str = "~/.cache/mergelab",
        trust_remote_code: bool = False,
    ) -> None:
        self.expert_paths: dict[str, str | None] | None = dict(experts) if experts is not None else None
        try:
            self.exclude = [re.compile(p) for p in exclude]
        except re.error as e:
            raise ValueError(f"model.exclude: invalid regex: {e}") from e
        self.cache_dir = Path(cache_dir).expanduser()
        self.trust_remote_code = trust_remote_code
        self.tasks: list[str] = []
        self.model_type = ""
        #: task -> the expert's checkpoint (as given, or the dir it was built into); set by :meth:`setup`.
        self.resolved: dict[str, str] = {}
        #: suite task (a table column) -> the expert it is scored against; the identity unless a suite scores
        #: other tasks than the experts' (lm-eval benchmarks); set by :meth:`setup`.
        self.expert_of: dict[str, str] = {}
        self._expert_states: dict[str, tv.StateDict] = {}

    @abstractmethod
    def setup(self, suite: Any, trainer_kwargs: Mapping[str, Any]) -> None:
        """Resolve (building if needed) and load every model; check they fit together and fit ``suite``."""

    def task_paths(self, task_names: Sequence[str]) -> dict[str, str | None]:
        """Task -> configured expert (None: build it); sets :attr:`tasks`. Every suite task needs an entry."""
        paths = dict(self.expert_paths) if self.expert_paths is not None else dict.fromkeys(task_names)
        missing = [t for t in task_names if t not in paths]
        if missing:
            raise ValueError(f"model pool has no expert for suite task(s) {missing}; experts: {sorted(paths)}")
        self.tasks = list(task_names)
        self.expert_of = {t: t for t in task_names}
        return paths

    def columns_of(self, task: str) -> list[str]:
        """The suite tasks ``task``'s expert is the reference of (itself, unless :attr:`expert_of` says otherwise)."""
        return [c for c, e in self.expert_of.items() if e == task]

    def check_architecture(self, where: str, model_type: str) -> None:
        """An expert must be the pretrained model's architecture (``self.model_type``)."""
        if model_type != self.model_type:
            raise ValueError(
                f"{where}: architecture '{model_type}' differs from the pretrained model's '{self.model_type}'"
            )

    def add_expert(
        self, task: str, path: str, where: str, base: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]
    ) -> None:
        """Keep ``task``'s expert weights for the keys of ``base``, after checking names and shapes match."""
        tv.check_compatible(base, state, where)
        self.resolved[task] = path
        self._expert_states[task] = {k: state[k].detach() for k in base}

    @abstractmethod
    def pretrained_state(self) -> tv.StateDict:
        """The pretrained weights of the merged part of the model."""

    def expert_states(self) -> list[tv.StateDict]:
        """The experts' weights (same keys as :meth:`pretrained_state`), in task order."""
        return [self._expert_states[t] for t in self.tasks]

    def is_mergeable(self, name: str, tensor: torch.Tensor) -> bool:
        """Floating-point parameters not matched by ``exclude``."""
        return tensor.is_floating_point() and not any(p.search(name) for p in self.exclude)

    def mergeable(self, state: Mapping[str, torch.Tensor]) -> tv.StateDict:
        """The subset of a state dict that merge methods operate on."""
        return {k: v for k, v in state.items() if self.is_mergeable(k, v)}

    @abstractmethod
    def model(
        self, state: Mapping[str, torch.Tensor] | None = None, tasks: Sequence[str] | None = None
    ) -> L.LightningModule:
        """A module scoring ``tasks`` (default: all) with the pretrained weights and ``state`` (possibly partial).

        Its ``backbone`` attribute holds the merged part of the model (what :meth:`pretrained_state` covers).
        """

    def expert_model(self, task: str) -> L.LightningModule:
        """The expert of ``task`` alone, scoring the suite tasks it is the reference of."""
        return self.model(self._expert_states[task], self.columns_of(task))

    @abstractmethod
    def evaluate(
        self,
        model: L.LightningModule,
        split: str,
        trainer_kwargs: Mapping[str, Any],
        tasks: Sequence[str] | None = None,
        callbacks: Sequence[L.Callback] = (),
    ) -> Scores:
        """Scores of ``model`` on ``split`` of the suite's ``tasks``, under ``trainer.test`` with ``callbacks``."""

    @abstractmethod
    def reference_key(self, task: str | None = None) -> dict[str, Any]:
        """What identifies the pretrained model (``task=None``) or ``task``'s expert, for caching their scores."""

    @abstractmethod
    def save_merged(self, state: Mapping[str, torch.Tensor], out_dir: str | Path) -> Path:
        """Write the model with the merged weights to ``out_dir`` (atomically); returns the dir."""
