"""``mergelab-report``: a run's (or a sweep's) rows in a paper's table layout, next to the paper's published numbers.

A paper table is a YAML file in ``data/papers/`` (one per published table): the paper, the model, the tasks in the
paper's order (with the names a mergelab suite may give them), the metric, how the paper defines its normalized
average, and per method the published per-task scores and averages plus the mergelab rows that hold that method.

The report puts, for every method of the table, our score and the paper's ("ours / paper") per task, on average
and as the paper's normalized average (computed from the run's own experts row), with the differences of the
averages; it prints the markdown and writes ``report.md``, ``report.csv`` and ``report.png``::

    mergelab-report outputs/multirun/2025-01-01/12-00-00 --table awd_vit_b32
    mergelab-report outputs/runs/a outputs/runs/b --table metagpt_llama2_7b --out reports/llama --overwrite
    mergelab-report --list
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergelab.outputs import atomic_save_figure, atomic_write_text, guard_output_dir

# As mergelab.cli.ROOT_DIR (not imported, to keep this command free of Hydra): data/ and conf/ sit at the
# repository root of the editable install.
ROOT_DIR = Path(__file__).resolve().parents[2]
PAPERS_DIR = ROOT_DIR / "data" / "papers"

# How a paper turns per-task scores into a "normalized" average, against each task's expert:
#   mean_of_ratios: mean over tasks of merged / expert (MetaGPT's "Nor. Avg", mergelab's "Norm acc");
#   ratio_of_means: mean merged / mean expert (the merged average over the individual experts' average);
#   none: the table reports no normalized average.
DEFINITIONS = ("mean_of_ratios", "ratio_of_means", "none")
# Display scale of a fraction (what runs store): percentages, or plain ratios (MetaGPT's Nor. Avg is 1.31).
UNITS = {"percent": 100.0, "ratio": 1.0}
# Rows every evaluated run has; they carry no validation score, so several runs must agree on them.
REFERENCE_ROWS = ("experts", "pretrained")
REPORT_FILES = ("report.md", "report.csv", "report.png")
MISSING = "—"


class ReportError(ValueError):
    """A bad table, run dir, metrics.json or option; the message names the file and key at fault."""


# ----------------------------------------------------------------------------------------------------------------
# Paper tables


@dataclass(frozen=True)
class PaperTask:
    """A task column: the paper's name, the names a mergelab suite may use for it, and documentation fields."""

    name: str
    aliases: tuple[str, ...] = ()
    info: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class PaperMethod:
    """A method row: published numbers (``None`` where not published) and the mergelab rows that hold it.

    ``method`` names ``conf/method/<method>.yaml`` (or the ``experts`` / ``pretrained`` reference rows; ``None``
    when mergelab has no such method); ``rows`` are the run row names that may hold it; ``options`` are the method
    options a row must have (where its run records them) to count, e.g. ``{merge: task_arithmetic}`` for AWD-TA.
    """

    name: str
    method: str | None
    rows: tuple[str, ...]
    options: Mapping[str, Any]
    scores: Mapping[str, float]
    average: float | None = None
    normalized: float | None = None
    source: str | None = None


@dataclass(frozen=True)
class PaperTable:
    """One published table (see ``data/papers/*.yaml``)."""

    name: str
    title: str
    paper: Mapping[str, Any] | None
    model: str
    metric: str
    metric_key: str
    unit: str
    decimals: int
    normalized: str
    normalized_unit: str
    normalized_decimals: int
    tasks: tuple[PaperTask, ...]
    methods: tuple[PaperMethod, ...]
    path: Path

    @property
    def has_published(self) -> bool:
        """Whether the table holds any published number (mergelab's own layout holds none)."""
        return any(m.scores or m.average is not None or m.normalized is not None for m in self.methods)

    def method(self, name: str) -> PaperMethod:
        """The method row called ``name``."""
        for m in self.methods:
            if m.name == name:
                return m
        raise ReportError(f"table {self.name}: no method '{name}' (methods: {', '.join(m.name for m in self.methods)})")


def available_tables(tables_dir: str | Path = PAPERS_DIR) -> list[str]:
    """Names of the tables in ``tables_dir`` (the YAML files' stems)."""
    return sorted(p.stem for p in Path(tables_dir).glob("*.yaml"))


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReportError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _optional_number(value: Any, where: str) -> float | None:
    return None if value is None else _number(value, where)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ReportError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReportError(f"{where}: expected a list of names, got {value!r}")
    return tuple(value)


def _choice(value: Any, choices: Sequence[str], where: str) -> str:
    if value not in choices:
        raise ReportError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


def _decimals(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 6:
        raise ReportError(f"{where}: expected a number of decimals in 0..6, got {value!r}")
    return value


def load_table(table: str | Path, tables_dir: str | Path = PAPERS_DIR) -> PaperTable:
    """Load and check a paper table: a name in ``tables_dir`` (e.g. ``awd_vit_b32``) or a path to a YAML file."""
    path = Path(table)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        path = Path(tables_dir) / f"{table}.yaml"
        if not path.is_file():
            raise ReportError(
                f"unknown table '{table}'; available: {', '.join(available_tables(tables_dir)) or '(none)'}"
                f" (in {tables_dir}), or pass a path to a table YAML"
            )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: not valid YAML: {e}") from None
    doc = _mapping(raw, str(path))
    for key in ("name", "title", "metric", "tasks", "methods"):
        if key not in doc:
            raise ReportError(f"{path}: missing key '{key}'")
    if doc["name"] != path.stem:
        raise ReportError(f"{path}: name: {doc['name']!r} differs from the file name {path.stem!r}")

    tasks = []
    if not isinstance(doc["tasks"], list) or not doc["tasks"]:
        raise ReportError(f"{path}: tasks: expected a non-empty list")
    for i, t in enumerate(doc["tasks"]):
        where = f"{path}: tasks[{i}]"
        t = _mapping(t, where)
        if not isinstance(t.get("name"), str):
            raise ReportError(f"{where}: missing the task's name")
        info = {k: v for k, v in t.items() if k not in ("name", "aliases")}
        tasks.append(PaperTask(t["name"], _strings(t.get("aliases", []), f"{where}.aliases"), info))
    task_names = [t.name for t in tasks]
    if len(set(task_names)) != len(task_names):
        raise ReportError(f"{path}: tasks: duplicate task names in {task_names}")

    methods = []
    if not isinstance(doc["methods"], list) or not doc["methods"]:
        raise ReportError(f"{path}: methods: expected a non-empty list")
    for i, m in enumerate(doc["methods"]):
        m = _mapping(m, f"{path}: methods[{i}]")
        if not isinstance(m.get("name"), str):
            raise ReportError(f"{path}: methods[{i}]: missing the method's name")
        where = f"{path}: methods[{i}] ({m['name']})"
        unknown = set(m) - {"name", "method", "rows", "options", "scores", "average", "normalized", "source"}
        if unknown:
            raise ReportError(f"{where}: unknown keys {sorted(unknown)}")
        method = m.get("method")
        if method is not None and not isinstance(method, str):
            raise ReportError(f"{where}.method: expected a method name or null, got {method!r}")
        rows = _strings(m["rows"], f"{where}.rows") if "rows" in m else ((method,) if method else ())
        scores = dict(_mapping(m.get("scores") or {}, f"{where}.scores"))
        for task, value in scores.items():
            if task not in task_names:
                raise ReportError(f"{where}.scores: unknown task {task!r} (tasks: {', '.join(task_names)})")
            scores[task] = _number(value, f"{where}.scores.{task}")
        methods.append(
            PaperMethod(
                name=m["name"],
                method=method,
                rows=rows,
                options=dict(_mapping(m.get("options") or {}, f"{where}.options")),
                scores=scores,
                average=_optional_number(m.get("average"), f"{where}.average"),
                normalized=_optional_number(m.get("normalized"), f"{where}.normalized"),
                source=m.get("source"),
            )
        )
    method_names = [m.name for m in methods]
    if len(set(method_names)) != len(method_names):
        raise ReportError(f"{path}: methods: duplicate method names in {method_names}")

    unit = _choice(doc.get("unit", "percent"), list(UNITS), f"{path}: unit")
    decimals = _decimals(doc.get("decimals", 2), f"{path}: decimals")
    norm = _mapping(doc.get("normalized") or {"definition": "none"}, f"{path}: normalized")
    return PaperTable(
        name=doc["name"],
        title=str(doc["title"]),
        paper=_mapping(doc["paper"], f"{path}: paper") if doc.get("paper") else None,
        model=str(doc.get("model", "")),
        metric=str(doc["metric"]),
        metric_key=str(doc.get("metric_key", "acc")),
        unit=unit,
        decimals=decimals,
        normalized=_choice(norm.get("definition", "none"), DEFINITIONS, f"{path}: normalized.definition"),
        normalized_unit=_choice(norm.get("unit", unit), list(UNITS), f"{path}: normalized.unit"),
        normalized_decimals=_decimals(norm.get("decimals", decimals), f"{path}: normalized.decimals"),
        tasks=tuple(tasks),
        methods=tuple(methods),
        path=path,
    )


def normalized_average(
    scores: Mapping[str, float | None], reference: Mapping[str, float | None], definition: str
) -> float | None:
    """The normalized average of ``scores`` against the experts' ``reference`` scores, over the tasks of ``scores``.

    ``mean_of_ratios``: mean over tasks t of scores[t] / reference[t]; ``ratio_of_means``: mean of scores / mean of
    reference; ``none``: None. None as well when a task lacks a score or a reference score (a normalized average
    over fewer tasks than the paper's is not comparable), or when a denominator is zero.
    """
    _choice(definition, DEFINITIONS, "normalized definition")
    tasks = list(scores)
    if definition == "none" or not tasks:
        return None
    ours = [scores[t] for t in tasks]
    ref = [reference.get(t) for t in tasks]
    if any(v is None for v in ours) or any(v is None for v in ref):
        return None
    if definition == "mean_of_ratios":
        if any(r == 0 for r in ref):
            return None
        return sum(s / r for s, r in zip(ours, ref, strict=True)) / len(tasks)  # type: ignore[operator]
    total = sum(ref)  # type: ignore[arg-type]
    return None if total == 0 else sum(ours) / total  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------------------------
# Runs


def _display(path: Path) -> str:
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

    def label(self, row: str) -> str:
        """``<run dir>:<row>``, as messages and the report name a row."""
        return f"{_display(self.path)}:{row}"

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
    results = _mapping(results, where)
    if "rows" not in results:
        if "merged_model" in results:
            raise ReportError(f"{where}: a merge-only run (checkpoint pool, eval=none) has no scores to report")
        raise ReportError(f"{where}: missing key 'rows'")
    rows = _mapping(results["rows"], f"{where}: rows")
    for name, row in rows.items():
        row = _mapping(row, f"{where}: rows.{name}")
        if "scores" not in row:
            raise ReportError(f"{where}: rows.{name}: missing key 'scores'")
        for task, metrics in _mapping(row["scores"], f"{where}: rows.{name}.scores").items():
            for metric, value in _mapping(metrics, f"{where}: rows.{name}.scores.{task}").items():
                _number(value, f"{where}: rows.{name}.scores.{task}.{metric}")
        if row.get("params") is not None:
            _mapping(row["params"], f"{where}: rows.{name}.params")
    if "tasks" in results:
        _strings(results["tasks"], f"{where}: tasks")
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
        config = _mapping(config, str(run_dir / "config.yaml"))
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
            values.setdefault(r.results.get(key), []).append(_display(r.path))
        if len(values) > 1:
            listing = "; ".join(f"{v!r}: {', '.join(ds)}" for v, ds in values.items())
            raise ReportError(f"the runs differ in '{key}' ({listing}): report runs of one suite and split together")
    return runs


# ----------------------------------------------------------------------------------------------------------------
# The report


@dataclass(frozen=True)
class ReportRow:
    """One method of the table: our numbers and the paper's, in the table's display units (None = missing)."""

    method: PaperMethod
    source: str | None
    note: str
    ours: Mapping[str, float | None]
    ours_average: float | None
    ours_normalized: float | None
    paper: Mapping[str, float | None]
    paper_average: float | None
    paper_normalized: float | None
    paper_normalized_derived: bool

    @property
    def diff_average(self) -> float | None:
        """Our average minus the paper's (None when either is missing)."""
        return _diff(self.ours_average, self.paper_average)

    @property
    def diff_normalized(self) -> float | None:
        """Our normalized average minus the paper's (None when either is missing)."""
        return _diff(self.ours_normalized, self.paper_normalized)


@dataclass(frozen=True)
class Report:
    """A table filled with the runs' rows: one ReportRow per paper method, in the paper's order."""

    table: PaperTable
    definition: str
    task_columns: Mapping[str, str | None]
    rows: tuple[ReportRow, ...]
    runs: tuple[Run, ...]
    unused: tuple[str, ...]


def _diff(ours: float | None, paper: float | None) -> float | None:
    return None if ours is None or paper is None else ours - paper


def _key(name: str) -> str:
    """Task names compared without case or punctuation (stanford-cars = Stanford_Cars)."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _parse_pairs(pairs: Sequence[str], option: str) -> dict[str, str]:
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip() or not value.strip():
            raise ReportError(f"{option} {pair!r}: expected NAME=VALUE")
        out[name.strip()] = value.strip()
    return out


def resolve_tasks(
    table: PaperTable, runs: Sequence[Run], task_map: Mapping[str, str] | None = None
) -> dict[str, str | None]:
    """Paper task -> the runs' task name (None when no run has it), by name or alias, or as ``task_map`` says."""
    task_map = dict(task_map or {})
    names = [t.name for t in table.tasks]
    for name in task_map:
        if name not in names:
            raise ReportError(f"--map-task {name}: table {table.name} has no task {name!r} (tasks: {', '.join(names)})")
    run_tasks = list(dict.fromkeys(t for r in runs for t in r.tasks))
    out: dict[str, str | None] = {}
    for task in table.tasks:
        if task.name in task_map:
            mapped = task_map[task.name]
            if mapped not in run_tasks:
                raise ReportError(
                    f"--map-task {task.name}={mapped}: no run has that task (tasks: {', '.join(run_tasks)})"
                )
            out[task.name] = mapped
            continue
        keys = {_key(task.name), *map(_key, task.aliases)}
        found = [t for t in run_tasks if _key(t) in keys]
        if len(found) > 1:
            raise ReportError(f"paper task {task.name} matches several run tasks {found}: pick one with --map-task")
        out[task.name] = found[0] if found else None
    return out


def _matches(method: PaperMethod, run: Run, row: str) -> bool:
    """Whether ``row`` of ``run`` holds ``method``: its name is one of the method's rows and no recorded option
    contradicts the method's (an option the run does not record cannot rule the row out)."""
    if row not in method.rows:
        return False
    options = run.row_options(row)
    return all(k not in options or options[k] == v for k, v in method.options.items())


def _same_scores(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if set(a["scores"]) != set(b["scores"]):
        return False
    for task, metrics in a["scores"].items():
        other = b["scores"][task]
        if set(metrics) != set(other):
            return False
        if not all(math.isclose(metrics[m], other[m], rel_tol=1e-9, abs_tol=1e-12) for m in metrics):
            return False
    return True


def _choose(method: PaperMethod, candidates: list[tuple[Run, str]]) -> tuple[tuple[Run, str] | None, str]:
    """The row that stands for ``method`` among several, and a note on how it was chosen.

    Merge rows: the best validation score (what the runs tuned on); without one on every candidate, an error.
    The experts / pretrained rows have no such score: several runs must hold the same numbers.
    """
    if not candidates:
        return None, ""
    if len(candidates) == 1:
        return candidates[0], ""
    labels = ", ".join(run.label(row) for run, row in candidates)
    if method.method in REFERENCE_ROWS:
        first_run, first_row = candidates[0]
        if all(_same_scores(first_run.rows[first_row], run.rows[row]) for run, row in candidates[1:]):
            return candidates[0], f"the same in {len(candidates)} runs"
        raise ReportError(f"{method.name}: the runs' {first_row} rows differ ({labels}); report runs that share them")
    keys = {run.tune_key for run, _ in candidates}
    values = []
    for run, row in candidates:
        value = run.rows[row].get(run.tune_key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ReportError(
                f"{method.name}: several rows hold it ({labels}) and {run.label(row)} has no {run.tune_key} to "
                "choose by; report only one of those runs"
            )
        values.append(float(value))
    best = max(range(len(values)), key=lambda i: values[i])  # ties: the first, in the order the runs were given
    return candidates[best], f"best {'/'.join(sorted(keys))} ({values[best]:.4f}) of {len(candidates)}"


def _paper_normalized(table: PaperTable, method: PaperMethod, definition: str) -> tuple[float | None, bool]:
    """The paper's normalized average under ``definition``: as published when that is the paper's own definition,
    else derived from its published numbers where they suffice (flagged True), else None."""
    if definition == "none":
        return None, False
    if definition == table.normalized and method.normalized is not None:
        return method.normalized, False
    experts = next((m for m in table.methods if m.method == "experts"), None)
    if experts is None:
        return None, False
    scale = UNITS[table.normalized_unit]  # a derived value is a plain ratio; published ones are already scaled
    if definition == "ratio_of_means" and method.average is not None and experts.average:
        return scale * method.average / experts.average, True
    tasks = [t.name for t in table.tasks]
    value = normalized_average({t: method.scores.get(t) for t in tasks}, experts.scores, definition)
    return (None, False) if value is None else (scale * value, True)


def build_report(
    table: PaperTable,
    runs: Sequence[Run],
    definition: str | None = None,
    method_map: Mapping[str, str] | None = None,
    task_map: Mapping[str, str] | None = None,
) -> Report:
    """Fill ``table`` with the runs' rows.

    Each paper method takes the run row that holds it (``method_map``: paper method -> row name, overriding the
    table's mapping); several candidates are settled by validation score (see :func:`_choose`). Per-task scores
    come from the row, the averages are over the paper's tasks (missing when the run lacks one), and the normalized
    average uses ``definition`` (default: the paper's) against the experts row of the same run.
    """
    definition = _choice(definition or table.normalized, DEFINITIONS, "--normalized")
    if not runs:
        raise ReportError("no runs to report")
    method_map = dict(method_map or {})
    for name in method_map:
        table.method(name)  # raises naming the table's methods
    for name, row in method_map.items():
        if not any(row in r.rows for r in runs):
            raise ReportError(f"--map {name}={row}: no run has a row {row!r}")
    mapped_rows = set(method_map.values())
    columns = resolve_tasks(table, runs, task_map)
    scale = UNITS[table.unit]
    norm_scale = UNITS[table.normalized_unit]

    def values(run: Run, row: str) -> dict[str, float | None]:
        scores = run.rows[row]["scores"]
        return {
            t: None if col is None or col not in scores else scores[col].get(table.metric_key)
            for t, col in columns.items()
        }

    chosen: dict[tuple[int, str], str] = {}
    considered: set[tuple[int, str]] = set()
    out = []
    for method in table.methods:
        if method.name in method_map:
            candidates = [(r, method_map[method.name]) for r in runs if method_map[method.name] in r.rows]
        else:
            # A row the user assigned with --map stands for that method only.
            candidates = [
                (r, row) for r in runs for row in r.rows if row not in mapped_rows and _matches(method, r, row)
            ]
        considered.update((id(r), row) for r, row in candidates)
        pick, note = _choose(method, candidates)
        ours: dict[str, float | None] = dict.fromkeys(columns)
        ours_avg = ours_norm = None
        source = None
        if pick is not None:
            run, row = pick
            key = (id(run), row)
            if key in chosen:
                raise ReportError(
                    f"{run.label(row)} holds both {chosen[key]!r} and {method.name!r} as far as its run records "
                    "(its options do not tell them apart); name each method's row with --map"
                )
            chosen[key] = method.name
            source = run.label(row)
            raw = values(run, row)
            ours = {t: None if v is None else scale * v for t, v in raw.items()}
            if all(v is not None for v in raw.values()):
                ours_avg = scale * sum(raw.values()) / len(raw)  # type: ignore[arg-type]
            if "experts" in run.rows:
                value = normalized_average(raw, values(run, "experts"), definition)
                ours_norm = None if value is None else norm_scale * value
        paper_norm, derived = _paper_normalized(table, method, definition)
        out.append(
            ReportRow(
                method=method,
                source=source,
                note=note,
                ours=ours,
                ours_average=ours_avg,
                ours_normalized=ours_norm,
                paper={t.name: method.scores.get(t.name) for t in table.tasks},
                paper_average=method.average,
                paper_normalized=paper_norm,
                paper_normalized_derived=derived,
            )
        )
    unused = tuple(r.label(row) for r in runs for row in r.rows if (id(r), row) not in considered)
    return Report(table, definition, columns, tuple(out), tuple(runs), unused)


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _fmt(value: float | None, decimals: int, sign: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.{decimals}f}" if sign else f"{value:.{decimals}f}"


def _cell(ours: float | None, paper: float | None, decimals: int, published: bool, derived: bool = False) -> str:
    if not published:
        return _fmt(ours, decimals)
    return f"{_fmt(ours, decimals)} / {_fmt(paper, decimals)}{'*' if derived else ''}"


def _paper_line(table: PaperTable) -> str:
    if not table.paper:
        return "No published numbers: mergelab's own layout."
    p = table.paper
    bits = [
        str(p.get("authors", "")),
        str(p.get("venue") or p.get("year") or ""),
        f"arXiv:{p['arxiv']}" if p.get("arxiv") else "",
    ]
    return f"Paper: {p.get('title', '?')} ({', '.join(b for b in bits if b)})"


def _runs_line(runs: Sequence[Run]) -> str:
    if len(runs) <= 4:
        return ", ".join(_display(r.path) for r in runs)
    # A sweep's many jobs: their count and common parent (each row's own run is listed under "Rows used").
    return f"{len(runs)} runs under {_display(Path(os.path.commonpath([r.path.resolve() for r in runs])))}"


def markdown_report(report: Report) -> str:
    """The report as markdown: the table (``ours / paper`` cells when the table has published numbers), then
    where each row came from and which task each column is."""
    t = report.table
    published = t.has_published
    norm = report.definition != "none"
    d, nd = t.decimals, t.normalized_decimals
    header = ["Method", *(task.name for task in t.tasks), "Avg"]
    if published:
        header.append("Δ avg")
    if norm:
        header.append(f"Norm. avg ({report.definition})")
        if published:
            header.append("Δ norm.")
    lines = [
        f"## {t.title}" + (" — ours / paper" if published else ""),
        "",
        _paper_line(t),
        f"Model (as published): {t.model}" if t.paper and t.model else f"Model: {t.model}",
        f"Metric: {t.metric}; runs: {_runs_line(report.runs)}"
        f" (suite {report.runs[0].results.get('suite', '?')}, {report.runs[0].results.get('report_split', '?')} split)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for r in report.rows:
        cells = [r.method.name]
        cells += [_cell(r.ours[task.name], r.paper[task.name], d, published) for task in t.tasks]
        cells.append(_cell(r.ours_average, r.paper_average, d, published))
        if published:
            cells.append(_fmt(r.diff_average, d, sign=True))
        if norm:
            cells.append(_cell(r.ours_normalized, r.paper_normalized, nd, published, r.paper_normalized_derived))
            if published:
                cells.append(_fmt(r.diff_normalized, nd, sign=True))
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"{MISSING}: missing (not published, or not in the runs). Averages are over the table's tasks only.")
    if norm:
        paper_def = "" if report.definition == t.normalized else f"; the paper's own definition is {t.normalized}"
        lines.append(f"Norm. avg ({report.definition}) is computed from each row's own run's experts row{paper_def}.")
    if any(r.paper_normalized_derived for r in report.rows):
        lines.append(
            "*: derived from the paper's published numbers under this definition; the paper does not print it."
        )
    renamed = [f"{p} = {c}" for p, c in report.task_columns.items() if c is not None and _key(c) != _key(p)]
    missing = [p for p, c in report.task_columns.items() if c is None]
    if renamed:
        lines.append(f"Tasks: {', '.join(renamed)}.")
    if missing:
        lines.append(f"Tasks the runs lack: {', '.join(missing)}.")
    lines += ["", "Rows used:", ""]
    for r in report.rows:
        where = r.source or f"{MISSING} (no run row" + (
            f" named {' / '.join(r.method.rows)})" if r.method.rows else "; mergelab has no such method)"
        )
        lines.append(f"- {r.method.name}: {where}" + (f" ({r.note})" if r.note else ""))
    if report.unused:
        by_row: dict[str, list[str]] = {}
        for label in report.unused:
            run, _, row = label.rpartition(":")
            by_row.setdefault(row, []).append(run)
        unused = [f"{row} ({runs[0] if len(runs) == 1 else f'{len(runs)} runs'})" for row, runs in by_row.items()]
        lines += ["", f"Run rows not in this table: {', '.join(unused)}."]
    return "\n".join(lines) + "\n"


def csv_report(report: Report) -> str:
    """The report as CSV: one line per method, ``ours`` and ``paper`` columns per task and average, empty = missing."""
    t = report.table
    header = ["method", "mergelab_method", "source"]
    for task in t.tasks:
        header += [f"{task.name} ours", f"{task.name} paper"]
    header += ["avg ours", "avg paper", "avg diff"]
    header += ["norm ours", "norm paper", "norm paper derived", "norm diff", "norm definition"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)

    def num(v: float | None) -> str:
        return "" if v is None else f"{v:.6g}"

    for r in report.rows:
        line = [r.method.name, r.method.method or "", r.source or ""]
        for task in t.tasks:
            line += [num(r.ours[task.name]), num(r.paper[task.name])]
        line += [num(r.ours_average), num(r.paper_average), num(r.diff_average)]
        line += [num(r.ours_normalized), num(r.paper_normalized), str(r.paper_normalized_derived).lower()]
        line += [num(r.diff_normalized), report.definition]
        w.writerow(line)
    return buf.getvalue()


def plot_report(report: Report, path: str | Path) -> None:
    """Grouped bars per method, ours next to the paper's: the average and (when defined) the normalized average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report.table
    panels = [("average", "ours_average", "paper_average", f"{t.metric} (average over the table's tasks)")]
    if report.definition != "none":
        unit = "%" if t.normalized_unit == "percent" else "ratio"
        panels.append(("normalized", "ours_normalized", "paper_normalized", f"normalized average ({unit})"))
    n = len(report.rows)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(7.0, 1.1 * n + 2), 3.6 * len(panels)), squeeze=False)
    series = [("ours", 0)] + ([("paper", 1)] if t.has_published else [])
    width = 0.8 / len(series)
    for ax, (_title, ours_attr, paper_attr, ylabel) in zip(axes[:, 0], panels, strict=True):
        for label, i in series:
            attr = ours_attr if label == "ours" else paper_attr
            vals = [getattr(r, attr) for r in report.rows]
            xs = [x + (i - (len(series) - 1) / 2) * width for x in range(n)]
            bars = ax.bar(xs, [0.0 if v is None else v for v in vals], width=width, label=label, color=f"C{i}")
            for x, v, bar, r in zip(xs, vals, bars, report.rows, strict=True):
                # A missing value is drawn as a label, never as a zero-height bar that reads as a score of 0.
                if v is None:
                    ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color=f"C{i}")
                elif attr == "paper_normalized" and r.paper_normalized_derived:
                    bar.set_hatch("//")  # derived from the paper's numbers, not printed in it
        ax.set_xticks(range(n))
        ax.set_xticklabels([r.method.name for r in report.rows], rotation=20, ha="right")
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0, 0].set_title(t.title, fontsize=10)
    fig.tight_layout()
    atomic_save_figure(fig, path)
    plt.close(fig)


def write_report(report: Report, out_dir: str | Path, overwrite: bool = False) -> list[Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` into ``out_dir`` (atomically); refuse to replace an
    earlier report unless ``overwrite``."""
    out = Path(out_dir)
    try:
        guard_output_dir(out, overwrite, REPORT_FILES)
    except FileExistsError:
        held = [n for n in REPORT_FILES if (out / n).exists()]
        raise FileExistsError(f"{out} already holds {held}; pass --out with another dir, or --overwrite") from None
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.md", markdown_report(report))
    atomic_write_text(out / "report.csv", csv_report(report))
    plot_report(report, out / "report.png")
    return [out / n for n in REPORT_FILES]


def list_tables(tables_dir: str | Path = PAPERS_DIR) -> str:
    """One line per available table: its name, title and what it publishes."""
    lines = []
    for name in available_tables(tables_dir):
        table = load_table(name, tables_dir)
        what = "published numbers" if table.has_published else "no published numbers"
        lines.append(f"{name:<22} {table.title} ({len(table.methods)} methods, {what})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``mergelab-report`` command; returns the exit status (2 on a bad input, with the reason on stderr)."""
    parser = argparse.ArgumentParser(
        prog="mergelab-report",
        description="Put runs' results in a paper's table layout next to its published numbers.",
    )
    parser.add_argument("runs", nargs="*", type=Path, help="run dirs (with metrics.json) or sweep dirs (job subdirs)")
    parser.add_argument("--table", help="a table of data/papers (see --list) or the path of a table YAML")
    parser.add_argument("--list", action="store_true", help="list the available tables and exit")
    parser.add_argument("--out", type=Path, help="output dir (default: <first run or sweep dir>/paper_report/<table>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier report in the output dir")
    parser.add_argument(
        "--normalized", choices=DEFINITIONS, help="normalized-average definition (default: the paper's)"
    )
    parser.add_argument(
        "--map", action="append", default=[], metavar="METHOD=ROW", help="take the paper's METHOD from run row ROW"
    )
    parser.add_argument(
        "--map-task",
        action="append",
        default=[],
        metavar="TASK=RUN_TASK",
        help="the paper's TASK is the runs' RUN_TASK",
    )
    args = parser.parse_args(argv)
    try:
        if args.list:
            print(list_tables())
            return 0
        if not args.table or not args.runs:
            parser.error("give one or more run or sweep dirs and --table (see --list)")
        table = load_table(args.table)
        runs = find_runs(args.runs)
        report = build_report(
            table,
            runs,
            definition=args.normalized,
            method_map=_parse_pairs(args.map, "--map"),
            task_map=_parse_pairs(args.map_task, "--map-task"),
        )
        out = args.out or args.runs[0] / "paper_report" / table.name
        write_report(report, out, overwrite=args.overwrite)
    except (ReportError, FileExistsError) as e:
        print(f"mergelab-report: error: {e}", file=sys.stderr)
        return 2
    print(markdown_report(report))
    print(f"written: {', '.join(REPORT_FILES)} in {_display(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
