"""Refusing bad weights: input state dicts holding NaN/inf or shaped unlike the pretrained model, merged tensors
holding NaN/inf. Each error names the checkpoint (or method) and the parameter."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor


def check_finite(state: Mapping[str, Tensor], where: str) -> None:
    """Raise if any tensor holds NaN or inf, naming the checkpoint and parameter."""
    for k, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ValueError(f"{where}: parameter '{k}' contains {bad} NaN/inf value(s)")


class NonFiniteMergeError(ValueError):
    """A merge produced NaN or inf: never scored or written (an all-NaN model would still 'score' by argmax)."""


def require_finite_merge(t: Tensor, tensor: str, method: object) -> None:
    """Raise :class:`NonFiniteMergeError` naming ``tensor`` and ``method`` if the merged ``t`` holds NaN or inf."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    who = method if isinstance(method, str) else type(method).__name__
    raise NonFiniteMergeError(
        f"{who} merged tensor '{tensor}' into {nan} NaN and {inf} inf value(s) of {t.numel()}: check the method's "
        "options and the experts' weights"
    )


def check_compatible(base: Mapping[str, Tensor], other: Mapping[str, Tensor], where: str) -> None:
    """Raise if ``other`` lacks a parameter of ``base`` or has it with another shape."""
    missing = [k for k in base if k not in other]
    if missing:
        raise ValueError(f"{where}: missing parameter(s) {missing[:5]} present in the pretrained model")
    for k, v in base.items():
        if tuple(other[k].shape) != tuple(v.shape):
            raise ValueError(
                f"{where}: parameter '{k}' has shape {tuple(other[k].shape)}, pretrained has {tuple(v.shape)}"
            )
