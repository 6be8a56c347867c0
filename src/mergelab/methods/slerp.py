"""SLERP, spherical linear interpolation of two models' weights per tensor, as MergeKit's ``slerp`` (0.1.5).

MergeKit's base_model is the pool's pretrained model theta_0 and its one other model the pool's only expert
theta_1. Per tensor, with n_0, n_1 the tensors' norms (1 where <= eps) and d = <theta_0/n_0, theta_1/n_1> clamped
to [-1, 1]: where |d| > ``dot_threshold`` (colinear or antipodal) theta = (1 - t) theta_0 + t theta_1, else with
Omega = arccos d, theta = sin((1 - t) Omega)/sin(Omega) theta_0 + sin(t Omega)/sin(Omega) theta_1. ``t`` may vary by
tensor: MergeKit's filter/value list and per-layer gradients (:func:`t_per_tensor`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Annotated, Any

from torch import Tensor

from mergelab.config_types import Doc, Range
from mergelab.methods.awd import LAYER_INDEX
from mergelab.methods.declaration import (
    REQUIRED,
    Exported,
    Import,
    MergeKitInput,
    MergeKitMapping,
    MergeKitMethod,
    NotExpressible,
    override_value,
)
from mergelab.methods.tensor_gram import GramCombination

#: Where every t lies (0: the pretrained model, 1: the expert); MergeKit does not bound it.
T_RANGE = Range(0.0, 1.0)

#: A number, a gradient (a list of numbers), or a list of ``{filter: <substring>, value: <number or gradient>}``.
TSetting = float | Sequence[float] | Sequence[Mapping[str, Any]]


def layer_positions(names: Sequence[str]) -> dict[str, float]:
    """Where each tensor lies along MergeKit's per-layer gradients, in [0, 1].

    A tensor of layer i of L (its block index as AWD's reports read it, :data:`mergelab.methods.awd.LAYER_INDEX`:
    ``layers.3.``, ``layer.3.``, ``h.3.``, ``blocks.3.``; L = 1 + the largest one among ``names``)
    is at i / (L - 1) (1 when L == 1); a tensor outside the layers (embeddings, final norm, head) is at 0, as
    MergeKit plans its pre- and post-layer weights.
    """
    index = {n: int(m.group(1)) for n in names if (m := LAYER_INDEX.search(n))}
    layers = max(index.values(), default=-1) + 1
    return {n: ((index[n] / (layers - 1) if layers > 1 else 1.0) if n in index else 0.0) for n in names}


def gradient_value(values: Sequence[float], position: float) -> float:
    """MergeKit's gradient at ``position`` in [0, 1]: ``values`` spread evenly over [0, 1], linearly interpolated."""
    scaled = position * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def check_t(t: Any, option: str = "t") -> TSetting:
    """A ``t`` option checked for form (see :data:`TSetting`), every number finite and in [0, 1]; plain lists and
    dicts are returned (a Hydra ListConfig is converted)."""

    def number(v: Any, where: str) -> float:
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ValueError(f"method option '{where}' must be a number, got {v!r}")
        T_RANGE.check(f"method option '{where}'", v)
        return float(v)

    def scalar_or_gradient(v: Any, where: str) -> float | list[float]:
        if isinstance(v, Sequence) and not isinstance(v, str):
            if not v:
                raise ValueError(f"method option '{where}' is an empty gradient; give at least one number")
            return [number(x, f"{where}[{i}]") for i, x in enumerate(v)]
        return number(v, where)

    if isinstance(t, Mapping):
        t = [t]  # one {filter, value} entry, as MergeKit accepts
    if not (isinstance(t, Sequence) and not isinstance(t, str)) or not any(isinstance(e, Mapping) for e in t):
        return scalar_or_gradient(t, option)
    entries = []
    for i, entry in enumerate(t):
        where = f"{option}[{i}]"
        if not isinstance(entry, Mapping) or "value" not in entry or set(entry) - {"filter", "value"}:
            raise ValueError(f"method option '{where}' must be {{filter: <substring>, value: ...}}, got {entry!r}")
        f = entry.get("filter")
        if f is not None and not isinstance(f, str):
            raise ValueError(f"method option '{where}.filter' must be a substring of tensor names, got {f!r}")
        entries.append({"filter": f, "value": scalar_or_gradient(entry["value"], f"{where}.value")})
    if entries[-1]["filter"] not in (None, "*"):
        # MergeKit fails at planning on a tensor no entry matches; a last default makes every tensor match
        raise ValueError(f"method option '{option}': end the list with a default {{value: ...}} (no filter)")
    return entries


def t_value(setting: TSetting, name: str, position: float) -> float:
    """The ``t`` of tensor ``name`` at gradient ``position``: MergeKit's ``evaluate_setting`` (the first entry whose
    filter is absent, ``*`` or a substring of ``name``; a gradient read at ``position``)."""
    if isinstance(setting, int | float):
        return float(setting)
    if setting and not isinstance(setting[0], Mapping):
        return gradient_value([float(v) for v in setting], position)  # type: ignore[arg-type]
    for entry in setting:
        assert isinstance(entry, Mapping)
        f = entry["filter"]
        if f is None or f == "*" or f in name:
            return t_value(entry["value"], name, position)
    raise AssertionError(f"no entry of {setting} matches tensor '{name}' (check_t requires a last default)")


def t_per_tensor(setting: TSetting, names: Sequence[str]) -> dict[str, float]:
    """Each tensor's ``t``, as MergeKit resolves it for a merge of these tensors (:func:`layer_positions`)."""
    positions = layer_positions(names)
    return {n: t_value(setting, n, positions[n]) for n in names}


def slerp_coefficients(gram: Tensor, t: float, dot_threshold: float, eps: float) -> tuple[float, float]:
    """(c_0, c_1) with slerp = c_0 theta_0 + c_1 theta_1, from the float64 Gram matrix of (theta_0, theta_1)."""
    n0, n1 = math.sqrt(max(float(gram[0, 0]), 0.0)), math.sqrt(max(float(gram[1, 1]), 0.0))
    n0, n1 = (n0 if n0 > eps else 1.0), (n1 if n1 > eps else 1.0)
    dot = min(1.0, max(-1.0, float(gram[0, 1]) / (n0 * n1)))
    if abs(dot) > dot_threshold:
        return 1.0 - t, t
    omega = math.acos(dot)
    return math.sin((1 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)


#: MergeKit's slerp constants (0.1.5 fixes them): a config expresses SLERP only with these.
MERGEKIT_DOT_THRESHOLD, MERGEKIT_EPS = 0.9995, 1e-8


def mergekit_t(t: TSetting) -> Any:
    """``t`` as MergeKit writes it: filter/value entries without a ``filter`` key for the default one."""
    if isinstance(t, list) and t and isinstance(t[0], Mapping):
        return [{**({"filter": e["filter"]} if e["filter"] is not None else {}), "value": e["value"]} for e in t]
    return t


class SlerpMergeKit(MergeKitMapping):
    """MergeKit's ``slerp``: its base_model is the pool's pretrained model, its one other model the pool's expert,
    ``t`` as written (a number, a layer gradient, or filter/value entries with a last default)."""

    reads = (MergeKitMethod("slerp", {"t": REQUIRED}, {}, structured=("t",)),)

    def export(self, method: Any, n_experts: int) -> Exported:
        if (method.dot_threshold, method.eps) != (MERGEKIT_DOT_THRESHOLD, MERGEKIT_EPS):
            raise NotExpressible(
                f"MergeKit's slerp fixes dot_threshold {MERGEKIT_DOT_THRESHOLD} and eps {MERGEKIT_EPS}; this merge "
                f"uses {method.dot_threshold} and {method.eps}"
            )
        notes = []
        if not isinstance(method.t, float):
            notes.append(
                "t varies by tensor: both read a tensor's layer from its name (layers.N., layer.N., h.N., blocks.N.) "
                "and spread gradients over the layers found"
            )
        return Exported("slerp", {}, {"t": mergekit_t(method.t)}, notes)

    def read(self, config: MergeKitInput) -> Import:
        try:
            t = check_t(config.shared["t"])
        except ValueError as e:
            raise config.fail("parameters.t", str(e)) from None
        return config.imported(["method=slerp", f"method.t={override_value(t)}"])


class SLERP(GramCombination):
    """Spherical interpolation from the pretrained model (t = 0) to the pool's only expert (t = 1), per tensor.

    Args:
        t: the interpolation factor in [0, 1]: a number; a gradient (a list of numbers spread evenly over the
            layers, linearly interpolated at each layer; tensors outside the layers take its first value); or
            MergeKit's list of ``{filter: <substring of the tensor name>, value: <number or gradient>}`` entries,
            the first matching one applying, ended by a ``{value: ...}`` default (required, so that every tensor
            has a ``t`` before any work; MergeKit would fail on the first tensor left without one).
        dot_threshold: |cos| above which the two tensors count as colinear and are interpolated linearly.
        eps: a norm at or below it counts as 1 (a zero tensor).

    The pool must have exactly one expert. The statistics pass takes each tensor's two norms and dot product
    (:class:`GramCombination`), so it streams in the engine's memory bound.
    """

    reference = "Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); MergeKit's slerp"
    mergekit = SlerpMergeKit()
    expert_count = 1

    def __init__(
        self,
        t: Annotated[
            TSetting, Doc("0: the pretrained model, 1: the expert; a number, a layer gradient, or [{filter, value}]")
        ] = 0.5,
        dot_threshold: Annotated[
            float, Range(low=0.0, high=1.0), Doc("|cos| above it interpolates linearly (MergeKit's DOT_THRESHOLD)")
        ] = 0.9995,
        eps: Annotated[float, Range(low=0.0), Doc("norms at or below it count as 1 (MergeKit's eps)")] = 1e-8,
    ) -> None:
        self.t = check_t(t)
        self.dot_threshold, self.eps = float(dot_threshold), float(eps)

    def begin(self, names: Sequence[str]) -> None:
        super().begin(names)
        self._t = t_per_tensor(self.t, names)

    def models(self, base: Tensor, experts: Sequence[Tensor]) -> list[Tensor]:
        return [base, *experts]  # one expert: the engine checks expert_count before any pass

    def delta_coefficients(self, name: str, gram: Tensor) -> tuple[float, list[float]]:
        c0, c1 = slerp_coefficients(gram, self._t[name], self.dot_threshold, self.eps)
        # c_0 theta_0 + c_1 (theta_0 + tau) - theta_0 = c_1 tau + (c_0 + c_1 - 1) theta_0. The linear branch
        # (and t = 0 or 1) has c_0 = 1 - c_1: its pretrained term is exactly 0, not a rounding of it.
        return (0.0 if c0 == 1.0 - c1 else c0 + c1 - 1.0), [c1]

    def t_of(self, name: str) -> float:
        """The ``t`` tensor ``name`` was merged with (after :meth:`begin`)."""
        return self._t[name]
