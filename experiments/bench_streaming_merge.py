"""Benchmark (not a test): streaming merges of three experts of a ~1.1B-parameter Llama-shaped checkpoint.

Builds random bf16 checkpoints (TinyLlama-1.1B shapes, 1 GB shards) once under --workdir, then, for each
method and repeat: times reading the input files (which also warms the page cache, as the kernel may have
reclaimed it since the last run), and merges in a fresh process. Reported per run: the merge's wall time and
CPU time (user + system, all threads, imports excluded), the process's peak RSS and its RSS before merging
(imports alone), and the 1-minute load average before and after (other jobs on the machine inflate wall time;
CPU time is less sensitive to them).

    python experiments/bench_streaming_merge.py [--workdir /tmp/mergelab-bench] [--methods ta,metagpt,ties]
        [--repeat 3] [--layers N] [--end-to-end [--mergekit-venv /tmp/mkvenv]]

``--end-to-end [--mergekit-venv VENV]`` times whole processes instead, as a user runs them: ``mergelab
model=checkpoints ... eval=none`` per method (start-up, config, merge, writing), and, given a venv where MergeKit is
installed (never a dependency of mergelab: ``python -m venv VENV && VENV/bin/pip install torch==2.13.0 mergekit``),
``mergekit-yaml`` with its default options on the same pool (task arithmetic and TIES at the same weight 0.3 and
density 0.2, bf16). Each process's wall time, CPU time (user + system) and peak RSS are taken from the kernel
(``wait4``), after the inputs were read once to warm the page cache; the ratios to MergeKit's task arithmetic and
TIES are printed with them.

``--layers N`` builds the same model with N decoder layers (under <workdir>/layersN): every tensor shape is kept, so
the peak memory of a per-tensor method is the full model's, and the spectral methods (TSV-M, Iso-C, Iso-CTS: SVDs
per matrix, hours on 2 cores at 22 layers) can be timed end to end; two values of N give the per-layer cost.

Each run of the full pool writes its rows, with the date and the machine, into ``--out`` (default
``experiments/bench_streaming_merge.json``: the section ``merge`` or ``end_to_end``, the other kept), which the
docs' ``streaming_merge`` tables are generated from (``scripts/docs_regions.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

LLAMA_1B = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
}

METHODS = {
    "ta": "TaskArithmetic(scaling=0.3)",
    "metagpt": "MetaGPT()",
    "ties": "TIES(k=20, prune='global', scaling=0.3)",
    "ties_per_tensor": "TIES(k=20, prune='per_tensor', scaling=0.3)",
    # The data-free spectral methods and TALL-mask consensus (issue: their streaming cost at 1.1B).
    "tsv_m": "TSVM()",
    "tsv_m_lowrank": "TSVM(svd='lowrank')",
    "iso_c": "IsoC()",
    "iso_cts": "IsoCTS()",
    "consensus": "Consensus()",
}


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (v, h)}
    return shapes


def build_checkpoint(path: Path, seed: int, base_seed: int | None, cfg: dict = LLAMA_1B) -> None:
    """Random bf16 weights; an expert is the base plus a small random task vector."""
    import torch

    from mergelab.io.writer import ShardedWriter

    if (path / "model.safetensors.index.json").is_file():
        return
    shapes = llama_shapes(cfg)
    layout = [(name, shape, torch.bfloat16) for name, shape in shapes.items()]
    writer = ShardedWriter(path, layout, max_shard_bytes=1 << 30, overwrite=True)
    for n, (name, shape) in enumerate(shapes.items()):
        g = torch.Generator().manual_seed((base_seed if base_seed is not None else seed) * 100_003 + n)
        w = 0.02 * torch.randn(shape, generator=g)
        if base_seed is not None:
            g2 = torch.Generator().manual_seed(seed * 100_003 + n)
            w += 0.002 * torch.randn(shape, generator=g2)
        writer.add(name, w.to(torch.bfloat16))
        del w
    (writer.tmp / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", **cfg})
    )
    writer.close()


def read_files(dirs: list[Path]) -> float:
    """Seconds to read every safetensors byte of ``dirs``."""
    start = time.perf_counter()
    buf = bytearray(64 << 20)
    for d in dirs:
        for f in sorted(d.glob("*.safetensors")):
            with open(f, "rb", buffering=0) as fh:
                while fh.readinto(buf):
                    pass
    return time.perf_counter() - start


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident set size (``VmRSS``) or its peak (``VmHWM``), in MiB. The peak is read here rather
    than from ``getrusage``: Linux carries ``ru_maxrss`` across ``exec``, so a child started by a parent that once
    held more (building the checkpoints) would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(f"{field}:")) / 1024


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(method: str, base: str, experts: list[str], out: str) -> None:
    """Run one merge and print its wall time, CPU time and memory as JSON."""
    from mergelab.engine.streaming import stream_merge
    from mergelab.methods import TIES, TSVM, IsoC, IsoCTS, MetaGPT, TaskArithmetic  # noqa: F401 - used by eval
    from mergelab.methods.consensus import Consensus  # noqa: F401 - used by eval below

    rss0, cpu0 = rss_mib(), cpu_s()
    start = time.perf_counter()
    m = eval(METHODS[method])  # a fixed table of constructors above
    stream_merge(m, base, experts, out, overwrite=True, progress=False)
    wall = time.perf_counter() - start
    peak = rss_mib("VmHWM")
    result = {"method": method, "wall_s": round(wall, 1), "cpu_s": round(cpu_s() - cpu0, 1)}
    result |= {"peak_rss_mib": round(peak), "rss_before_mib": round(rss0), **m.report()}
    print(json.dumps(result))


def load_average() -> float:
    return os.getloadavg()[0]


def svd_costs(cfg: dict, tasks: int) -> None:
    """Seconds per SVD of one task matrix, per distinct 2-D shape of the pool and how many tensors have it: the full
    SVD (``svd=full``) and the randomized top-(rank/T) one (``svd=lowrank``: oversample 10, 2 power iterations)."""
    import torch

    shapes: dict[tuple[int, ...], int] = {}
    for shape in llama_shapes(cfg).values():
        if len(shape) == 2:
            shapes[shape] = shapes.get(shape, 0) + 1
    g = torch.Generator().manual_seed(0)
    print(f"{'shape':<16}{'tensors':>8}{'full (s)':>10}{'lowrank (s)':>12}", flush=True)
    for shape, count in shapes.items():
        m = 0.01 * torch.randn(shape, generator=g)
        k = min(shape) // tasks
        t0 = time.perf_counter()
        torch.linalg.svd(m, full_matrices=False)
        full = time.perf_counter() - t0
        t0 = time.perf_counter()
        torch.svd_lowrank(m, q=min(k + 10, min(shape)), niter=2)
        low = time.perf_counter() - t0
        print(f"{shape!s:<16}{count:>8}{full:>10.2f}{low:>12.2f}", flush=True)


#: mergelab's method config (conf/method) and overrides for each benchmarked method, as METHODS above.
CLI_METHODS = {
    "ta": ["method=task_arithmetic", "method.scaling=0.3"],
    "metagpt": ["method=metagpt"],
    "ties": ["method=ties", "method.k=20", "method.prune=global", "method.scaling=0.3"],
    "ties_per_tensor": ["method=ties", "method.k=20", "method.prune=per_tensor", "method.scaling=0.3"],
}

#: MergeKit's counterparts (its merge_method and per-model parameters; everything else its defaults).
MERGEKIT_METHODS = {
    "mergekit_ta": ("task_arithmetic", {"weight": 0.3}),
    "mergekit_ties": ("ties", {"weight": 0.3, "density": 0.2}),
}


def timed_process(cmd: list[str], cwd: Path) -> dict:
    """Run ``cmd`` to completion; its wall time, and CPU time and peak RSS as the kernel accounts them."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "rc": proc.returncode,
        "tail": out[-3000:],
    }


def end_to_end(
    work: Path, base: Path, experts: list[Path], methods: list[str], mergekit_venv: Path | None
) -> list[dict]:
    """Whole processes, mergelab's methods then MergeKit's, each after warming the page cache (see the docstring);
    one row per process that finished."""
    import shutil

    mergelab_bin = Path(sys.executable).parent / "mergelab"
    runs: list[tuple[str, list[str], Path]] = []
    pool = [
        f"model.pretrained={base}",
        "model.experts={" + ", ".join(f"e{i}: {e}" for i, e in enumerate(experts)) + "}",
    ]
    for m in methods:
        if m not in CLI_METHODS:
            sys.exit(f"--end-to-end: no command line for method {m!r} (known: {', '.join(CLI_METHODS)})")
        out = work / "e2e" / m
        cmd = [str(mergelab_bin), "model=checkpoints", *pool, *CLI_METHODS[m], "eval=none", "logger=none"]
        runs.append((m, [*cmd, f"hydra.run.dir={out}"], out))
    if mergekit_venv is not None:
        import yaml

        for name, (merge_method, params) in MERGEKIT_METHODS.items():
            out = work / "e2e" / name
            config = {
                "merge_method": merge_method,
                "base_model": str(base),
                "models": [{"model": str(e), "parameters": params} for e in experts],
                "dtype": "bfloat16",
            }
            config_file = work / "e2e" / f"{name}.yml"
            config_file.parent.mkdir(parents=True, exist_ok=True)
            config_file.write_text(yaml.safe_dump(config))
            runs.append((name, [str(mergekit_venv / "bin" / "mergekit-yaml"), str(config_file), str(out)], out))
    print(f"{'process':<18}{'wall (s)':>10}{'CPU (s)':>10}{'peak RSS (MiB)':>16}{'load before':>13}", flush=True)
    walls: dict[str, float] = {}
    rows = []
    for name, cmd, out in runs:
        shutil.rmtree(out, ignore_errors=True)  # the bench's own output from a previous run
        os.sync()
        read_files([base, *experts])
        load0 = load_average()
        r = timed_process(cmd, cwd=work)
        if r["rc"] != 0:
            print(f"{name:<18} failed (exit {r['rc']}):\n{r['tail']}", flush=True)
            continue
        walls[name] = r["wall_s"]
        rows.append({"process": name, **{k: round(r[k], 1) for k in ("wall_s", "cpu_s", "peak_rss_mib")}})
        rows[-1]["load_before"] = round(load0, 1)
        print(f"{name:<18}{r['wall_s']:>10.1f}{r['cpu_s']:>10.1f}{r['peak_rss_mib']:>16.0f}{load0:>13.1f}", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    for ref in ("mergekit_ta", "mergekit_ties"):
        if ref in walls:
            ratios = ", ".join(f"{n} {w / walls[ref]:.2f}x" for n, w in walls.items() if not n.startswith("mergekit"))
            print(f"wall time / {ref}: {ratios}", flush=True)
    return rows


def record(path: Path, section: str, rows: list[dict], **about: object) -> None:
    """Write ``rows`` as ``section`` of the JSON at ``path`` (dated, with the machine), keeping its other section."""
    from bench_first_hour import machine

    from mergelab.io.atomic import atomic_write_json

    data = json.loads(path.read_text()) if path.is_file() else {}
    data[section] = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), **about, "rows": rows}
    atomic_write_json(path, data)
    print(f"wrote {section} to {path}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/mergelab-bench")
    ap.add_argument("--methods", default="ta,metagpt,ties,ties_per_tensor")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument(
        "--svd-costs",
        action="store_true",
        help="only time one task matrix's SVD per distinct matrix shape of the pool: full vs randomized (lowrank)",
    )
    ap.add_argument(
        "--layers",
        type=int,
        default=None,
        help="decoder layers of the pool (default: TinyLlama's 22); fewer keep every tensor shape, embeddings and "
        "head included, so peak memory is the full model's, and time the per-tensor methods at a fraction of the cost",
    )
    ap.add_argument(
        "--end-to-end",
        action="store_true",
        help="time whole `mergelab` processes (and MergeKit's, with --mergekit-venv) instead of the merge alone",
    )
    ap.add_argument("--mergekit-venv", type=Path, default=None, help="a venv with mergekit installed (measuring only)")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_suffix(".json"), help="the JSON record")
    ap.add_argument("--child", nargs=4, metavar=("METHOD", "BASE", "EXPERTS", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, base, experts, out = args.child
        child(method, base, experts.split(","), out)
        return
    if args.svd_costs:
        svd_costs(LLAMA_1B, tasks=3)
        return
    cfg = LLAMA_1B if args.layers is None else {**LLAMA_1B, "num_hidden_layers": args.layers}
    work = Path(args.workdir) if args.layers is None else Path(args.workdir) / f"layers{args.layers}"
    base = work / "base"
    experts = [work / f"expert{i}" for i in range(3)]
    t0 = time.perf_counter()
    build_checkpoint(base, seed=1, base_seed=None, cfg=cfg)
    for i, e in enumerate(experts):
        build_checkpoint(e, seed=10 + i, base_seed=1, cfg=cfg)
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f} s under {work}", flush=True)
    size = sum(f.stat().st_size for d in [base, *experts] for f in d.glob("*.safetensors"))
    print(f"{size / 2**30:.1f} GiB of input files; 'read' = seconds to read them all just before the merge")
    if args.end_to_end:
        rows = []
        for _ in range(args.repeat):
            rows += end_to_end(work, base, experts, args.methods.split(","), args.mergekit_venv)
        if args.layers is None:
            record(args.out, "end_to_end", rows, input_gib=round(size / 2**30, 1))
        return
    rows = []
    cols = ("method", "read (s)", "wall (s)", "CPU (s)", "peak RSS", "RSS before", "load before", "load after")
    print(f"{cols[0]:<16}" + "".join(f"{c:>12}" for c in cols[1:]), flush=True)
    for _ in range(args.repeat):
        for method in args.methods.split(","):
            os.sync()  # start each run with no dirty pages left by the previous one
            read_s = read_files([base, *experts])
            load0 = load_average()
            pool = [str(base), ",".join(map(str, experts)), str(work / "out")]
            cmd = [sys.executable, __file__, "--child", method, *pool]
            res = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            load1 = load_average()
            if res.returncode != 0:
                print(f"{method:<16} failed:\n{res.stderr[-2000:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            extra = {k.rsplit("/", 1)[-1]: round(v, 4) for k, v in r.items() if k.startswith("lambda")}
            row = (read_s, r["wall_s"], r["cpu_s"], r["peak_rss_mib"], r["rss_before_mib"], load0, load1)
            cells = "".join(f"{v:>12.1f}" if isinstance(v, float) else f"{v:>12}" for v in row)
            print(f"{method:<16}{cells} {extra or ''}", flush=True)
            keys = ("read_s", "wall_s", "cpu_s", "peak_rss_mib", "rss_before_mib", "load_before", "load_after")
            rows.append({"method": method, **{k: round(float(v), 1) for k, v in zip(keys, row, strict=True)}})
    if args.layers is None:
        record(args.out, "merge", rows, input_gib=round(size / 2**30, 1))


if __name__ == "__main__":
    main()
