"""Isotropic merging (Marczak et al., "No Task Left Behind", ICML 2025): Iso-C and Iso-CTS.

Iso-C: for every 2-D weight matrix, the task-arithmetic sum M = sum_t tau_t = U diag(S) V^T keeps its singular
vectors and gets a flat spectrum, alpha * mean(S) * U V^T, so that no task's directions are drowned by the few
dominant ones of the sum.

Iso-CTS: the flat spectrum spread over a common and task-specific subspaces. With r = min(m, n) and T tasks, the
top k of M's singular directions form the common subspace, k = int(r * common_space_fraction) adjusted so the
remaining r - k directions split evenly over the tasks (r - k = round((r - k) / T) * T, as the reference code
does). Each task gives the top (r - k) / T singular triplets of its own matrix with the common left subspace
projected out, tau_t - U_k U_k^T tau_t. The common and task-specific left vectors are concatenated and
orthogonalised by their polar factor (as in TSV-M), the right ones too, and the matrix is alpha * mean(sigma) *
U_perp V_perp^T with sigma all r singular values gathered (the common ones of M and the task-specific ones).

Everything not 2-D (biases, norms) is the mean of the task vectors times alpha, as the reference implementation
(danielm1405/iso-merging) and FusionBench do. Defaults: common_space_fraction = 0.8 (the paper and both reference
configs); alpha = 1.0, the value of FusionBench's configs: the paper selects alpha on held-out validation data
(FusionBench's CLIP ViT-B/32 examples use 1.5), so each YAML carries an alpha ``grid`` for ``tune=true``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch
from torch import Tensor

from mergelab.config_types import Doc, Range
from mergelab.engine.chunks import Block
from mergelab.methods.base import TaskVectorMethod
from mergelab.methods.task_singular_vectors import (
    Alpha,
    Niter,
    Oversample,
    SvdKind,
    SvdSeed,
    linear_algebra_thread,
    polar_factor,
    task_arithmetic_mean,
    tensor_generator,
    top_svd,
)


def _sum(vectors: Sequence[Tensor]) -> Tensor:
    """sum_t tau_t, accumulated in task order in a fresh tensor."""
    out = vectors[0].clone()
    for v in vectors[1:]:
        out.add_(v)
    return out


def split_rank(rank: int, n_tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """``(common, per_task)`` dimensions of Iso-CTS for a matrix of rank ``rank``: common + n_tasks * per_task = rank.

    The reference code's rule: the common share int(rank * fraction), then the rest rounded to a multiple of the
    number of tasks (Python's round, half to even), clamped here so the task-specific part never exceeds the rank.
    """
    common = int(rank * common_space_fraction)
    per_task = min(round((rank - common) / n_tasks), rank // n_tasks)
    return rank - per_task * n_tasks, per_task


class _Isotropic(TaskVectorMethod):
    """What Iso-C and Iso-CTS share: options, non-matrix parameters, the single-threaded linear algebra."""

    elementwise = False  # each matrix is decomposed whole
    parallel_chunks = True  # merge_chunk is a pure function of the tensor (and its name, for lowrank's draws)

    def __init__(self, alpha: Alpha, svd: SvdKind, oversample: Oversample, niter: Niter, seed: SvdSeed) -> None:
        self.alpha = float(alpha)
        self.svd, self.oversample, self.niter, self.seed = svd, int(oversample), int(niter), int(seed)

    def _top(self, a: Tensor, k: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        return top_svd(a, k, self.svd, self.oversample, self.niter, gen)

    def merge_matrix(self, name: str, vectors: Sequence[Tensor]) -> Tensor:
        """The merged task vector of one 2-D tensor."""
        raise NotImplementedError

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        if vectors[0].dim() != 2 or vectors[0].numel() == 0:
            return task_arithmetic_mean(vectors, self.alpha)
        with linear_algebra_thread():
            return self.merge_matrix(block.name, vectors)


class IsoC(_Isotropic):
    """Iso-C: alpha * mean(S) * U V^T of the summed task matrices M = U diag(S) V^T (see the module docstring).

    Args:
        alpha: scaling, >= 0 (1.0 as FusionBench's config; the paper tunes it on validation).
        svd: ``full`` (``torch.linalg.svd``, default) or ``lowrank``: Iso-C needs every singular direction, and a
            randomized SVD of full rank saves nothing, so ``lowrank`` runs the full SVD (accepted for symmetry).
        oversample, niter, seed: ``lowrank``'s oversampling, power iterations and seed.
    """

    reference = (
        "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
        "ICML 2025, arXiv 2502.04959"
    )
    mergekit = "Iso-C flattens the spectrum of each summed task matrix; MergeKit has no such method"

    def __init__(
        self,
        alpha: Alpha = 1.0,
        svd: SvdKind = "full",
        oversample: Oversample = 10,
        niter: Niter = 2,
        seed: SvdSeed = 0,
    ) -> None:
        super().__init__(alpha, svd, oversample, niter, seed)

    def merge_matrix(self, name: str, vectors: Sequence[Tensor]) -> Tensor:
        total = _sum(vectors)
        u, s, vh = self._top(total, min(total.shape), tensor_generator(name, self.seed))
        return (u @ vh).mul_(self.alpha * float(s.mean()))


class IsoCTS(_Isotropic):
    """Iso-CTS: a flat spectrum over the common subspace of the sum plus each task's own directions (module doc).

    Args:
        alpha: scaling, >= 0 (1.0 as FusionBench's config; the paper tunes it on validation).
        common_space_fraction: share of the rank given to the common subspace, in [0, 1] (0.8: the paper's
            default and the reference configs'); 1 gives Iso-C.
        svd: ``full`` (``torch.linalg.svd``, default) or ``lowrank`` (randomized top-k SVDs: the common subspace
            of the sum and each task's specific directions).
        oversample, niter, seed: ``lowrank``'s oversampling, power iterations and seed.
    """

    reference = IsoC.reference
    mergekit = "Iso-CTS flattens the spectrum of a common and per-task subspaces; MergeKit has no such method"

    def __init__(
        self,
        alpha: Alpha = 1.0,
        common_space_fraction: Annotated[
            float, Range(0.0, 1.0), Doc("share of the rank for the common subspace; 1 is Iso-C")
        ] = 0.8,
        svd: SvdKind = "full",
        oversample: Oversample = 10,
        niter: Niter = 2,
        seed: SvdSeed = 0,
    ) -> None:
        self.common_space_fraction = float(common_space_fraction)
        super().__init__(alpha, svd, oversample, niter, seed)

    def merge_matrix(self, name: str, vectors: Sequence[Tensor]) -> Tensor:
        common, per_task = split_rank(min(vectors[0].shape), len(vectors), self.common_space_fraction)
        gen = tensor_generator(name, self.seed)
        u_c, s_c, vh_c = self._top(_sum(vectors), common, gen)
        us, ss, vhs = [u_c], [s_c], [vh_c]
        if per_task:
            for v in vectors:
                specific = v - u_c @ (u_c.mT @ v)  # the task's matrix outside the common left subspace
                u, s, vh = self._top(specific, per_task, gen)
                us.append(u)
                ss.append(s)
                vhs.append(vh)
        u_perp = polar_factor(torch.cat(us, dim=1))
        vh_perp = polar_factor(torch.cat(vhs, dim=0))
        return (u_perp @ vh_perp).mul_(self.alpha * float(torch.cat(ss).mean()))
