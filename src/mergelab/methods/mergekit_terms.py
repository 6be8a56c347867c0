"""MergeKit's generalized task arithmetic in mergelab's terms, shared by the methods that map onto it (task
arithmetic, TIES, DARE, Breadcrumbs, DELLA).

What is relied on of MergeKit (it works per tensor): each model's task vector is sparsified (``ties``: the top
``density`` share of the tensor's magnitudes is kept; ``dare_*``: each entry is kept with probability ``density``;
``breadcrumbs*``: the ``gamma`` largest and the smallest magnitudes dropped, ``density`` kept; ``della*``:
MAGPRUNE), multiplied by the model's ``weight``; with sign consensus (``ties``, ``dare_ties``, ``breadcrumbs_ties``,
``della``) only the entries whose sign is that of the weighted sum are kept; the kept entries are summed, with
``normalize`` divided by the summed weights of the kept entries, scaled by ``lambda`` and added to ``base_model``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mergelab.methods.declaration import REQUIRED, Import, MergeKitInput, MergeKitMethod, decimal

LAMBDA_NOTE = "lambda (a global scale of the merged task vector) needs a MergeKit version that has it"


def task_arithmetic_family(name: str, normalize: bool, rescale: bool, **sparsifier: Any) -> MergeKitMethod:
    """One of MergeKit's generalized task-arithmetic methods: ``normalize`` / ``rescale`` its defaults,
    ``sparsifier`` its per-model sparsification parameters with their defaults (none: plain task arithmetic)."""
    shared: dict[str, Any] = {"normalize": normalize, "int8_mask": False, "lambda": 1.0}
    if sparsifier:
        shared["rescale"] = rescale
    return MergeKitMethod(name, shared, {"weight": REQUIRED, **sparsifier})


def ties_parameters(
    disjoint: str, scaling: float, weighted: bool = False
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Per-model and global parameters of TIES's disjoint merge scaled by ``scaling``: a sum is the weights' sum
    (``normalize: false``); a mean is ``normalize: true``, which cancels the weights, scaled by ``lambda``.
    ``weighted`` (per-expert weights, which the caller writes as each model's ``weight``): ``scaling`` is
    ``lambda`` either way, applied after the sum as mergelab does."""
    normalize = {"normalize": disjoint == "mean"}
    if disjoint == "sum" and not weighted:
        return {"weight": scaling}, normalize, []
    per = {} if weighted else {"weight": 1.0}
    if scaling == 1.0:
        return per, normalize, []
    return per, {**normalize, "lambda": scaling}, [LAMBDA_NOTE]


@dataclass
class TaskArithmeticTerms:
    """A task-arithmetic-family config as one coefficient: ``scaling`` on the merged vector, TIES's ``disjoint``
    (``mean`` where MergeKit normalizes), each expert's ``densities`` and, when the experts' weights differ, them as
    a per-expert mapping override value (``weights``; the coefficient is then that of a weight of 1)."""

    scaling: float
    disjoint: str
    densities: list[float]
    weights: str | None


def read_task_arithmetic(config: MergeKitInput, sign_election: bool, dropped: bool) -> TaskArithmeticTerms:
    """The coefficient of ``task_arithmetic`` / ``ties`` / ``dare_*`` configs (``dropped``: DARE's random drop,
    whose survivors MergeKit without ``rescale`` leaves at their size: mergelab's rescaled ones times the density,
    a per-expert factor folded into the weights where the densities differ)."""
    method, fail = config.merge_method, config.fail
    weights = config.column("weight")
    densities = config.column("density") if "density" in config.models[0] else [1.0] * len(weights)
    for d in densities:
        read_unit_interval_value(config, "models[].parameters.density", d)
    normalize, lam = config.shared["normalize"], config.shared["lambda"]
    rescale = config.shared.get("rescale", False)
    # Unrescaled survivors with differing densities: each expert's coefficient is w_t x density_t.
    kept_sizes = dropped and not rescale and len({*densities}) > 1
    if kept_sizes and sign_election and len({decimal(w * d) for w, d in zip(weights, densities, strict=True)}) == 1:
        return TaskArithmeticTerms(_unrescaled_sign_election(config, weights, densities), "sum", densities, None)
    per_expert = len({*weights}) > 1 or min(weights) < 0 or kept_sizes
    if kept_sizes and sign_election and normalize:
        raise fail(
            "parameters.normalize",
            f"true with densities {densities} that differ and rescale false: MergeKit divides by the agreeing "
            "weights w_t, mergelab's weighted disjoint mean by its own weights (here w_t x density_t)",
        )
    if per_expert and normalize and sign_election and min(weights) < 0:
        raise fail(
            "models[].parameters.weight",
            f"{weights} has a negative weight with normalize true: {method}'s mean divides by the agreeing weights, "
            "which a negative one cancels (mergelab refuses it; normalize false subtracts)",
        )
    w = 1.0 if per_expert else weights[0]
    if per_expert and normalize and not sign_election and sum(weights) == 0:
        raise fail("models[].parameters.weight", f"{weights} sum to 0: normalize divides by their sum")
    if w < 0:
        raise fail("models[].parameters.weight", f"{w:g} < 0: mergelab's coefficients are non-negative")
    if lam < 0:
        raise fail("parameters.lambda", f"{lam:g} < 0: mergelab's coefficients are non-negative")
    # normalize divides by the weights kept: n x w for task arithmetic, per entry the agreeing tasks' for sign
    # election (a disjoint mean).
    keep = densities[0] if dropped and not rescale and not kept_sizes else 1.0
    if w == 0:
        raw = 0.0  # nothing is added (MergeKit counts a zero divisor as 1)
    elif normalize:
        divisor = 1 if sign_election else sum(weights) if per_expert else len(config.experts)
        raw = lam * keep / divisor
    else:
        raw = w * lam * keep
    scaling = raw if raw == w else decimal(raw)  # derived: rounded as a decimal, see decimal()
    if kept_sizes:
        weights = [decimal(v * d) for v, d in zip(weights, densities, strict=True)]
    mapping = config.by_expert(weights) if per_expert else None
    return TaskArithmeticTerms(scaling, "mean" if normalize else "sum", densities, mapping)


def _unrescaled_sign_election(config: MergeKitInput, weights: list[float], densities: list[float]) -> float:
    """The one TIES coefficient of a ``dare_ties`` config without ``rescale`` whose densities differ and whose
    w_t x density_t are the same for every model (the config mergelab writes: weight = scaling / density_t): each
    model's survivors are mergelab's rescaled ones times its density. ``normalize`` (a division by the agreeing
    weights, no longer a count) is refused."""
    effective = [decimal(w * d) for w, d in zip(weights, densities, strict=True)]
    if min(effective) < 0:
        raise config.fail("models[].parameters.weight", f"{weights} < 0: mergelab's coefficients are non-negative")
    if config.shared["normalize"]:
        raise config.fail(
            "parameters.normalize",
            f"true with densities {densities} that differ and rescale false: MergeKit divides by the agreeing "
            "weights w_t, mergelab's disjoint mean by the agreeing count",
        )
    return decimal(effective[0] * read_lambda(config))


def read_unit_intervals(config: MergeKitInput, key: str, low_open: bool = True, high_open: bool = False) -> str:
    """The per-model parameter ``key`` as an override value (one number when every expert gives the same, else
    {expert: value}), each refused outside (0, 1] (or the interval given)."""
    values = config.column(key)
    for v in values:
        read_unit_interval_value(config, f"models[].parameters.{key}", v, low_open, high_open)
    return config.one_or_each([float(v) for v in values])


def read_unit_interval_value(
    config: MergeKitInput, where: str, value: float, low_open: bool = True, high_open: bool = False
) -> float:
    """``value`` (the parameter at ``where``), refused outside (0, 1] (or the interval given)."""
    below = value <= 0.0 if low_open else value < 0.0
    above = value >= 1.0 if high_open else value > 1.0
    if below or above:
        interval = f"{'(' if low_open else '['}0, 1{')' if high_open else ']'}"
        raise config.fail(where, f"{value:g} is not in {interval}")
    return float(value)


def read_sparsified_mix(config: MergeKitInput, second: str, extra: Sequence[str] = ()) -> Import:
    """A Breadcrumbs or DELLA config as the conf/method YAML of its merge method's name: ``density`` in (0, 1] and
    the ``second`` sparsifier parameter (``gamma``, ``epsilon``) in [0, 1), each one number or per expert,
    ``normalize``, ``lambda`` as ``scaling``, then ``extra`` overrides and the per-expert weights."""
    density = read_unit_intervals(config, "density")
    value = read_unit_intervals(config, second, low_open=False, high_open=True)
    overrides = [
        f"method={config.merge_method}",
        f"method.density={density}",
        f"method.{second}={value}",
        f"method.normalize={str(config.shared['normalize']).lower()}",
        f"method.scaling={read_lambda(config)!r}",
        *extra,
    ]
    return config.imported(overrides + weights_override(config))


def weights_override(config: MergeKitInput, option: str = "method.weights") -> list[str]:
    """``method.weights={...}`` when any expert's weight is not 1 (mergelab's default), else nothing."""
    weights = config.column("weight")
    return [f"{option}={config.by_expert(weights)}"] if any(w != 1.0 for w in weights) else []


def read_lambda(config: MergeKitInput) -> float:
    """``lambda`` as mergelab's non-negative ``scaling``."""
    lam = config.shared["lambda"]
    if lam < 0:
        raise config.fail("parameters.lambda", f"{lam:g} < 0: mergelab's coefficients are non-negative")
    return float(lam)
