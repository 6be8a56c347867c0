"""Saved artifacts a method reuses (AWD's delta, cached statistics), checked against what they are applied to.

A file saved from another model, by another selection of tensors, or holding NaN/inf would otherwise be applied
silently (or not at all) and the row labelled as if it had been fitted here. Each check raises a one-line
ValueError naming the file and the first mismatch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor


def _shape(source: Any, name: str) -> tuple[int, ...]:
    return tuple(source.shape(name)) if callable(getattr(source, "shape", None)) else tuple(source[name].shape)


def _dtype(source: Any, name: str) -> torch.dtype:
    return source.dtype(name) if callable(getattr(source, "dtype", None)) else source[name].dtype


def check_artifact(
    source: Mapping[str, Tensor] | Any,
    expected: Mapping[str, tuple[int, ...]],
    label: str,
    what: str = "tensor of the pool",
    exact: bool = True,
) -> None:
    """Refuse ``source`` (a state dict or a lazily read checkpoint) unless its tensors are those of ``expected``
    (name -> shape): the same names (all of them when ``exact``, else a subset), the same shapes, floating point,
    finite. ``label`` names the artifact (its file); ``what`` says what the expected names are."""
    names = list(source)
    if not names:
        raise ValueError(f"{label} holds no tensor")
    foreign = [n for n in names if n not in expected]
    if len(foreign) == len(names):
        raise ValueError(
            f"{label} was saved from another model: none of its {len(names)} tensors (e.g. '{names[0]}') is a {what}"
        )
    if foreign:
        raise ValueError(f"{label}: tensor '{foreign[0]}' is not a {what} ({len(foreign)} of {len(names)} are not)")
    missing = [n for n in expected if n not in source] if exact else []
    if missing:
        count = f"{len(missing)} of the {len(expected)} {what}s missing"
        raise ValueError(f"{label} has no tensor '{missing[0]}' ({count})")
    for name in names:
        shape = _shape(source, name)
        if shape != tuple(expected[name]):
            raise ValueError(f"{label}: tensor '{name}' has shape {list(shape)}, the {what} has {list(expected[name])}")
        if not _dtype(source, name).is_floating_point:
            raise ValueError(f"{label}: tensor '{name}' has dtype {_dtype(source, name)}, not a floating-point dtype")
    for name in names:  # last: it reads every tensor (one at a time)
        if not torch.isfinite(source[name]).all():
            raise ValueError(f"{label}: tensor '{name}' holds NaN or inf")
