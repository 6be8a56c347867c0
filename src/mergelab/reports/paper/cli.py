"""The ``mergelab-report`` command line: parse the options, load the table and runs, build, print and write the report.

Bad input (a table, run dir or option at fault) ends with exit status 2 and the reason on stderr, not a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from mergelab.reports.paper.matching import build_report, parse_pairs
from mergelab.reports.paper.render import REPORT_FILES, markdown_report, write_report
from mergelab.reports.paper.runs import display, find_runs
from mergelab.reports.paper.schema import DEFINITIONS, ReportError, list_tables, load_table


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
            method_map=parse_pairs(args.map, "--map"),
            task_map=parse_pairs(args.map_task, "--map-task"),
        )
        out = args.out or args.runs[0] / "paper_report" / table.name
        write_report(report, out, overwrite=args.overwrite)
    except (ReportError, FileExistsError) as e:
        print(f"mergelab-report: error: {e}", file=sys.stderr)
        return 2
    print(markdown_report(report))
    print(f"written: {', '.join(REPORT_FILES)} in {display(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
