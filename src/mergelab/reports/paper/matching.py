"""Matching runs to a paper table: which run row stands for each published method, which run task for each column.

:func:`resolve_tasks` maps the paper's tasks to the runs' (by name, alias or ``--map-task``); :func:`build_report`
picks each method's row (by name and recorded options, ``--map``, or the best validation score among several)
and fills a :class:`Report` of :class:`ReportRow` s with our numbers, the paper's, and both normalized averages
(:func:`normalized_average`)."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mergelab.reports.paper.runs import Run, display
from mergelab.reports.paper.schema import (
    DEFINITIONS,
    REFERENCE_ROWS,
    UNITS,
    PaperMethod,
    PaperTable,
    ReportError,
    choice,
)


def normalized_average(
    scores: Mapping[str, float | None], reference: Mapping[str, float | None], definition: str
) -> float | None:
    """The normalized average of ``scores`` against the experts' ``reference`` scores, over the tasks of ``scores``.

    ``mean_of_ratios``: mean over tasks t of scores[t] / reference[t]; ``ratio_of_means``: mean of scores / mean of
    reference; ``none``: None. None as well when a task lacks a score or a reference score (a normalized average
    over fewer tasks than the paper's is not comparable), or when a denominator is zero.
    """
    choice(definition, DEFINITIONS, "normalized definition")
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


def task_key(name: str) -> str:
    """Task names compared without case or punctuation (stanford-cars = Stanford_Cars)."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def parse_pairs(pairs: Sequence[str], option: str) -> dict[str, str]:
    """``NAME=VALUE`` command-line pairs (of ``option``, named in errors) as a dict."""
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
        keys = {task_key(task.name), *map(task_key, task.aliases)}
        found = [t for t in run_tasks if task_key(t) in keys]
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
    return all(k not in options or _recorded_name(options[k]) == v for k, v in method.options.items())


def _recorded_name(value: Any) -> Any:
    """A recorded option as paper tables name it: an inner method node (``merge: {name: ties, ...}``, as AWD's
    ``merge`` and MetaGPT's ``sparsify`` are composed) by its ``name``; any other value as it is."""
    return value["name"] if isinstance(value, Mapping) and "name" in value else value


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
    definition = choice(definition or table.normalized, DEFINITIONS, "--normalized")
    if not runs:
        raise ReportError("no runs to report")
    method_map = dict(method_map or {})
    _check_method_map(table, runs, method_map)
    columns = resolve_tasks(table, runs, task_map)
    chosen: dict[tuple[int, str], str] = {}
    considered: set[tuple[int, str]] = set()
    out = []
    for method in table.methods:
        candidates = _candidates(method, runs, method_map)
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
            ours, ours_avg, ours_norm = _our_numbers(table, run, row, columns, definition)
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
    check_something_matches(table, runs, out, columns)
    unused = tuple(r.label(row) for r in runs for row in r.rows if (id(r), row) not in considered)
    return Report(table, definition, columns, tuple(out), tuple(runs), unused)


def _check_method_map(table: PaperTable, runs: Sequence[Run], method_map: Mapping[str, str]) -> None:
    """Raise a ReportError unless every ``--map`` names one of the table's methods and a row some run has."""
    for name in method_map:
        table.method(name)  # raises naming the table's methods
    for name, row in method_map.items():
        if not any(row in r.rows for r in runs):
            raise ReportError(f"--map {name}={row}: no run has a row {row!r}")


def _candidates(method: PaperMethod, runs: Sequence[Run], method_map: Mapping[str, str]) -> list[tuple[Run, str]]:
    """The run rows that may stand for ``method``: the row ``method_map`` names for it, else every row that
    matches it (by name and recorded options) and that ``method_map`` does not assign to another method."""
    if method.name in method_map:
        return [(r, method_map[method.name]) for r in runs if method_map[method.name] in r.rows]
    # A row the user assigned with --map stands for that method only.
    mapped_rows = set(method_map.values())
    return [(r, row) for r in runs for row in r.rows if row not in mapped_rows and _matches(method, r, row)]


def _row_scores(run: Run, row: str, columns: Mapping[str, str | None], metric_key: str) -> dict[str, float | None]:
    """``run``'s ``row`` score per paper task (``columns``: paper task -> run task), as recorded; None where the run
    lacks the task or the score."""
    scores = run.rows[row]["scores"]
    return {t: None if col is None or col not in scores else scores[col].get(metric_key) for t, col in columns.items()}


def _our_numbers(
    table: PaperTable, run: Run, row: str, columns: Mapping[str, str | None], definition: str
) -> tuple[dict[str, float | None], float | None, float | None]:
    """Our per-task scores, their average (None unless every task has a score) and their normalized average under
    ``definition`` against the experts row of the same run (None without one), in ``table``'s display units."""
    scale = UNITS[table.unit]
    raw = _row_scores(run, row, columns, table.metric_key)
    ours = {t: None if v is None else scale * v for t, v in raw.items()}
    average = None
    if all(v is not None for v in raw.values()):
        average = scale * sum(raw.values()) / len(raw)  # type: ignore[arg-type]
    normalized = None
    if "experts" in run.rows:
        value = normalized_average(raw, _row_scores(run, "experts", columns, table.metric_key), definition)
        normalized = None if value is None else UNITS[table.normalized_unit] * value
    return ours, average, normalized


def check_something_matches(
    table: PaperTable, runs: Sequence[Run], rows: Sequence[ReportRow], columns: Mapping[str, str | None]
) -> None:
    """Raise a one-line ReportError naming the run dirs and the table when the report would hold nothing of the
    runs: no row for any method the table compares (its experts and pretrained rows alone compare nothing; a
    table of those only needs one of them), or none of its tasks; the error lists what the runs have and what the
    table expects."""
    dirs = ", ".join(display(r.path) for r in runs)
    compared = [r for r in rows if r.method.method not in REFERENCE_ROWS] or list(rows)
    if all(r.source is None for r in compared):
        have = list(dict.fromkeys(row for r in runs for row in r.rows))
        expects = [
            f"{'|'.join(r.method.rows)}"
            + "".join(f" {k}={_recorded_name(v)}" for k, v in r.method.options.items())
            + f" ({r.method.name})"
            for r in compared
            if r.method.rows
        ]
        raise ReportError(
            f"nothing in {dirs} matches table {table.name}: the runs have rows {', '.join(have)}; the table "
            f"expects rows {'; '.join(expects)} (name a row with --map METHOD=ROW)"
        )
    if all(c is None for c in columns.values()):
        have = list(dict.fromkeys(t for r in runs for t in r.tasks))
        raise ReportError(
            f"nothing in {dirs} matches table {table.name}: the runs have tasks {', '.join(have)}; the table "
            f"expects tasks {', '.join(t.name for t in table.tasks)} (name a task with --map-task TASK=RUN_TASK)"
        )
