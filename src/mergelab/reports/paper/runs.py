"""Reading the runs a paper report is built from: run dirs and sweep dirs, their ``metrics.json`` and ``config.yaml``.

:func:`load_run` reads and checks one run dir into a :class:`Run` (errors name the file and key at fault);
:func:`find_runs` expands sweep dirs into their jobs and refuses runs scored on different suites or splits."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergelab.reports.paper.schema import ReportError, mapping, number, strings
from mergelab.reports.tables import eval_subset, subset_phrase


def display(path: Path) -> str:
    """``path`` relative to the working dir when it is under it (shorter in tables and messages)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Run:
    """One evaluated run: its dir, its ``metrics.json`` and (when present) its resolved ``config.yaml``."""

    path: Path
    results: Mapping[str, Any]
    config: Mapping[str, Any] | None = None

    @property
    def rows(self) -> Mapping[str, Mapping[str, Any]]:
        """The run's result rows (row name -> scores, averages, params...)."""
        return self.results["rows"]

    @property
    def tune_key(self) -> str:
        """The row key of the score a tuned run chose by (``validation_avg_acc``)."""
        return f"{self.results.get('tune_split') or 'validation'}_avg_acc"

    @property
    def tasks(self) -> list[str]:
        """The run's tasks: its ``tasks`` list, then any other task its rows were scored on."""
        names = list(self.results.get("tasks") or [])
        return list(dict.fromkeys([*names, *(t for r in self.rows.values() for t in r["scores"])]))

    @property
    def records_subset(self) -> bool:
        """Whether the run records what it scored of each task (its ``config.yaml`` does)."""
        return self.config is not None

    @property
    def subset(self) -> tuple[str, float] | None:
        """``(config key, value)`` when the run scored a subset of each task (``eval.max_eval_examples`` or
        ``eval.limit``); None when it scored every example, or does not record it (see :attr:`records_subset`)."""
        return eval_subset(self.config)

    def label(self, row: str) -> str:
        """``<run dir>:<row>``, as messages and the report name a row."""
        return f"{display(self.path)}:{row}"

    def row_options(self, row: str) -> dict[str, Any]:
        """The method options a row was made with, as far as the run records them.

        From ``config.yaml`` (``table.methods.<row>`` in table experiments, else ``method`` when its name is the
        row), overlaid by the row's ``params`` (a tuned row records its chosen grid point there).
        """
        options: dict[str, Any] = {}
        cfg = self.config or {}
        table = (cfg.get("table") or {}).get("methods") if isinstance(cfg.get("table"), Mapping) else None
        method = cfg.get("method")
        if isinstance(table, Mapping) and isinstance(table.get(row), Mapping):
            options.update(table[row])
        elif isinstance(method, Mapping) and method.get("name") == row:
            options.update(method)
        options.update(self.rows[row].get("params") or {})
        return options


def _check_results(results: Any, where: str) -> Mapping[str, Any]:
    """Raise a ReportError naming the key at fault when ``results`` is not an evaluated run's metrics."""
    results = mapping(results, where)
    if "merged_model" in results and ("rows" not in results or results.get("suite", "") is None):
        raise ReportError(f"{where}: a merge-only run (checkpoint pool, eval=none) has no scores to report")
    if "rows" not in results:
        raise ReportError(f"{where}: missing key 'rows'")
    rows = mapping(results["rows"], f"{where}: rows")
    for name, row in rows.items():
        row = mapping(row, f"{where}: rows.{name}")
        if "scores" not in row:
            raise ReportError(f"{where}: rows.{name}: missing key 'scores'")
        for task, metrics in mapping(row["scores"], f"{where}: rows.{name}.scores").items():
            for metric, value in mapping(metrics, f"{where}: rows.{name}.scores.{task}").items():
                number(value, f"{where}: rows.{name}.scores.{task}.{metric}")
        if row.get("params") is not None:
            mapping(row["params"], f"{where}: rows.{name}.params")
    if "tasks" in results:
        strings(results["tasks"], f"{where}: tasks")
    return results


def load_run(run_dir: str | Path) -> Run:
    """Read and check one run dir (``metrics.json``, and ``config.yaml`` when there)."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.json"
    try:
        results = json.loads(metrics.read_text())
    except FileNotFoundError:
        raise ReportError(f"{run_dir}: no metrics.json (not a finished mergelab run)") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{metrics}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    results = _check_results(results, str(metrics))
    config = None
    if (run_dir / "config.yaml").is_file():
        try:
            config = yaml.safe_load((run_dir / "config.yaml").read_text())
        except yaml.YAMLError as e:
            raise ReportError(f"{run_dir / 'config.yaml'}: not valid YAML: {e}") from None
        config = mapping(config, str(run_dir / "config.yaml"))
    return Run(run_dir, results, config)


def find_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The runs under ``paths``: each a run dir (with ``metrics.json``) or a sweep dir (job subdirs with one).

    All runs must report the same suite and split: rows scored on different data are not one table.
    """
    dirs: list[Path] = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "metrics.json":
            p = p.parent
        if not p.is_dir():
            raise ReportError(f"{p}: no such run or sweep dir")
        if (p / "metrics.json").is_file():
            dirs.append(p)
            continue
        # Hydra job dirs are 0, 1, ..., 10: numeric order, as the sweep summary lists them.
        jobs = sorted(p.glob("*/metrics.json"), key=lambda m: (len(m.parent.name), m.parent.name))
        if not jobs:
            raise ReportError(f"{p}: no metrics.json in it or in its job subdirs (not a run or sweep dir)")
        dirs.extend(m.parent for m in jobs)
    seen: set[Path] = set()
    runs = []
    for d in dirs:
        if d.resolve() not in seen:
            seen.add(d.resolve())
            runs.append(load_run(d))
    for key in ("suite", "report_split"):
        values: dict[Any, list[str]] = {}
        for r in runs:
            values.setdefault(r.results.get(key), []).append(display(r.path))
        if len(values) > 1:
            listing = "; ".join(f"{v!r}: {', '.join(ds)}" for v, ds in values.items())
            raise ReportError(f"the runs differ in '{key}' ({listing}): report runs of one suite and split together")
    subsets: dict[Any, list[str]] = {}
    for r in runs:
        if r.records_subset:
            subsets.setdefault(r.subset[1] if r.subset else None, []).append(display(r.path))
    if len(subsets) > 1:
        listing = "; ".join(f"{subset_phrase(v) or 'every example'}: {', '.join(ds)}" for v, ds in subsets.items())
        raise ReportError(
            f"the runs differ in the examples scored per task ({listing}; eval.max_eval_examples / eval.limit): "
            "report runs scored on the same examples together"
        )
    return runs


def subset_line(runs: Sequence[Run]) -> str:
    """What a report says of the examples its runs scored: that they scored a subset (runs of one report score the
    same, see :func:`find_runs`), and which runs do not record it (no ``config.yaml``); empty when every run
    records scoring every example."""
    parts = []
    subset = next((r.subset for r in runs if r.subset), None)
    if subset is not None:
        parts.append(f"scored on a subset: {subset_phrase(subset[1])} ({subset[0]}={subset[1]}), not the whole split")
    unknown = [display(r.path) for r in runs if not r.records_subset]
    if unknown:
        listed = ", ".join(unknown[:4]) + (f" and {len(unknown) - 4} more" if len(unknown) > 4 else "")
        parts.append(f"whether {listed} scored a subset is not recorded (no config.yaml)")
    return "; ".join(parts)
