"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025), and the SVD helpers the spectral methods share.

For every 2-D weight matrix, each task matrix tau_t (m x n, rank r = min(m, n)) is cut to its top k singular
triplets, k = floor(r * rank_share) with rank_share = 1/T by default (the paper's choice: T tasks together fill
the rank). The kept left vectors of all tasks, U_cat = [U_1 .. U_T] (m x Tk), and the right ones, V_cat, are
orthogonalised by their polar factor (the Procrustes solution: U_cat = P Sigma Q^T gives U_perp = P Q^T, the
semi-orthogonal matrix nearest to U_cat), which removes the interference between the tasks' subspaces; the
merged matrix is alpha * U_perp diag(S_cat) V_perp^T with S_cat the kept singular values of all tasks.

Every other parameter (biases, norms, anything not 2-D) is the mean of the task vectors times alpha, as in the
paper's code (a running mean over tasks) and FusionBench's port; alpha = 1.0 is the paper's setting (TSV-M needs
no validation). The whole merged task vector is scaled by alpha.

Determinism: LAPACK's SVD (MKL here) gives different bits with different thread counts, so the linear algebra
runs single-threaded (:func:`linear_algebra_thread`); the streaming engine already runs torch on one thread per
worker, an in-memory merge would otherwise use the caller's thread count. The randomized SVD draws its test
matrix from a generator seeded by the tensor's name, never from torch's global RNG (which threads share).

``svd: full`` is the default: on the embedded MiniLM experts (6 tasks) ``lowrank`` (oversample 10, niter 2) moved
the merged encoder matrices by 56% (median relative Frobenius error; 40% with niter 4), although each task's
truncation alone was off by 13-20%: the tasks' top singular bases overlap (smallest singular value of U_cat about
1e-3), and the polar factor amplifies any difference in them. It saved a factor 2.5 of the merge's time.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Literal

import numpy as np
import torch
from torch import Tensor

from mergelab.config_types import Doc, Range
from mergelab.engine.chunks import Block
from mergelab.engine.pipeline import single_threaded_torch
from mergelab.methods.base import TaskVectorMethod

# The options the spectral methods (TSV-M, Iso-C, Iso-CTS) share, declared once.
Alpha = Annotated[float, Range(low=0.0), Doc("scaling of the merged task vector")]
SvdKind = Annotated[Literal["full", "lowrank"], Doc("full (torch.linalg.svd) or lowrank (randomized top-k SVDs)")]
Oversample = Annotated[int, Range(low=0), Doc("lowrank: extra random directions")]
Niter = Annotated[int, Range(low=0), Doc("lowrank: power iterations")]
SvdSeed = Annotated[int, Range(low=0), Doc("lowrank: seed of the random test matrices (with each tensor's name)")]


@contextmanager
def linear_algebra_thread() -> Iterator[None]:
    """Run the enclosed linear algebra on one torch thread, so its bits do not depend on the thread count."""
    if torch.get_num_threads() == 1:  # already so (the streaming engine's workers): touch nothing
        yield
        return
    with single_threaded_torch():
        yield


def tensor_generator(name: str, seed: int) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and the tensor's name: the same draws on any thread, in any order."""
    return torch.Generator().manual_seed((int(seed) << 32) ^ zlib.crc32(name.encode()))


def stable_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD ``U, S, Vh`` of a float matrix, computed so that LAPACK's convergence failures do not stop a merge.

    ``torch.linalg.svd`` uses divide and conquer (gesdd), which can fail to converge in float32 on matrices with
    clustered singular values: the stacked near-orthonormal bases the spectral methods orthogonalise are such
    matrices (Iso-CTS failed this way on a SmolLM2 attention matrix). Such a matrix is decomposed again in float64;
    if that fails too, by QR iteration (LAPACK gesvd, through scipy when it is installed). The result has ``a``'s
    dtype. ValueError naming the shape when every way fails.
    """
    try:
        return tuple(torch.linalg.svd(a, full_matrices=False))  # type: ignore[return-value]
    except torch.linalg.LinAlgError:
        pass
    try:
        u, s, vh = torch.linalg.svd(a.double(), full_matrices=False)
    except torch.linalg.LinAlgError as err:
        try:
            import scipy.linalg
        except ImportError:
            raise ValueError(f"the SVD of a {tuple(a.shape)} matrix did not converge (float32 and float64)") from err
        try:
            un, sn, vhn = scipy.linalg.svd(a.double().cpu().numpy(), full_matrices=False, lapack_driver="gesvd")
        except (ValueError, np.linalg.LinAlgError) as err2:
            raise ValueError(f"the SVD of a {tuple(a.shape)} matrix did not converge (gesdd and gesvd)") from err2
        u, s, vh = (torch.from_numpy(x).to(a.device) for x in (un, sn, vhn))
    return u.to(a.dtype), s.to(a.dtype), vh.to(a.dtype)


def randomized_svd(a: Tensor, k: int, oversample: int, niter: int, generator: torch.Generator) -> tuple[Tensor, ...]:
    """Top-``k`` SVD of ``a`` by a randomized range finder with ``niter`` power iterations (Halko et al. 2011).

    What ``torch.svd_lowrank`` computes, with the Gaussian test matrix drawn from ``generator`` (svd_lowrank uses
    torch's global RNG, so its result would depend on what other threads drew). Returns ``U [m, k], S [k],
    Vh [k, n]``; exact when ``k + oversample >= min(m, n)``.
    """
    m, n = a.shape
    q = min(k + oversample, m, n)
    omega = torch.randn(n, q, generator=generator, dtype=a.dtype)
    basis = torch.linalg.qr(a @ omega).Q
    for _ in range(niter):  # re-orthonormalise between products so small singular directions are not lost
        basis = torch.linalg.qr(a @ torch.linalg.qr(a.mT @ basis).Q).Q
    u, s, vh = stable_svd(basis.mT @ a)
    return (basis @ u)[:, :k], s[:k], vh[:k]


def top_svd(
    a: Tensor, k: int, svd: str, oversample: int, niter: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-``k`` singular triplets ``U [m, k], S [k], Vh [k, n]`` of ``a`` (``svd``: ``full`` | ``lowrank``).

    ``lowrank`` falls back to the full SVD when ``k + oversample`` reaches the rank (it would save nothing).
    """
    if svd == "lowrank" and k + oversample < min(a.shape):
        u, s, vh = randomized_svd(a, k, oversample, niter, generator)
        return u, s, vh
    u, s, vh = stable_svd(a)
    return u[:, :k], s[:k], vh[:k]


def polar_factor(a: Tensor) -> Tensor:
    """The semi-orthogonal matrix nearest to ``a`` (orthogonal Procrustes): P Q^T for a = P Sigma Q^T."""
    p, _, qh = stable_svd(a)
    return p @ qh


def task_arithmetic_mean(vectors: Sequence[Tensor], alpha: float) -> Tensor:
    """alpha * mean_t tau_t: how the spectral methods' reference code merges biases, norms and other non-matrices."""
    out = vectors[0].clone()
    for v in vectors[1:]:
        out.add_(v)
    return out.mul_(alpha / len(vectors))


class TSVM(TaskVectorMethod):
    """TSV-M: per matrix, every task's top singular vectors, orthogonalised across tasks, summed (see module doc).

    Args:
        alpha: scaling of the merged task vector, >= 0 (1.0: the paper's TSV-M setting, no tuning).
        rank_share: share of each task matrix's rank kept, in (0, 1], or None for 1/T (the paper); at least one
            singular triplet is kept per task.
        svd: ``full`` (``torch.linalg.svd``, default: exact) or ``lowrank`` (randomized top-k SVD, for the
            per-task truncation only; the orthogonalisation is always a full SVD).
        oversample: extra random directions of ``lowrank`` beyond k.
        niter: power iterations of ``lowrank``.
        seed: seed of ``lowrank``'s random test matrices (combined with each tensor's name).
    """

    elementwise = False  # each matrix is decomposed whole
    parallel_chunks = True  # merge_chunk is a pure function of the tensor (and its name, for lowrank's draws)

    reference = (
        "Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025, "
        "arXiv 2412.00081"
    )
    mergekit = "TSV-M rebuilds each matrix from the tasks' orthogonalised singular vectors; MergeKit has no such method"

    def __init__(
        self,
        alpha: Alpha = 1.0,
        rank_share: Annotated[
            float | None, Range(0.0, 1.0, low_open=True), Doc("share of each task matrix's rank kept; null: 1/T")
        ] = None,
        svd: SvdKind = "full",
        oversample: Oversample = 10,
        niter: Niter = 2,
        seed: SvdSeed = 0,
    ) -> None:
        self.alpha = float(alpha)
        self.rank_share = None if rank_share is None else float(rank_share)
        self.svd, self.oversample, self.niter, self.seed = svd, int(oversample), int(niter), int(seed)

    def kept_rank(self, rank: int, n_tasks: int) -> int:
        """Singular triplets kept per task of a matrix of rank ``rank`` (at least 1, at most ``rank``)."""
        # rank // T by default: r * (1/T) in floats can land just below an integer
        k = rank // n_tasks if self.rank_share is None else math.floor(rank * self.rank_share + 1e-9)
        return min(rank, max(1, k))

    def merge_matrix(self, name: str, vectors: Sequence[Tensor]) -> Tensor:
        """alpha * U_perp diag(S_cat) V_perp^T of one 2-D tensor's task matrices."""
        k = self.kept_rank(min(vectors[0].shape), len(vectors))
        gen = tensor_generator(name, self.seed)
        us, ss, vhs = zip(*(top_svd(v, k, self.svd, self.oversample, self.niter, gen) for v in vectors), strict=True)
        u_perp = polar_factor(torch.cat(us, dim=1))  # m x Tk
        vh_perp = polar_factor(torch.cat(vhs, dim=0))  # Tk x n: the polar factor of V_cat^T is V_perp^T
        return (u_perp * torch.cat(ss).mul_(self.alpha)) @ vh_perp

    def merge_chunk(self, block: Block, vectors: Sequence[Tensor]) -> Tensor:
        if vectors[0].dim() != 2 or vectors[0].numel() == 0:
            return task_arithmetic_mean(vectors, self.alpha)
        with linear_algebra_thread():
            return self.merge_matrix(block.name, vectors)
