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

The package is split by stage: :mod:`.schema` loads and checks the paper tables, :mod:`.runs` reads run and
sweep dirs, :mod:`.matching` matches runs' rows and tasks to a table and builds the report, :mod:`.render` writes
it (markdown, CSV, chart) and :mod:`.cli` is the command (``main``); the names below are the public API of the rest."""

from mergelab.reports.paper.matching import Report, ReportRow, build_report, normalized_average, resolve_tasks
from mergelab.reports.paper.render import REPORT_FILES, csv_report, markdown_report, plot_report, write_report
from mergelab.reports.paper.runs import Run, find_runs, load_run
from mergelab.reports.paper.schema import (
    DEFINITIONS,
    MISSING,
    PAPERS_DIR,
    REFERENCE_ROWS,
    UNITS,
    PaperMethod,
    PaperTable,
    PaperTask,
    ReportError,
    available_tables,
    list_tables,
    load_table,
)

__all__ = [
    "DEFINITIONS",
    "MISSING",
    "PAPERS_DIR",
    "REFERENCE_ROWS",
    "REPORT_FILES",
    "UNITS",
    "PaperMethod",
    "PaperTable",
    "PaperTask",
    "Report",
    "ReportError",
    "ReportRow",
    "Run",
    "available_tables",
    "build_report",
    "csv_report",
    "find_runs",
    "list_tables",
    "load_run",
    "load_table",
    "markdown_report",
    "normalized_average",
    "plot_report",
    "resolve_tasks",
    "write_report",
]
