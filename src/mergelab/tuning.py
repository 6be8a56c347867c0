"""How a method row picks its grid point: the ``tuning`` options and one search object per strategy.

``tune=true`` builds a candidate per point of a method's ``grid``; :func:`grid_search` gives the search for a row:
:class:`NoSearch` for a single candidate (nothing to tune), :class:`ExhaustiveSearch` (every point on the whole
tune split) or :class:`SuccessiveHalving` (every point on a seeded subset, the best ``keep`` on the whole split).
Each returns the chosen candidate (the others discarded) with what was tried, for the row's ``tuning`` record.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from mergelab.merge_candidates import Candidate
from mergelab.suites import scoring as ev

#: Tuning's console lines are the run's (the logger name is part of each line).
log = logging.getLogger("mergelab.run")

#: The ``i``-th grid point's candidate, its method prepared (AWD's fit) and ready to score.
PrepareCandidate = Callable[[int], Candidate]


class TuningOptions:
    """How ``tune=true`` searches a method's grid (the config's ``tuning`` node), checked before any work.

    ``strategy``: ``exhaustive`` scores every point on the whole tune split; ``halving`` scores every point on the
    first ``subset`` examples of each task (the seeded prefix of what is scored otherwise), then the best ``keep`` on
    the whole split, and picks among those. ``precision``: Lightning's precision for the tuning scores (e.g.
    ``bf16-mixed``); null: ``trainer.precision``. Reported scores always use ``trainer.precision``.
    """

    def __init__(
        self, strategy: str = "halving", subset: int = 64, keep: int = 3, precision: str | None = None
    ) -> None:
        if strategy not in ("exhaustive", "halving"):
            raise ValueError(f"tuning.strategy must be 'exhaustive' or 'halving', got {strategy!r}")
        for key, value in (("subset", subset), ("keep", keep)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tuning.{key} must be an integer >= 1, got {value!r}")
        self.strategy, self.subset, self.keep = strategy, int(subset), int(keep)
        self.precision = None if precision is None else str(precision)

    @classmethod
    def from_config(cls, node: Any) -> TuningOptions:
        """From the ``tuning`` config node (None: the defaults); an unknown key is named."""
        options = dict(node or {})
        known = ("strategy", "subset", "keep", "precision")
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"tuning: unknown key(s) {unknown}; known: {list(known)}")
        return cls(**options)


@dataclass
class TunedPoint:
    """A row's chosen candidate: its grid point, its tune-split average (NaN when nothing was tuned) and scores (None
    then), and every point tried (``{"params": ..., "<split>[_subset]_avg_acc": ...}``, in grid order)."""

    params: dict[str, Any]
    merge: Candidate
    value: float = float("nan")
    tune_scores: ev.Scores | None = None
    tried: list[dict[str, Any]] = field(default_factory=list)


class GridSearch(Protocol):
    """How a row's grid is searched."""

    def search(self, row: str, grid: Sequence[Mapping[str, Any]], prepare: PrepareCandidate) -> TunedPoint:
        """The chosen candidate of row ``row`` among its ``grid`` points (``prepare(i)`` gives the i-th one)."""
        ...


class NoSearch:
    """A row with one candidate: prepared, not scored on the tune split."""

    def search(self, row: str, grid: Sequence[Mapping[str, Any]], prepare: PrepareCandidate) -> TunedPoint:
        """The only candidate."""
        return TunedPoint(dict(grid[0]), prepare(0))


class ExhaustiveSearch:
    """Every grid point scored on the whole tune ``split`` (under ``kwargs``: tuning's precision); the first best
    point is kept."""

    def __init__(self, split: str, kwargs: Mapping[str, Any]) -> None:
        self.split, self.kwargs = split, kwargs

    def search(self, row: str, grid: Sequence[Mapping[str, Any]], prepare: PrepareCandidate) -> TunedPoint:
        """The best of every point of ``grid``."""
        return self.best_of(row, [(dict(params), i) for i, params in enumerate(grid)], prepare, [])

    def best_of(
        self,
        row: str,
        points: Sequence[tuple[dict[str, Any], int | Candidate]],
        prepare: PrepareCandidate,
        tried: list[dict[str, Any]],
    ) -> TunedPoint:
        """The best of ``points`` (grid index, prepared here, or a candidate already prepared) on the whole split,
        each recorded in ``tried`` (beside a record of the same point, if any); the others are discarded."""
        best: TunedPoint | None = None
        for params, point in points:
            merge = prepare(point) if isinstance(point, int) else point
            scores = merge.score(self.split, kwargs=self.kwargs)
            value = ev.average(scores)
            record = next((r for r in tried if r["params"] == params), None)
            if record is None:
                tried.append(record := {"params": params})
            record[f"{self.split}_avg_acc"] = value
            log.info("%s %s: %s avg acc %.4f", row, params, self.split, value)
            if best is None or value > best.value:
                if best is not None:
                    best.merge.discard()
                best = TunedPoint(params, merge, value, scores, tried)
            else:
                merge.discard()
        assert best is not None
        return best


class SuccessiveHalving(ExhaustiveSearch):
    """Every grid point scored on the first ``subset`` examples of each task (``suite.scoring_subset``), then the best
    ``keep`` (ties: the earlier point) on the whole split, as :class:`ExhaustiveSearch` picks among them. A grid of at
    most ``keep`` points is searched exhaustively."""

    def __init__(self, split: str, kwargs: Mapping[str, Any], suite: Any, subset: int, keep: int) -> None:
        super().__init__(split, kwargs)
        self.suite, self.subset, self.keep = suite, subset, keep

    def search(self, row: str, grid: Sequence[Mapping[str, Any]], prepare: PrepareCandidate) -> TunedPoint:
        """The best of the ``keep`` best points on the subset."""
        if len(grid) <= self.keep:
            return super().search(row, grid, prepare)
        tried: list[dict[str, Any]] = []
        short: list[tuple[float, int, dict[str, Any], Candidate]] = []  # the best `keep` so far, best first
        for i, point in enumerate(grid):
            params, merge = dict(point), prepare(i)
            with self.suite.scoring_subset(self.subset):
                value = ev.average(merge.score(self.split, kwargs=self.kwargs))
            tried.append({"params": params, f"{self.split}_subset_avg_acc": value})
            log.info("%s %s: %s subset (%d) avg acc %.4f", row, params, self.split, self.subset, value)
            short = sorted([*short, (value, i, params, merge)], key=lambda x: (-x[0], x[1]))
            for dropped in short[self.keep :]:
                dropped[3].discard()
            short = short[: self.keep]
        survivors = [(params, merge) for _, _, params, merge in sorted(short, key=lambda x: x[1])]
        return self.best_of(row, survivors, prepare, tried)


def grid_search(
    options: TuningOptions, points: int, suite: Any, split: str | None, kwargs: Mapping[str, Any]
) -> GridSearch:
    """The search for a row of ``points`` candidates: none for one, else ``options.strategy``'s on ``split``."""
    if points == 1:
        return NoSearch()
    assert split is not None  # a grid is searched only with a suite (checked before any work)
    if options.strategy == "halving":
        return SuccessiveHalving(split, kwargs, suite, options.subset, options.keep)
    return ExhaustiveSearch(split, kwargs)
