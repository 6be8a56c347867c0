"""How far each row of a results table moves between runs made under different CPU kernel choices.

Each ``--run NAME=DIR`` is one run of the same table (its ``results.csv``; rows it has not written yet are left
out), made on this machine with torch's and MKL's kernels forced to one choice (``ATEN_CPU_CAPABILITY``,
``MKL_ENABLE_INSTRUCTIONS``; see ``kernel_choices.py``), from its own expert cache, so that everything trained or
optimised (experts, statistics, AdaMerging's coefficients, AWD's delta) is rebuilt under that choice. The result
states, per row, every run's average and per-task accuracy and the spread (largest minus smallest, in points),
which ``scripts/docs_regions.py`` shows beside the committed table. ``--experts NAME=DIR`` (each run's expert cache,
``$MERGELAB_CACHE/experts``) also compares the fine-tuned experts' weights across the runs: byte-identical or not,
and the largest absolute difference::

    python experiments/table_spread.py --run avx512=/tmp/tables/avx512 --run avx2=/tmp/tables/avx2 \
        --env avx2="ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2" \
        --experts avx512=/tmp/cache512/experts --experts avx2=/tmp/cache2/experts \
        --out experiments/embedded_table/kernel_spread.json
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
from pathlib import Path
from typing import Any


def load_rows(run_dir: Path) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The tasks and the rows written so far of ``run_dir``'s ``results.csv`` (points, as the table prints them; a
    table writes each row as it finishes, so an unfinished run gives its finished rows); exits naming the file
    when it is not a table's results."""
    path = run_dir / "results.csv"
    try:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            fields = list(reader.fieldnames or [])
            tasks = fields[1 : fields.index("avg_acc")]
            rows = {r["method"]: {k: float(r[k]) for k in (*tasks, "avg_acc") if r.get(k)} for r in reader}
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"{path}: not a table run's results.csv ({e})") from None
    return tasks, rows


def spread(values: list[float | None]) -> float | None:
    """Largest minus smallest of the present values (points, 2 decimals); None when fewer than two are present."""
    present = [v for v in values if v is not None]
    return round(max(present) - min(present), 2) if len(present) >= 2 else None


def row_spread(name: str, runs: dict[str, dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """One row across the runs: each run's average and task scores (None: that run has not written the row), and
    the spreads."""
    avg = {run: (rows.get(name) or {}).get("avg_acc") for run, rows in runs.items()}
    per_task = {task: {run: (rows.get(name) or {}).get(task) for run, rows in runs.items()} for task in tasks}
    task_spreads = {task: spread(list(scores.values())) for task, scores in per_task.items()}
    return {
        "avg_acc": avg,
        "avg_spread": spread(list(avg.values())),
        "task_acc": per_task,
        "task_spread": task_spreads,
        "max_task_spread": max((s for s in task_spreads.values() if s is not None), default=None),
        "tasks_moved": [t for t, s in task_spreads.items() if s],
    }


def expert_weights(cache: Path) -> dict[str, Path]:
    """Task -> the weights file of each expert in an expert cache dir (``<task>-<key>/model.safetensors``)."""
    return {d.name.rsplit("-", 1)[0]: d / "model.safetensors" for d in sorted(cache.iterdir()) if d.is_dir()}


def run_artifacts(run_dir: Path) -> dict[str, Path]:
    """A table run's saved artifacts (``artifacts/<row>/``): AWD's delta and AdaMerging's coefficients."""
    found = [*run_dir.glob("artifacts/*/delta.safetensors"), *run_dir.glob("artifacts/*/adamerging.json")]
    return {str(p.relative_to(run_dir / "artifacts")): p for p in sorted(found)}


def tensors(path: Path) -> dict[str, Any]:
    """The tensors of a safetensors file, or every number of a JSON file (by its path of keys) as a 1-element one."""
    import torch
    from safetensors.torch import load_file

    if path.suffix == ".safetensors":
        return load_file(str(path))

    def walk(value: Any, at: str) -> dict[str, float]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in walk(item, f"{at}/{key}").items()}
        if isinstance(value, list):
            return {k: v for i, item in enumerate(value) for k, v in walk(item, f"{at}[{i}]").items()}
        return {at: value} if isinstance(value, float) else {}  # counts (steps, examples) are not results

    return {k: torch.tensor([v], dtype=torch.float64) for k, v in walk(json.loads(path.read_text()), "").items()}


def compare_files(found: dict[str, dict[str, Path]]) -> dict[str, Any]:
    """Per file present in every run (run -> name -> path): whether the runs' files have the same bytes, and the
    largest |difference| of any number from the first run's (with the largest |number|, for scale)."""
    import hashlib

    first, *others = found
    out: dict[str, Any] = {}
    for name, path in found[first].items():
        if not all(name in found[o] for o in others):
            continue
        digests = {n: hashlib.sha256(found[n][name].read_bytes()).hexdigest()[:16] for n in found}
        ref = tensors(path)
        diff = 0.0
        for o in others:
            theirs = tensors(found[o][name])
            diff = max([diff, *(float((t.double() - theirs[k].double()).abs().max()) for k, t in ref.items())])
        out[name] = {
            "sha256": digests,
            "byte_identical": len(set(digests.values())) == 1,
            "max_abs_diff": diff,
            "max_abs": max((float(t.double().abs().max()) for t in ref.values() if t.numel()), default=0.0),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="NAME=DIR of one finished table run")
    parser.add_argument("--env", action="append", default=[], help='NAME="VAR=value ..." the run was made under')
    parser.add_argument("--experts", action="append", default=[], help="NAME=DIR: a run's expert cache dir")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    dirs = dict(item.split("=", 1) for item in args.run)
    if len(dirs) < 2:
        raise SystemExit("--run: give at least two runs to compare")
    envs = dict(item.split("=", 1) for item in args.env)
    loaded = {name: load_rows(Path(d)) for name, d in dirs.items()}
    tasks = next(iter(loaded.values()))[0]
    for name, (t, _) in loaded.items():
        if t != tasks:
            raise SystemExit(f"--run {name}: tasks {t} differ from {tasks}; not the same table")
    runs = {name: rows for name, (_, rows) in loaded.items()}
    names = list(dict.fromkeys(r for rows in runs.values() for r in rows))
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{os.cpu_count()} cores, {os.uname().machine}",
        "runs": {name: {"dir": str(d), "env": envs.get(name, "")} for name, d in dirs.items()},
        "tasks": tasks,
        "rows": {name: row_spread(name, runs, tasks) for name in names},
    }
    if args.experts:
        caches = (item.split("=", 1) for item in args.experts)
        result["experts"] = compare_files({n: expert_weights(Path(d)) for n, d in caches})
    result["artifacts"] = compare_files({n: run_artifacts(Path(d)) for n, d in dirs.items()})
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(args.out)
    for name, r in result["rows"].items():
        print(f"{name:28s} avg {r['avg_acc']}  spread {r['avg_spread']}  max task spread {r['max_task_spread']}")


if __name__ == "__main__":
    main()
