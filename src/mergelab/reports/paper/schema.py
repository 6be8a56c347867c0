"""The paper tables of ``data/papers/*.yaml``: their schema, loading and checking, and the checked-value helpers.

:func:`load_table` reads one table into a :class:`PaperTable` (tasks, methods with published numbers, units,
normalized-average definition), raising :class:`ReportError` naming the file and key at fault; :func:`number`,
:func:`mapping`, :func:`strings` and :func:`choice` are the checks the run reader shares."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mergelab.locations import DATA_DIR

PAPERS_DIR = DATA_DIR / "papers"


# How a paper turns per-task scores into a "normalized" average, against each task's expert:
#   mean_of_ratios: mean over tasks of merged / expert (MetaGPT's "Nor. Avg", mergelab's "Norm acc");
#   ratio_of_means: mean merged / mean expert (the merged average over the individual experts' average);
#   none: the table reports no normalized average.
DEFINITIONS = ("mean_of_ratios", "ratio_of_means", "none")


# Display scale of a fraction (what runs store): percentages, or plain ratios (MetaGPT's Nor. Avg is 1.31).
UNITS = {"percent": 100.0, "ratio": 1.0}


# Rows every evaluated run has; they carry no validation score, so several runs must agree on them.
REFERENCE_ROWS = ("experts", "pretrained")


MISSING = "—"


class ReportError(ValueError):
    """A bad table, run dir, metrics.json or option; the message names the file and key at fault."""


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


def number(value: Any, where: str) -> float:
    """``value`` as a float when it is a finite number (not a bool), else a ReportError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ReportError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _optional_number(value: Any, where: str) -> float | None:
    return None if value is None else number(value, where)


def mapping(value: Any, where: str) -> Mapping[str, Any]:
    """``value`` when it is a mapping, else a ReportError naming ``where``."""
    if not isinstance(value, Mapping):
        raise ReportError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def strings(value: Any, where: str) -> tuple[str, ...]:
    """``value`` as a tuple when it is a list of strings, else a ReportError naming ``where``."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ReportError(f"{where}: expected a list of names, got {value!r}")
    return tuple(value)


def choice(value: Any, choices: Sequence[str], where: str) -> str:
    """``value`` when it is one of ``choices``, else a ReportError naming ``where`` and the choices."""
    if value not in choices:
        raise ReportError(f"{where}: {value!r} is not one of {', '.join(choices)}")
    return str(value)


def _decimals(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 6:
        raise ReportError(f"{where}: expected a number of decimals in 0..6, got {value!r}")
    return value


def load_table(table: str | Path, tables_dir: str | Path = PAPERS_DIR) -> PaperTable:
    """Load and check a paper table: a name in ``tables_dir`` (e.g. ``awd_vit_b32``) or a path to a YAML file."""
    path = _table_path(table, tables_dir)
    doc = _table_document(path)
    tasks = _load_tasks(doc["tasks"], path)
    methods = _load_methods(doc["methods"], path, [t.name for t in tasks])
    unit = choice(doc.get("unit", "percent"), list(UNITS), f"{path}: unit")
    decimals = _decimals(doc.get("decimals", 2), f"{path}: decimals")
    norm = mapping(doc.get("normalized") or {"definition": "none"}, f"{path}: normalized")
    return PaperTable(
        name=doc["name"],
        title=str(doc["title"]),
        paper=mapping(doc["paper"], f"{path}: paper") if doc.get("paper") else None,
        model=str(doc.get("model", "")),
        metric=str(doc["metric"]),
        metric_key=str(doc.get("metric_key", "acc")),
        unit=unit,
        decimals=decimals,
        normalized=choice(norm.get("definition", "none"), DEFINITIONS, f"{path}: normalized.definition"),
        normalized_unit=choice(norm.get("unit", unit), list(UNITS), f"{path}: normalized.unit"),
        normalized_decimals=_decimals(norm.get("decimals", decimals), f"{path}: normalized.decimals"),
        tasks=tasks,
        methods=methods,
        path=path,
    )


def _table_path(table: str | Path, tables_dir: str | Path) -> Path:
    """The YAML file of ``table``: the path itself when it is a YAML file, else ``tables_dir/<table>.yaml``."""
    path = Path(table)
    if path.suffix not in (".yaml", ".yml") or not path.is_file():
        path = Path(tables_dir) / f"{table}.yaml"
        if not path.is_file():
            raise ReportError(
                f"unknown table '{table}'; available: {', '.join(available_tables(tables_dir)) or '(none)'}"
                f" (in {tables_dir}), or pass a path to a table YAML"
            )
    return path


def _table_document(path: Path) -> Mapping[str, Any]:
    """The table's YAML mapping, checked to hold the required keys and the file's own name."""
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ReportError(f"{path}: not valid YAML: {e}") from None
    doc = mapping(raw, str(path))
    for key in ("name", "title", "metric", "tasks", "methods"):
        if key not in doc:
            raise ReportError(f"{path}: missing key '{key}'")
    if doc["name"] != path.stem:
        raise ReportError(f"{path}: name: {doc['name']!r} differs from the file name {path.stem!r}")
    return doc


def _load_tasks(value: Any, path: Path) -> tuple[PaperTask, ...]:
    """The table's ``tasks``: a non-empty list of ``{name, aliases, ...}`` with distinct names."""
    tasks = []
    if not isinstance(value, list) or not value:
        raise ReportError(f"{path}: tasks: expected a non-empty list")
    for i, t in enumerate(value):
        where = f"{path}: tasks[{i}]"
        t = mapping(t, where)
        if not isinstance(t.get("name"), str):
            raise ReportError(f"{where}: missing the task's name")
        info = {k: v for k, v in t.items() if k not in ("name", "aliases")}
        tasks.append(PaperTask(t["name"], strings(t.get("aliases", []), f"{where}.aliases"), info))
    task_names = [t.name for t in tasks]
    if len(set(task_names)) != len(task_names):
        raise ReportError(f"{path}: tasks: duplicate task names in {task_names}")
    return tuple(tasks)


def _load_methods(value: Any, path: Path, task_names: Sequence[str]) -> tuple[PaperMethod, ...]:
    """The table's ``methods``: a non-empty list of method entries (:func:`_load_method`) with distinct names."""
    if not isinstance(value, list) or not value:
        raise ReportError(f"{path}: methods: expected a non-empty list")
    methods = [_load_method(m, f"{path}: methods[{i}]", task_names) for i, m in enumerate(value)]
    method_names = [m.name for m in methods]
    if len(set(method_names)) != len(method_names):
        raise ReportError(f"{path}: methods: duplicate method names in {method_names}")
    return tuple(methods)


def _load_method(value: Any, at: str, task_names: Sequence[str]) -> PaperMethod:
    """One entry of the table's ``methods`` (``at``: where it is, for errors), its scores over ``task_names``."""
    m = mapping(value, at)
    if not isinstance(m.get("name"), str):
        raise ReportError(f"{at}: missing the method's name")
    where = f"{at} ({m['name']})"
    unknown = set(m) - {"name", "method", "rows", "options", "scores", "average", "normalized", "source"}
    if unknown:
        raise ReportError(f"{where}: unknown keys {sorted(unknown)}")
    method = m.get("method")
    if method is not None and not isinstance(method, str):
        raise ReportError(f"{where}.method: expected a method name or null, got {method!r}")
    rows = strings(m["rows"], f"{where}.rows") if "rows" in m else ((method,) if method else ())
    scores = dict(mapping(m.get("scores") or {}, f"{where}.scores"))
    for task, score in scores.items():
        if task not in task_names:
            raise ReportError(f"{where}.scores: unknown task {task!r} (tasks: {', '.join(task_names)})")
        scores[task] = number(score, f"{where}.scores.{task}")
    return PaperMethod(
        name=m["name"],
        method=method,
        rows=rows,
        options=dict(mapping(m.get("options") or {}, f"{where}.options")),
        scores=scores,
        average=_optional_number(m.get("average"), f"{where}.average"),
        normalized=_optional_number(m.get("normalized"), f"{where}.normalized"),
        source=m.get("source"),
    )


def list_tables(tables_dir: str | Path = PAPERS_DIR) -> str:
    """One line per available table: its name, title and what it publishes."""
    lines = []
    for name in available_tables(tables_dir):
        table = load_table(name, tables_dir)
        what = "published numbers" if table.has_published else "no published numbers"
        lines.append(f"{name:<22} {table.title} ({len(table.methods)} methods, {what})")
    return "\n".join(lines)
