"""A run's table as it fills: every finished row is written (results.md, results.csv, the chart, atomically), named on
the console with the run's progress and sent to the loggers, so a table that takes many minutes shows its first
results within a minute or two and keeps what it finished if it is stopped."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mergelab.reports.tables import write_reports

log = logging.getLogger(__name__)

#: Created in an output dir before the first result is written: result files beside it without ``metrics.json``
#: are an unfinished mergelab run's, which its rerun replaces (anything else in the way is refused, never deleted).
RESULTS_MARKER = ".mergelab-results"


def clock(seconds: float) -> str:
    """``seconds`` as the console shows a duration: ``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class LiveTable:
    """The rows of a run, written and logged as each one finishes.

    Args:
        out_dir: the run dir (results.md, results.csv and the chart are rewritten there after every row).
        methods: the method rows the run will add, in order (the progress line counts them).
        columns: the table's task columns; ``title``: its title (while rows are missing it says how many are done).
        subset: the examples scored per task when not all were (``eval.max_eval_examples`` or lm-eval's ``limit``),
            stated in the table's and the chart's titles and in a column of results.csv (see
            :func:`~mergelab.reports.tables.subset_phrase`).
        chart: whether to draw the chart; ``files``: whether to write files at all (False: a merge-only run, or a
            rank other than 0 of a multi-process run).
        loggers: Lightning loggers, each row logged (and flushed) as it finishes; ``split``: the report split.
        started: when the run started (``time.perf_counter()``; default: now), which the progress line's elapsed
            time counts from (building the experts included).
    """

    def __init__(
        self,
        out_dir: Path,
        methods: Sequence[str],
        columns: Sequence[str],
        title: str,
        subset: float | None,
        chart: bool,
        files: bool,
        loggers: Sequence[Any] = (),
        split: str | None = None,
        started: float | None = None,
    ) -> None:
        self.out_dir, self.methods, self.columns, self.title = out_dir, list(methods), list(columns), title
        self.subset, self.chart, self.files, self.loggers, self.split = subset, chart, files, list(loggers), split
        self.rows: dict[str, dict[str, Any]] = {}
        self.done: list[str] = []  # method rows finished (or failed), in order
        self.method_seconds: list[float] = []
        self.start = time.perf_counter() if started is None else started
        self.steps = 0  # logger steps used by rows so far

    def add(self, name: str, row: dict[str, Any], extra: Mapping[str, dict[str, Any]] | None = None) -> None:
        """A reference row (pretrained, experts) is in: write the table and log the row."""
        self.rows[name] = row
        self._log(name, row)
        for other, value in (extra or {}).items():
            self.rows[other] = value
            self._log(other, value)
        self.write()

    def finish_row(
        self, name: str, row: dict[str, Any] | None, seconds: float, extra: Mapping[str, dict[str, Any]] | None = None
    ) -> None:
        """Method row ``name`` finished after ``seconds`` (``row`` None: it failed): write the table, log the row
        and print one line with the row's average, its time, and the run's progress and ETA."""
        self.done.append(name)
        self.method_seconds.append(seconds)
        if row is not None:
            self.add(name, row, extra)
        else:
            self.write()
        elapsed = time.perf_counter() - self.start
        left = len(self.methods) - len(self.done)
        eta = f"ETA {clock(left * sum(self.method_seconds) / len(self.method_seconds))}" if left else "done"
        what = "failed" if row is None else self._summary(row)
        log.info(
            "row %d/%d %s: %s (%s) · elapsed %s, %s",
            len(self.done),
            len(self.methods),
            name,
            what,
            clock(seconds),
            clock(elapsed),
            eta,
        )

    @staticmethod
    def _summary(row: Mapping[str, Any]) -> str:
        avg = row.get("avg_acc")
        return "merged" if avg is None else f"avg acc {100 * avg:.2f}"

    def _log(self, name: str, row: Mapping[str, Any]) -> None:
        if not self.loggers:
            return
        from mergelab.reports.loggers import log_row  # Lightning's loggers: only a run that has loggers needs them

        log_row(self.loggers, self.split, name, row, step=self.steps)
        self.steps += 1

    def write(self, final: bool = False) -> None:
        """results.md, results.csv and the chart, atomically; the title says how many rows are done unless
        ``final``."""
        if not self.files or not self.rows:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / RESULTS_MARKER).touch()  # results are mergelab's from here on: a rerun may replace them
        title = self.title
        if not final and len(self.done) < len(self.methods):
            title += f" · {len(self.done)} of {len(self.methods)} methods done"
        write_reports(self.rows, self.columns, self.out_dir, title, chart=self.chart, subset=self.subset)
