"""What the stages of a run share: the run as built before its first row (:class:`RunSetup`) and what its table's
rows produced (:class:`TableProgress`). The stages are :mod:`mergelab.run` (config checks, building, the reference
rows), :mod:`mergelab.method_rows` (each method row tuned and scored, a failed one recorded) and
:mod:`mergelab.run_results` (merged model, provenance, ``metrics.json``, tables and loggers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from mergelab.merge_candidates import Candidate
    from mergelab.methods.base import MergeMethod
    from mergelab.pools.base import ModelPool
    from mergelab.reports.live import LiveTable
    from mergelab.suites.base import EvalSuite
    from mergelab.suites.scoring import Scores
    from mergelab.tuning import TuningOptions


@dataclass
class RunSetup:
    """The run once its config is checked and its pool set up; read, never changed, by the later stages.

    ``tune_kwargs`` are ``trainer_kwargs`` (the same object) unless tuning scores in another precision;
    ``candidates`` holds each table row's ``(grid point, method)`` list; ``zero``: whether this process writes the
    results (rank 0); ``columns``: the table's task columns.
    """

    cfg: DictConfig
    out_dir: Path
    trainer_kwargs: dict[str, Any]
    tune_kwargs: dict[str, Any]
    tuning: TuningOptions
    method_cfgs: dict[str, DictConfig]
    candidates: dict[str, list[tuple[dict[str, Any], MergeMethod]]]
    pool: ModelPool
    suite: EvalSuite | None
    loggers: list[Any]
    zero: bool
    columns: list[str]
    live: LiveTable

    @property
    def report(self) -> str | None:
        """The split the table reports (None without a suite)."""
        return self.suite.report_split if self.suite is not None else None

    @property
    def tune_split(self) -> str | None:
        """The split grids are tuned on and the objective is read from (None without a suite)."""
        return self.suite.tune_split if self.suite is not None else None


@dataclass
class TableProgress:
    """What the table's rows produced so far.

    ``kept``: the last finished row's merge, the run's merged model (``last`` names its row; ``last_done`` the row
    before it that finished, which a failure of ``last`` falls back to); ``chosen``: each finished row's method;
    ``failed``: each failed row's error; ``objective``: the tune-split average of the last row scored.
    """

    timings: dict[str, float]
    expert_scores: Scores | None = None
    objective: float = float("nan")
    kept: Candidate | None = None
    last: str = ""
    last_done: str = ""
    chosen: dict[str, MergeMethod] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
