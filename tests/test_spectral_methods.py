"""TSV-M, Iso-C and Iso-CTS against independent NumPy (float64) versions written from the papers' equations.

Each reference below re-derives its method from the paper (Gargiulo et al. 2025, Marczak et al. 2025) with NumPy's
SVD, and never calls the methods' helpers; the methods run through their own ``combine`` (the pass driver).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from mergelab.methods import TSVM, IsoC, IsoCTS, TaskArithmetic

RTOL = 2e-4  # float32 methods against float64 references, relative to the result's largest entry


def polar(a: np.ndarray) -> np.ndarray:
    """The orthogonal Procrustes factor P Q^T of a = P S Q^T."""
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_m_reference(taus: list[np.ndarray], alpha: float, share: float | None) -> np.ndarray:
    """TSV-M: top-k SVD of every task, k = floor(r * share) (share 1/T by default), concatenated, orthogonalised."""
    r = min(taus[0].shape)
    k = max(1, r // len(taus) if share is None else math.floor(r * share + 1e-9))
    svds = [np.linalg.svd(t, full_matrices=False) for t in taus]
    u_cat = np.concatenate([u[:, :k] for u, _, _ in svds], axis=1)
    s_cat = np.concatenate([s[:k] for _, s, _ in svds])
    v_cat = np.concatenate([vh[:k].T for _, _, vh in svds], axis=1)
    return alpha * polar(u_cat) @ np.diag(s_cat) @ polar(v_cat).T


def iso_c_reference(taus: list[np.ndarray], alpha: float) -> np.ndarray:
    """Iso-C: alpha * mean(S) * U V^T of the sum of the task matrices."""
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    return alpha * s.mean() * u @ vh


def iso_cts_reference(taus: list[np.ndarray], alpha: float, fraction: float) -> np.ndarray:
    """Iso-CTS: common top-k of the sum + each task's top directions orthogonal to it, isotropic spectrum."""
    r, n_tasks = min(taus[0].shape), len(taus)
    k = int(r * fraction)
    per_task = round((r - k) / n_tasks)
    k = r - per_task * n_tasks
    u, s, vh = np.linalg.svd(sum(taus), full_matrices=False)
    us, ss, vs = [u[:, :k]], [s[:k]], [vh[:k].T]
    projector = np.eye(taus[0].shape[0]) - u[:, :k] @ u[:, :k].T
    for t in taus:
        ut, st, vht = np.linalg.svd(projector @ t, full_matrices=False)
        us.append(ut[:, :per_task])
        ss.append(st[:per_task])
        vs.append(vht[:per_task].T)
    sigma = np.concatenate(ss)
    assert sigma.size == r
    return alpha * sigma.mean() * polar(np.concatenate(us, axis=1)) @ polar(np.concatenate(vs, axis=1)).T


def task_vectors(shape: tuple[int, ...], n_tasks: int, seed: int, decay: bool = False) -> list[dict[str, torch.Tensor]]:
    """Random task vectors: a matrix ``w`` of ``shape`` (a decaying spectrum if ``decay``), a bias and a 3-D tensor."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_tasks):
        w = torch.randn(shape, generator=g)
        if decay:  # well separated singular values, so a randomized SVD finds the top ones
            u, _, vh = torch.linalg.svd(w, full_matrices=False)
            w = (u * 0.7 ** torch.arange(min(shape), dtype=torch.float32)) @ vh
        out.append(
            {
                "w": w,
                "b": torch.randn(shape[0], generator=g),
                "conv": torch.randn(2, 3, 4, generator=g),
            }
        )
    return out


def assert_close(actual: torch.Tensor, expected: np.ndarray, rtol: float = RTOL) -> None:
    scale = float(np.abs(expected).max())
    err = float(np.abs(actual.double().numpy() - expected).max())
    assert err <= rtol * scale, f"max error {err:.3g} against max |entry| {scale:.3g}"


def mats(vectors: list[dict[str, torch.Tensor]]) -> list[np.ndarray]:
    return [v["w"].double().numpy() for v in vectors]


# ------------------------------------------------------------------------------------------------- TSV-M


@pytest.mark.parametrize("shape", [(12, 9), (7, 15)])
@pytest.mark.parametrize(("alpha", "share"), [(1.0, None), (0.7, None), (1.0, 0.5), (1.3, 0.2)])
def test_tsv_m_matches_the_paper(shape: tuple[int, int], alpha: float, share: float | None) -> None:
    vectors = task_vectors(shape, 3, seed=1)
    merged = TSVM(alpha=alpha, rank_share=share).combine(vectors)
    assert_close(merged["w"], tsv_m_reference(mats(vectors), alpha, share))


def test_tsv_m_one_task_full_rank_is_alpha_tau() -> None:
    vectors = task_vectors((10, 6), 1, seed=2)
    merged = TSVM(alpha=0.6, rank_share=1.0).combine(vectors)
    assert_close(merged["w"], 0.6 * vectors[0]["w"].double().numpy())


def test_tsv_m_default_share_is_one_over_t() -> None:
    vectors = task_vectors((12, 12), 4, seed=3)
    assert torch.allclose(TSVM().combine(vectors)["w"], TSVM(rank_share=0.25).combine(vectors)["w"], atol=1e-6)
    # each task gives r / T = 3 directions: the merge has rank 12
    assert int(torch.linalg.matrix_rank(TSVM().combine(vectors)["w"])) == 12
    assert int(torch.linalg.matrix_rank(TSVM(rank_share=1 / 12).combine(vectors)["w"])) == 4


def test_tsv_m_lowrank_is_close_to_full() -> None:
    vectors = task_vectors((60, 40), 4, seed=4, decay=True)
    full = TSVM().combine(vectors)["w"]
    low = TSVM(svd="lowrank", oversample=5, niter=2).combine(vectors)["w"]
    assert float((low - full).norm() / full.norm()) < 1e-4
    assert_close(low, tsv_m_reference(mats(vectors), 1.0, None), rtol=1e-3)


# ------------------------------------------------------------------------------------------------- Iso-C


@pytest.mark.parametrize("shape", [(12, 9), (7, 15)])
@pytest.mark.parametrize("alpha", [1.0, 1.5])
def test_iso_c_matches_the_paper(shape: tuple[int, int], alpha: float) -> None:
    vectors = task_vectors(shape, 3, seed=5)
    merged = IsoC(alpha=alpha).combine(vectors)["w"]
    assert_close(merged, iso_c_reference(mats(vectors), alpha))
    # the spectrum is flat: every singular value is alpha * the mean singular value of the sum
    expected = alpha * float(np.linalg.svd(sum(mats(vectors)), compute_uv=False).mean())
    s = torch.linalg.svdvals(merged.double())
    assert torch.allclose(s, torch.full_like(s, expected), rtol=1e-5)


def test_iso_c_lowrank_option_gives_the_same_merge() -> None:
    vectors = task_vectors((20, 16), 3, seed=6)
    full = IsoC().combine(vectors)["w"]
    low = IsoC(svd="lowrank", oversample=2).combine(vectors)["w"]
    assert float((low - full).norm() / full.norm()) < 1e-5


# ------------------------------------------------------------------------------------------------- Iso-CTS


@pytest.mark.parametrize("shape", [(12, 9), (7, 15), (16, 16)])
@pytest.mark.parametrize(("alpha", "fraction"), [(1.0, 0.8), (1.5, 0.8), (1.0, 0.5), (1.0, 0.0)])
def test_iso_cts_matches_the_paper(shape: tuple[int, int], alpha: float, fraction: float) -> None:
    vectors = task_vectors(shape, 3, seed=7)
    merged = IsoCTS(alpha=alpha, common_space_fraction=fraction).combine(vectors)["w"]
    assert_close(merged, iso_cts_reference(mats(vectors), alpha, fraction))
    s = torch.linalg.svdvals(merged.double())
    assert torch.allclose(s, s.mean().expand_as(s), rtol=1e-5), "the spectrum must be isotropic"


def failing_svd(fail_dtypes: tuple[torch.dtype, ...]) -> Any:
    """torch.linalg.svd that fails to converge, as LAPACK's gesdd can, on inputs of ``fail_dtypes``."""
    real = torch.linalg.svd

    def svd(a: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if a.dtype in fail_dtypes:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge (error code: 1).")
        return real(a, *args, **kwargs)

    return svd


@pytest.mark.parametrize(
    "fail", [(torch.float32,), (torch.float32, torch.float64)], ids=["float32 fails", "float32 and float64 fail"]
)
@pytest.mark.parametrize("make", [lambda: TSVM(), lambda: IsoC(), lambda: IsoCTS()], ids=["tsv_m", "iso_c", "iso_cts"])
def test_svd_convergence_failures_fall_back_to_the_same_merge(
    monkeypatch: pytest.MonkeyPatch, fail: tuple[torch.dtype, ...], make: Any
) -> None:
    # gesdd failed in float32 on a real SmolLM2 attention matrix inside Iso-CTS (the stacked bases it orthogonalises
    # have clustered singular values), which stopped a whole table: the decomposition is redone in float64, then by
    # QR iteration (scipy's gesvd), and the merge is the one the paper defines.
    vectors = task_vectors((16, 12), 3, seed=11)
    expected = make().combine(vectors)["w"]
    monkeypatch.setattr(torch.linalg, "svd", failing_svd(fail))
    merged = make().combine(vectors)["w"]
    assert merged.dtype == torch.float32
    assert_close(merged, expected.double().numpy())


def test_an_svd_that_never_converges_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    import scipy.linalg

    monkeypatch.setattr(torch.linalg, "svd", failing_svd((torch.float32, torch.float64)))

    def gesvd_fails(*args: Any, **kwargs: Any) -> Any:
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(scipy.linalg, "svd", gesvd_fails)
    with pytest.raises(ValueError, match=r"SVD of a \(16, 12\) matrix did not converge"):
        IsoC().combine(task_vectors((16, 12), 3, seed=11))


def test_iso_cts_with_only_a_common_space_is_iso_c() -> None:
    vectors = task_vectors((14, 10), 4, seed=8)
    cts = IsoCTS(alpha=1.2, common_space_fraction=1.0).combine(vectors)["w"]
    assert torch.allclose(cts, IsoC(alpha=1.2).combine(vectors)["w"], atol=1e-5)


def test_iso_cts_lowrank_is_close_to_full() -> None:
    vectors = task_vectors((60, 40), 3, seed=9, decay=True)
    full = IsoCTS(common_space_fraction=0.5).combine(vectors)["w"]
    # the flat spectrum weighs the weakest kept direction as much as the strongest, so the randomized SVD's error
    # in the tail shows directly: more oversampling or power iterations bring it down
    errors = []
    for oversample, niter in ((4, 3), (10, 2), (10, 4)):
        low = IsoCTS(common_space_fraction=0.5, svd="lowrank", oversample=oversample, niter=niter).combine(vectors)
        errors.append(float((low["w"] - full).norm() / full.norm()))
    assert errors[0] < 5e-2 and errors[1] < 1e-3 and errors[2] < errors[1]


# ------------------------------------------------------------------------------------------------- all three


METHODS: list[Any] = [
    lambda alpha: TSVM(alpha=alpha),
    lambda alpha: IsoC(alpha=alpha),
    lambda alpha: IsoCTS(alpha=alpha),
]


@pytest.mark.parametrize("make", METHODS, ids=["tsv_m", "iso_c", "iso_cts"])
def test_non_matrix_parameters_follow_task_arithmetic(make: Any) -> None:
    vectors = task_vectors((9, 8), 3, seed=10)
    merged = make(0.9).combine(vectors)
    mean_ta = TaskArithmetic(scaling=0.9 / 3).combine(vectors)  # alpha * mean_t tau_t
    for key in ("b", "conv"):
        assert torch.allclose(merged[key], mean_ta[key], atol=1e-6), key


@pytest.mark.parametrize("make", METHODS, ids=["tsv_m", "iso_c", "iso_cts"])
def test_same_bytes_whatever_the_thread_count(make: Any) -> None:
    vectors = task_vectors((96, 80), 3, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = make(1.0).combine(vectors)["w"]
        torch.set_num_threads(max(2, threads))
        many = make(1.0).combine(vectors)["w"]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


@pytest.mark.parametrize(
    ("cls", "kwargs", "option"),
    [
        (TSVM, {"rank_share": 0.0}, "rank_share"),
        (TSVM, {"rank_share": 1.5}, "rank_share"),
        (TSVM, {"alpha": -1.0}, "alpha"),
        (TSVM, {"svd": "qr"}, "svd"),
        (TSVM, {"oversample": -1}, "oversample"),
        (IsoC, {"niter": 1.5}, "niter"),
        (IsoC, {"alpha": math.nan}, "alpha"),
        (IsoCTS, {"common_space_fraction": 1.2}, "common_space_fraction"),
        (IsoCTS, {"seed": -3}, "seed"),
    ],
)
def test_bad_options_are_refused(cls: type, kwargs: dict[str, Any], option: str) -> None:
    with pytest.raises(ValueError, match=option):
        cls(**kwargs)
