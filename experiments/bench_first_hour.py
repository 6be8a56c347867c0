"""What a new user waits for: README command 1's table, cold or warm, and the evaluation speed beneath it.

Writes (merges into) ``experiments/first_hour.json``, which the README and the docs render (``scripts/docs_regions.py``,
region ``first_hour``): no figure of the first hour is typed by hand.

    # the whole table as README command 1 runs it, the experts cached (warm) or built first (cold: a fresh cache)
    python experiments/bench_first_hour.py table --cache ~/.cache/mergelab          # warm
    python experiments/bench_first_hour.py table --cache /tmp/fresh --cold          # cold
    # examples/s of scoring a merged model on the embedded test split, this checkout against another one
    python experiments/bench_first_hour.py eval --cache ~/.cache/mergelab --before /path/to/older/checkout

``table`` runs ``mergelab experiment=embedded_table`` in a subprocess and reads the times from its log: the first
merged row visible (the first "row 1/N" line, written with the row's files), every row, and the whole run; with
``--cold`` also each expert's build. ``eval`` scores task arithmetic's merge on the test split (3000 examples) with
each checkout's own code, in a fresh process per checkout and repeat, and compares every prediction.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "experiments" / "first_hour.json"
STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")


def stamp(line: str) -> float | None:
    """The time of a Hydra log line, in seconds since the epoch (None: not a log line)."""
    m = STAMP.match(line)
    return dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def machine() -> str:
    """The CPU this ran on, in a few words."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} cores, {model}"


def table(cache: Path, cold: bool, extra: list[str]) -> dict[str, Any]:
    """Run the table; parse its log into the first row's, each row's and the whole run's seconds."""
    if cold and cache.exists() and any(cache.iterdir()):
        raise SystemExit(f"--cold needs an empty or new cache dir, {cache} holds files")
    run_dir = Path(tempfile.mkdtemp(prefix="first-hour-"))
    env = {**os.environ, "MERGELAB_CACHE": str(cache), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    cmd = ["mergelab", "experiment=embedded_table", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"]
    start = time.time()
    proc = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True)
    total = time.time() - start
    log = proc.stdout + proc.stderr
    (run_dir / "bench.log").write_text(log)
    if proc.returncode != 0:
        raise SystemExit(f"the table failed (exit {proc.returncode}); its log: {run_dir / 'bench.log'}")
    rows: dict[str, float] = {}
    first_row = None
    experts: dict[str, float] = {}
    began: dict[str, float] = {}
    for line in log.splitlines():
        t = stamp(line)
        if t is None:
            continue
        if m := re.search(r"row (\d+)/(\d+) (\S+): .*\((.+?)\) · elapsed", line):
            first_row = first_row if first_row is not None else t - start
            rows[m.group(3)] = t - start
        if m := re.search(r"building expert '(\w+)'", line):
            began[m.group(1)] = t
        if (m := re.search(r"expert '(\w+)': test acc", line)) and m.group(1) in began:
            experts[m.group(1)] = round(t - began[m.group(1)], 1)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "command": " ".join([*cmd[:2], *extra]),
        "first_row_s": round(first_row, 1) if first_row is not None else None,
        "total_s": round(total, 1),
        "rows": len(rows),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
        "row_done_at_s": {k: round(v, 1) for k, v in rows.items()},
        "experts_s": experts,
        "avg_acc": {k: round(100 * v["avg_acc"], 2) for k, v in metrics["rows"].items() if "avg_acc" in v},
        "run_dir": str(run_dir),
    }


EVAL_SNIPPET = r"""
import json, sys, time
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from mergelab.cli import CONFIG_DIR
from mergelab.merge_candidates import InMemoryMerge
from mergelab.run import build, method_candidates
with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
    cfg = compose("config", overrides=["trainer.enable_progress_bar=false", "logger=none", *json.loads(sys.argv[2])])
trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
pool, suite = build(cfg.model), build(cfg.eval)
pool.setup(suite, trainer)
((_, method),) = method_candidates(cfg.method, False)
merge = InMemoryMerge(pool, method, trainer, "task_arithmetic")
merge.realize()
merge.score("test")  # warm: tokenized examples cached, first-call costs paid
preds = {}
model = merge.model
step = type(model).test_step
def recording(self, batch, batch_idx, dataloader_idx=0):
    task = self.eval_tasks[dataloader_idx]
    preds.setdefault(task, []).extend(self(task, batch).argmax(-1).tolist())
    return step(self, batch, batch_idx, dataloader_idx)
seconds = []
for i in range(int(sys.argv[1])):
    start = time.perf_counter()
    scores = merge.score("test")
    seconds.append(time.perf_counter() - start)
type(model).test_step = recording
merge.score("test")
# Where a scoring's time goes: torch's profiler over one more pass (its own overhead makes it slower than the timed
# ones, so only shares and the matrix products' rate are read from it).
import torch
from torch.profiler import ProfilerActivity, profile
tokens = []
def counting(self, batch, batch_idx, dataloader_idx=0):
    tokens.append(batch["input_ids"].numel())
    return step(self, batch, batch_idx, dataloader_idx)
type(model).test_step = counting
with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
    start = time.perf_counter()
    merge.score("test")
    wall = time.perf_counter() - start
events = prof.key_averages()
products = [e for e in events if e.key in ("aten::addmm", "aten::mm", "aten::bmm")]
gemm_s = sum(e.self_cpu_time_total for e in products) / 1e6
gemm_flops = sum(e.flops for e in products)
profile_part = {
    "profiled_wall_s": round(wall, 2),
    "matrix_products_s": round(gemm_s, 2),
    # of the fastest unprofiled scoring: the profiler's per-op overhead inflates its own wall time, not the kernels'
    "matrix_products_share": round(gemm_s / min(seconds), 3),
    "matrix_products_gflops": round(gemm_flops / gemm_s / 1e9, 1),
    "tokens_scored": sum(tokens),
    "threads": torch.get_num_threads(),
}
print(json.dumps({"seconds": seconds, "scores": scores, "preds": preds, "profile": profile_part}))
"""


def cached_experts(cache: Path) -> list[str]:
    """The override naming each embedded expert built in ``cache`` by its dir, so that every checkout scores the
    same merge (an older checkout's cache keys may differ)."""
    experts = {}
    for record in sorted((cache / "experts").glob("*/mergelab_expert.json")):
        experts[json.loads(record.read_text())["task"]] = str(record.parent)
    if len(experts) < 6:
        raise SystemExit(f"{cache / 'experts'} holds {len(experts)} of the six embedded experts: run the table first")
    return ["model.experts={" + ", ".join(f"{t}: '{d}'" for t, d in experts.items()) + "}"]


def eval_speed(checkout: Path, cache: Path, repeats: int) -> dict[str, Any]:
    """Seconds per scoring of the merged model on the test split, by ``checkout``'s code, and its predictions."""
    env = {**os.environ, "MERGELAB_CACHE": str(cache), "PYTHONPATH": str(checkout / "src")}
    overrides = json.dumps(cached_experts(cache))
    proc = subprocess.run(
        [sys.executable, "-c", EVAL_SNIPPET, str(repeats), overrides],
        env=env,
        capture_output=True,
        text=True,
        cwd=checkout,
    )
    if proc.returncode != 0:
        raise SystemExit(f"scoring with {checkout} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluation(cache: Path, before: Path, repeats: int) -> dict[str, Any]:
    """This checkout's scoring against ``before``'s, interleaved so that both see the same machine."""
    runs = {"before": [], "after": []}
    for _ in range(2):
        runs["before"].append(eval_speed(before, cache, repeats))
        runs["after"].append(eval_speed(ROOT, cache, repeats))
    best = {k: min(s for r in v for s in r["seconds"]) for k, v in runs.items()}
    examples = sum(len(p) for p in runs["after"][0]["preds"].values())
    same = runs["before"][0]["preds"] == runs["after"][0]["preds"]
    return {
        "examples": examples,
        "before_examples_per_s": round(examples / best["before"], 1),
        "after_examples_per_s": round(examples / best["after"], 1),
        "speedup": round(best["before"] / best["after"], 2),
        "identical_predictions": same,
        "profile": runs["after"][0]["profile"],
        "seconds": {k: [round(s, 2) for r in v for s in r["seconds"]] for k, v in runs.items()},
        "before": str(before),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["table", "eval"])
    parser.add_argument("--cache", type=Path, required=True, help="MERGELAB_CACHE for the run")
    parser.add_argument("--cold", action="store_true", help="table: the cache is empty, the experts are built")
    parser.add_argument("--before", type=Path, help="eval: a checkout of the code to compare with")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("overrides", nargs="*", help="table: extra overrides")
    args = parser.parse_args()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result.update({"date": dt.date.today().isoformat(), "machine": machine()})
    if args.what == "table":
        part = table(args.cache, args.cold, args.overrides)
        key = "cold" if args.cold else "warm_table"
        result[key] = part
        if args.cold:
            part["command1_s"] = part["total_s"]
            experts = part["experts_s"]
            part["expert_s"] = max(experts.values()) if experts else None
    else:
        if args.before is None:
            raise SystemExit("eval needs --before <checkout>")
        result["eval"] = evaluation(args.cache, args.before, args.repeats)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
