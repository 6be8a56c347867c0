"""The Karcher (Riemannian) mean of the models' weights per tensor, as MergeKit's ``karcher`` (0.1.5).

Per tensor, the models' weights x_1..x_N (the pool's experts, and its pretrained model when
``include_pretrained``, as MergeKit includes a given base_model) with norms n_i and unit directions u_i = x_i / n_i:
the mean direction m on the unit sphere starts at the normalised mean of the u_i (with n_i > tol) and takes up to
``max_iter`` Riemannian gradient steps m <- cos|g| m + sin|g| g/|g|, g = mean_i theta_i/sin(theta_i) (u_i - cos
theta_i m), theta_i = arccos <m, u_i> (terms with theta_i < tol left out), stopping once |g| < tol; the merged
tensor is (mean_i n_i) m.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

import torch
from torch import Tensor

from mergelab.config_types import Doc, Range
from mergelab.methods.declaration import Exported, Import, MergeKitInput, MergeKitMapping, MergeKitMethod
from mergelab.methods.tensor_gram import GramCombination


def karcher_coefficients(gram: Tensor, max_iter: int, tol: float) -> tuple[list[float], int, bool]:
    """MergeKit's Karcher iteration on the models' float64 Gram matrix ``gram`` ([N, N], G_ij = <x_i, x_j>).

    The mean direction always lies in the span of the x_i, so it is carried as coefficients over them and every
    dot product and norm is read off the Gram matrix: the iteration never touches the tensors. Returns (k, steps,
    converged): the merged tensor is sum_i k_i x_i; ``steps`` taken; whether |g| fell below ``tol``
    (always True for N = 1, where the mean is x_1, and when no tensor has a norm above ``tol``: the mean is 0).
    """
    n = gram.shape[0]
    if n == 1:
        return [1.0], 0, True
    norms = gram.diagonal().clamp(min=0).sqrt()
    valid = [i for i in range(n) if float(norms[i]) > tol]
    if not valid:
        return [0.0] * n, 0, True
    idx = torch.tensor(valid)
    nv = norms[idx]
    units = gram[idx][:, idx] / (nv[:, None] * nv[None, :])  # Gram matrix of the unit directions
    m = len(valid)
    weights = torch.full((m,), 1.0 / m, dtype=torch.float64)  # equal alphas, renormalised over the valid ones

    def norm(c: Tensor) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    mean = weights.clone()
    length = norm(mean)
    mean = torch.eye(m, dtype=torch.float64)[0] if length < tol else mean / length
    steps, converged = 0, False
    for _ in range(max_iter):
        dots = (units @ mean).clamp(-1.0, 1.0)
        tangent = torch.zeros(m, dtype=torch.float64)
        for i in range(m):
            theta = math.acos(float(dots[i]))
            if theta < tol:
                continue
            direction = -float(dots[i]) * mean
            direction[i] += 1.0  # u_i - cos(theta_i) m
            tangent += float(weights[i]) * (theta / math.sin(theta)) * direction
        step = norm(tangent)
        if step < tol:
            converged = True
            break
        steps += 1
        mean = math.cos(step) * mean + math.sin(step) * (tangent / step)
        length = norm(mean)
        if length > tol:
            mean = mean / length
    scale = float(norms.sum()) / n  # MergeKit's sum_i alpha_i n_i over every model, alpha_i = 1/N
    k = [0.0] * n
    for j, i in enumerate(valid):
        k[i] = scale * float(mean[j]) / float(nv[j])
    return k, steps, converged


class KarcherMergeKit(MergeKitMapping):
    """MergeKit's ``karcher`` (``max_iter``, ``tol``; every model weighted alike). With ``include_pretrained`` the
    config names the pretrained model as base_model (MergeKit adds it to the models); without, it has no
    base_model. Reading a config without one, its first model becomes the pool's pretrained model and
    ``include_pretrained`` true: the same models, the pretrained one taken last (rounding may differ)."""

    reads = (MergeKitMethod("karcher", {"max_iter": 10, "tol": 1e-5}, {}, base_in_models=True),)
    #: What reads back to the very same pool and options.
    expressible: ClassVar[dict[str, Any]] = {"include_pretrained": True}

    def export(self, method: Any, n_experts: int) -> Exported:
        shared = {"max_iter": method.max_iter, "tol": method.tol}
        return Exported("karcher", {}, shared, base_model=method.include_pretrained)

    def read(self, config: MergeKitInput) -> Import:
        iters = config.shared["max_iter"]
        if iters < 0 or not float(iters).is_integer():
            raise config.fail("parameters.max_iter", f"{iters!r} is not a whole number >= 0")
        if config.shared["tol"] < 0:
            raise config.fail("parameters.tol", f"{config.shared['tol']!r} < 0")
        overrides = [
            "method=karcher",
            f"method.max_iter={int(iters)}",
            f"method.tol={config.shared['tol']!r}",
            "method.include_pretrained=true",
        ]
        experts = dict(config.experts)
        if config.base is None:  # the first model as the pool's pretrained one, the mean over all of them
            name, base = next(iter(experts.items()))
            del experts[name]
        else:
            base = config.base
            experts = {n: ref for n, ref in experts.items() if ref != base}
        if not experts:
            raise config.fail("models", "a Karcher mean needs a model besides the base model")
        return Import(base, experts, overrides)


class KarcherMean(GramCombination):
    """theta = the Karcher mean of the experts' weights (and the pretrained model's), per tensor.

    Args:
        max_iter: most Riemannian gradient steps per tensor (0: the normalised mean direction, rescaled).
        tol: the iteration stops once the tangent's norm is below it; also the smallest norm a tensor needs to
            count, and the smallest angle a model needs to pull the mean (MergeKit uses one ``tol`` for all three).
        include_pretrained: False: the experts only (a MergeKit config without base_model); True: the pretrained
            model is one more of the N equally weighted models (MergeKit adds a given base_model to the models).

    The statistics pass takes each tensor's Gram matrix of the models' weights (:class:`GramCombination`), the
    iteration runs on it (:func:`karcher_coefficients`), so it streams in the engine's memory bound.
    """

    reference = "Karcher 1977, Riemannian center of mass and mollifier smoothing; MergeKit's karcher"
    mergekit = KarcherMergeKit()

    def __init__(
        self,
        max_iter: Annotated[
            int, Range(low=0), Doc("most Riemannian gradient steps per tensor (MergeKit max_iter)")
        ] = 10,
        tol: Annotated[float, Range(low=0.0), Doc("stop once the gradient's norm is below it (MergeKit tol)")] = 1e-5,
        include_pretrained: Annotated[
            bool, Doc("the pretrained model is one more model of the mean (MergeKit: a base_model is included)")
        ] = False,
    ) -> None:
        self.max_iter, self.tol, self.include_pretrained = int(max_iter), float(tol), bool(include_pretrained)
        self._steps: dict[str, tuple[int, bool]] = {}

    def begin(self, names: Sequence[str]) -> None:
        super().begin(names)
        self._steps = {}

    def models(self, base: Tensor, experts: Sequence[Tensor]) -> list[Tensor]:
        # the pretrained model last, where MergeKit appends a base_model missing from its models
        return [*experts, base] if self.include_pretrained else list(experts)

    def delta_coefficients(self, name: str, gram: Tensor) -> tuple[float, list[float]]:
        k, steps, converged = karcher_coefficients(gram, self.max_iter, self.tol)
        self._steps[name] = (steps, converged)
        # sum_i k_i theta_i - theta_0 = sum_t k_t tau_t + (sum_i k_i - 1) theta_0, theta_0 among the i when it
        # takes part
        n = gram.shape[0] - (1 if self.include_pretrained else 0)
        return math.fsum(k) - 1.0, k[:n]

    def steps(self, name: str) -> tuple[int, bool]:
        """(steps taken, converged below ``tol``) for tensor ``name`` after a merge."""
        return self._steps[name]

    def report(self) -> dict[str, Any]:
        """The most steps any tensor took and how many tensors stopped at ``max_iter`` without converging."""
        if not self._steps:
            return {}
        return {
            "karcher_max_steps": max(s for s, _ in self._steps.values()),
            "karcher_unconverged_tensors": sum(not c for _, c in self._steps.values()),
        }
