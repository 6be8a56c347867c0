"""The run flow's stages used directly: the grid searches of :mod:`mergelab.tuning` on stand-in candidates (no
model, no suite data), and methods named inside methods resolved against the run's config."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import pytest
from omegaconf import OmegaConf

from mergelab.method_config import named_method_config, resolving_against
from mergelab.methods import DARE, MetaGPT
from mergelab.methods.base import grid_candidates
from mergelab.run import build
from mergelab.tuning import (
    ExhaustiveSearch,
    NoSearch,
    SuccessiveHalving,
    TuningOptions,
    grid_search,
)


class Suite:
    """What successive halving uses of a suite: ``scoring_subset``, noting the subset in force."""

    def __init__(self) -> None:
        self.subset: int | None = None

    @contextmanager
    def scoring_subset(self, n: int) -> Iterator[None]:
        self.subset = n
        try:
            yield
        finally:
            self.subset = None


class Merge:
    """A candidate whose average accuracy is ``full`` on the whole split and ``part`` on a subset."""

    def __init__(self, i: int, full: float, part: float, suite: Suite, scored: list[tuple[int, str, Any]]) -> None:
        self.i, self.full, self.part, self.suite, self.scored = i, full, part, suite, scored
        self.discarded = False

    def score(self, split: str, tasks: list[str] | None = None, kwargs: Mapping[str, Any] | None = None) -> dict:
        assert not self.discarded
        self.scored.append((self.i, split, self.suite.subset))
        value = self.part if self.suite.subset is not None else self.full
        return {"a": {"acc": value + 0.1}, "b": {"acc": value - 0.1}}  # averages to value

    def discard(self) -> None:
        self.discarded = True


def stand_ins(full: list[float], part: list[float]) -> tuple[list[Merge], list[int], Suite, list, Callable]:
    """Candidates over a grid of ``len(full)`` points, the indices prepared (in order), the suite, the scorings
    ``(candidate, split, subset)`` and the ``prepare`` the searches call."""
    suite: Suite = Suite()
    scored: list[tuple[int, str, Any]] = []
    prepared: list[int] = []
    merges = [Merge(i, f, p, suite, scored) for i, (f, p) in enumerate(zip(full, part, strict=True))]

    def prepare(i: int) -> Merge:
        prepared.append(i)
        return merges[i]

    return merges, prepared, suite, scored, prepare


GRID = [{"scaling": s} for s in (0.1, 0.3, 0.5, 0.7)]


def test_exhaustive_search_scores_every_point_and_keeps_the_first_best() -> None:
    merges, prepared, _, scored, prepare = stand_ins([0.2, 0.6, 0.6, 0.4], [0.0] * 4)
    tuned = ExhaustiveSearch("validation", {}).search("ta", GRID, prepare)
    assert prepared == [0, 1, 2, 3] and [(i, s) for i, s, _ in scored] == [(i, "validation") for i in range(4)]
    assert tuned.merge is merges[1] and tuned.params == {"scaling": 0.3}  # a tie keeps the earlier point
    assert tuned.value == pytest.approx(0.6) and tuned.tune_scores is not None
    assert [m.discarded for m in merges] == [True, False, True, True]
    assert [t["params"]["scaling"] for t in tuned.tried] == [0.1, 0.3, 0.5, 0.7]
    assert [t["validation_avg_acc"] for t in tuned.tried] == pytest.approx([0.2, 0.6, 0.6, 0.4])


def test_successive_halving_rescores_the_best_on_the_subset_on_the_whole_split() -> None:
    # Best on the subset: points 2 and 0 (point 3 ties with 0 and comes later); on the whole split 0 beats 2.
    merges, prepared, suite, scored, prepare = stand_ins([0.9, 0.1, 0.5, 0.99], [0.5, 0.2, 0.8, 0.5])
    tuned = SuccessiveHalving("validation", {}, suite, subset=8, keep=2).search("ta", GRID, prepare)
    assert prepared == [0, 1, 2, 3]  # each prepared once: the survivors are not prepared again
    subset_round = [(i, n) for i, _, n in scored[:4]]
    assert subset_round == [(0, 8), (1, 8), (2, 8), (3, 8)]
    assert [(i, n) for i, _, n in scored[4:]] == [(0, None), (2, None)]  # survivors in grid order, whole split
    assert tuned.merge is merges[0] and tuned.value == pytest.approx(0.9)
    assert [m.discarded for m in merges] == [False, True, True, True]
    assert [sorted(t) for t in tuned.tried] == [
        ["params", "validation_avg_acc", "validation_subset_avg_acc"],
        ["params", "validation_subset_avg_acc"],
        ["params", "validation_avg_acc", "validation_subset_avg_acc"],
        ["params", "validation_subset_avg_acc"],
    ]


def test_halving_a_grid_no_larger_than_keep_is_exhaustive() -> None:
    merges, _, suite, scored, prepare = stand_ins([0.3, 0.7], [0.9, 0.1])
    tuned = SuccessiveHalving("validation", {}, suite, subset=8, keep=2).search("ta", GRID[:2], prepare)
    assert [n for _, _, n in scored] == [None, None] and tuned.merge is merges[1]
    assert all("validation_subset_avg_acc" not in t for t in tuned.tried)


def test_one_candidate_is_prepared_not_scored_and_the_strategy_follows_the_options() -> None:
    merges, prepared, suite, scored, prepare = stand_ins([0.5], [0.5])
    tuned = NoSearch().search("ta", [{"k": 20}], prepare)
    assert prepared == [0] and scored == [] and tuned.merge is merges[0] and tuned.tried == []
    assert math.isnan(tuned.value) and tuned.tune_scores is None and tuned.params == {"k": 20}
    halving, exhaustive = TuningOptions(), TuningOptions(strategy="exhaustive")
    assert isinstance(grid_search(halving, 1, suite, "validation", {}), NoSearch)
    assert isinstance(grid_search(halving, 4, suite, "validation", {}), SuccessiveHalving)
    chosen = grid_search(exhaustive, 4, suite, "validation", {"precision": "bf16-mixed"})
    assert type(chosen) is ExhaustiveSearch and chosen.kwargs == {"precision": "bf16-mixed"}


def test_a_method_named_inside_a_method_resolves_against_the_runs_config() -> None:
    # della_linear's `seed: ${seed}`: the run's seed inside a run, the root config's default (0) outside one.
    assert named_method_config("della_linear")["seed"] == 0
    assert DARE(merge="della_linear").inner.seed == 0  # type: ignore[attr-defined]
    run_cfg = OmegaConf.create({"seed": 7, "method": {"name": "dare"}})
    with resolving_against(run_cfg):
        assert DARE(merge="della_linear").inner.seed == 7  # type: ignore[attr-defined]
        # Through a grid key too: metagpt's sparsify given by name, its option tuned.
        node = {"_target_": "mergelab.methods.MetaGPT", "name": "m", "sparsify": "dare", "grid": {"sparsify.p": [0.2]}}
        ((params, method),) = grid_candidates(node, True, build)
    assert isinstance(method, MetaGPT)
    assert "_named_method_" not in run_cfg and params == {"sparsify.p": 0.2}
    assert method.sparsifier.p == 0.2 and method.sparsifier.seed == 7  # type: ignore[union-attr]
    # The nested default of the named config (dare's `/method@merge: task_arithmetic`) is Hydra's composition.
    assert named_method_config("dare")["merge"]["_target_"] == "mergelab.methods.TaskArithmetic"
