"""Measurement (not a test): are the trained and optimised artifacts other than AWD's delta (see
``experiments/awd_kernels.py``) the same bytes under every CPU kernel choice this machine can be forced into?

Each configuration below forces one kernel choice in a fresh process (``ATEN_CPU_CAPABILITY`` is read when torch is
imported, MKL's variables when MKL loads; torch's thread count is set first) and computes, at small sizes:

- ``expert``: a real expert fine-tune of the embedded MiniLM (:func:`mergelab.training.experts.build_expert`, the
  table's recipe -- AdamW lr 1.5e-4, weight decay 0.01, warm-up 0.1, batch 32, seed 0, fused AdamW -- on one task,
  ``--expert-examples`` training examples, one epoch, into a temporary cache): sha256 of the saved weights, the
  expert's own test and validation accuracy (its record: the whole 500-example test split) and, as the evaluation
  side of the same question, the sha256 of its logits on ``--logit-examples`` test examples;
- ``adamerging``: AdaMerging's learned coefficients (layer-wise, the table's options except ``--ada-steps`` steps on
  ``--ada-examples`` test inputs per task) over the table's six embedded experts, and the entropy per step;
- ``fisher``: the diagonal Fisher of the first expert (the table's options: training split, sampled labels, seed 0)
  on ``--fisher-examples`` examples;
- ``regmean``: the RegMean Gram matrices of the first expert (training split, batch 16, seed 0) on
  ``--gram-examples`` examples.

Each child writes its tensors to a temporary dir; the parent hashes nothing itself but compares every child's
tensors with the first configuration's (max abs difference, and the largest value for scale) and writes
``experiments/artifact_kernels.json``.

    MERGELAB_KERNELS_EXPERTS=/tmp/cold_cache/experts python experiments/artifact_kernels.py [--configs a,b,...]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

from kernel_choices import ROOT, cpu_seconds, run_in_process, table_experts  # experiments/, beside this file

OUT = ROOT / "experiments" / "artifact_kernels.json"

#: Kernel choices: (name, environment, torch threads), as in experiments/awd_kernels.py. "machine/2" is what this
#: machine picks on its own (no variable set; AVX512 here) with 2 threads; "machine/2 again" repeats it, to tell
#: run-to-run noise (none expected) from a kernel effect.
CONFIGS = [
    ("machine/2", {}, 2),
    ("machine/2 again", {}, 2),
    ("avx512/1", {"ATEN_CPU_CAPABILITY": "avx512"}, 1),
    ("avx2/1", {"ATEN_CPU_CAPABILITY": "avx2"}, 1),
    ("default/1", {"ATEN_CPU_CAPABILITY": "default"}, 1),
    ("avx2/2", {"ATEN_CPU_CAPABILITY": "avx2"}, 2),
    ("avx512/2 mkl=avx2", {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}, 2),
    ("avx512/2 mkl_cbwr=compatible", {"ATEN_CPU_CAPABILITY": "avx512", "MKL_CBWR": "COMPATIBLE"}, 2),
]
ARTIFACTS = ("expert", "expert_logits", "adamerging", "fisher", "regmean")
CPU_TRAINER = {"accelerator": "cpu", "devices": 1, "precision": "32-true", "enable_progress_bar": False}


def sha(tensors: dict) -> str:
    """sha256 (first 16 hex digits) of the bytes of a dict of tensors, in sorted key order (keys included)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- child


def child(args: argparse.Namespace) -> dict:
    """Every artifact under this process's kernel choice; tensors saved under ``args.out``."""
    import torch
    from hydra import compose, initialize_config_dir
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from mergelab.cli import CONFIG_DIR, minilm_path
    from mergelab.methods import AdaMerging
    from mergelab.methods.fisher import fisher_diagonal
    from mergelab.methods.regmean import gram_matrices
    from mergelab.run import build, quiet_libraries
    from mergelab.text.pool import ClassifierPool
    from mergelab.training.experts import build_expert

    quiet_libraries()
    out_dir = Path(args.child)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=["logger=none"])
    suite = build(cfg.eval)
    recipe = {k: v for k, v in dict(cfg.model.finetune).items()}
    recipe.update(epochs=1, max_train_examples=args.expert_examples)
    result: dict = {"recipe": recipe}
    timing: dict = {}

    # 1. expert fine-tune (fresh cache: always trained here)
    t0 = cpu_seconds()
    with tempfile.TemporaryDirectory() as cache:
        d = build_expert(minilm_path(), suite, args.task, recipe, cache, CPU_TRAINER)
        weights = load_file(str(d / "model.safetensors"))
        record = json.loads((d / "mergelab_expert.json").read_text())
        model = AutoModelForSequenceClassification.from_pretrained(d).eval()
        tok = AutoTokenizer.from_pretrained(d)
        ds = suite.dataset(args.task, "test", args.logit_examples)
        with torch.no_grad():
            logits = torch.cat(
                [
                    model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                    for b in suite.dataloader(ds, tok, shuffle=False, batch_size=64, seed=0)
                ]
            )
    save_file(weights, str(out_dir / "expert.safetensors"))
    save_file({"logits": logits.contiguous()}, str(out_dir / "expert_logits.safetensors"))
    result["expert"] = {
        "sha256": sha(weights),
        "test_acc": record["scores"]["test"]["acc"],
        "validation_acc": record["scores"]["validation"]["acc"],
        "train_examples": record["train_examples"],
    }
    result["expert_logits"] = {"sha256": sha({"logits": logits}), "examples": int(logits.shape[0])}
    timing["expert_cpu_s"] = round(cpu_seconds() - t0, 1)

    # 2-4. over the table's experts
    with tempfile.TemporaryDirectory() as cache:
        pool = ClassifierPool(minilm_path(), experts={t: str(d) for t, d in table_experts().items()}, cache_dir=cache)
        pool.setup(suite, CPU_TRAINER)

        t0 = cpu_seconds()
        ada = AdaMerging(split="test", max_examples=args.ada_examples, steps=args.ada_steps, batch_size=16, seed=0)
        ada.prepare(pool, CPU_TRAINER)
        assert ada.lambdas is not None
        lam = {"lambdas": ada.lambdas.contiguous()}
        save_file(lam, str(out_dir / "adamerging.safetensors"))
        result["adamerging"] = {
            "sha256": sha(lam),
            "entropy_sha256": hashlib.sha256(json.dumps(ada.entropy).encode()).hexdigest()[:16],
            "entropy_end": ada.entropy[-1],
            "lambda_mean": float(ada.lambdas.mean()),
            "steps": args.ada_steps,
        }
        timing["adamerging_cpu_s"] = round(cpu_seconds() - t0, 1)

        t0 = cpu_seconds()
        fisher = fisher_diagonal(pool, 0, "train", args.fisher_examples, "sample", 0, progress=False)
        fisher = {k: v.contiguous() for k, v in fisher.items()}
        save_file(fisher, str(out_dir / "fisher.safetensors"))
        result["fisher"] = {"sha256": sha(fisher), "task": pool.tasks[0], "examples": args.fisher_examples}
        timing["fisher_cpu_s"] = round(cpu_seconds() - t0, 1)

        t0 = cpu_seconds()
        grams = gram_matrices(pool, 0, "train", args.gram_examples, 16, 0, progress=False)
        grams = {k: v.contiguous() for k, v in grams.items()}
        save_file(grams, str(out_dir / "regmean.safetensors"))
        result["regmean"] = {"sha256": sha(grams), "task": pool.tasks[0], "examples": args.gram_examples}
        timing["regmean_cpu_s"] = round(cpu_seconds() - t0, 1)
    result["cpu_s"] = timing
    return result


# ------------------------------------------------------------------------------------------------- parent


def run_child(cfg: tuple, args: argparse.Namespace, out: Path) -> dict:
    name, env_vars, threads = cfg
    out.mkdir(parents=True)
    cmd = [sys.executable, __file__, "--child", str(out), "--threads", str(threads)]
    for opt in ("task", "expert_examples", "logit_examples", "ada_examples", "ada_steps", "fisher_examples"):
        cmd += [f"--{opt.replace('_', '-')}", str(getattr(args, opt))]
    cmd += ["--gram-examples", str(args.gram_examples)]
    res = run_in_process(name, cmd, env_vars, tail=3000)
    if "error" in res:
        return res
    print(name, json.dumps(res), flush=True)
    return res


def differences(ref: Path, other: Path) -> dict:
    """Per artifact: max abs difference of ``other``'s tensors from ``ref``'s, the largest abs value (scale) and
    the number of tensors that differ at all."""
    from safetensors.torch import load_file

    out = {}
    for art in ARTIFACTS:
        a, b = load_file(str(ref / f"{art}.safetensors")), load_file(str(other / f"{art}.safetensors"))
        diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a}
        out[art] = {
            "max_abs_diff": max(diffs.values()),
            "max_abs": max(float(t.abs().max()) for t in a.values()),
            "tensors_differing": sum(d > 0 for d in diffs.values()),
            "tensors": len(diffs),
        }
        if art == "expert":  # relative to the fine-tune's own change of the weights, where they differ
            out[art]["largest_differing_tensor"] = max(diffs, key=lambda k: diffs[k])
    return out


def run_all(args: argparse.Namespace) -> None:
    configs = [c for c in CONFIGS if args.configs is None or c[0] in args.configs.split(",")]
    entry: dict = {
        "date": datetime.date.today().isoformat(),
        "command": "MERGELAB_KERNELS_EXPERTS=/tmp/cold_cache/experts python experiments/artifact_kernels.py",
        "sizes": {
            "expert": f"task {args.task}, {args.expert_examples} training examples, 1 epoch (table recipe otherwise)",
            "expert_logits": f"{args.logit_examples} test examples of the fine-tuned expert",
            "adamerging": f"layer-wise, {args.ada_steps} steps, {args.ada_examples} test inputs per task, batch 16",
            "fisher": f"first table expert, {args.fisher_examples} training examples, sampled labels",
            "regmean": f"first table expert, {args.gram_examples} training examples, batch 16",
        },
        "machine": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
    }
    with tempfile.TemporaryDirectory() as tmp:
        runs, dirs = [], []
        for i, c in enumerate(configs):
            dirs.append(Path(tmp) / str(i))
            runs.append(run_child(c, args, dirs[-1]))
        ok = [(r, d) for r, d in zip(runs, dirs, strict=True) if "error" not in r]
        if ok:
            ref_run, ref_dir = ok[0]
            for r, d in ok[1:]:
                r["vs_" + ref_run["config"]] = differences(ref_dir, d)
    entry["runs"] = runs
    ok_runs = [r for r in runs if "error" not in r]
    summary = {}
    for art in ARTIFACTS:
        hashes = {r["config"]: r[art]["sha256"] for r in ok_runs}
        s: dict = {"byte_identical": len(set(hashes.values())) == 1, "distinct_hashes": len(set(hashes.values()))}
        if not s["byte_identical"]:
            s["max_abs_diff"] = max(r["vs_" + ok_runs[0]["config"]][art]["max_abs_diff"] for r in ok_runs[1:])
            s["max_abs"] = ok_runs[1]["vs_" + ok_runs[0]["config"]][art]["max_abs"]
            # which configs share a hash
            groups: dict = {}
            for cfg_name, h in hashes.items():
                groups.setdefault(h, []).append(cfg_name)
            s["groups"] = list(groups.values())
        summary[art] = s
    accs = [r["expert"]["test_acc"] for r in ok_runs]
    if accs:
        summary["expert"]["test_acc_min_max"] = [min(accs), max(accs)]
        vals = [r["expert"]["validation_acc"] for r in ok_runs]
        summary["expert"]["validation_acc_min_max"] = [min(vals), max(vals)]
    entry["summary"] = summary
    OUT.write_text(json.dumps(entry, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=None, help="comma-separated config names (default: all)")
    ap.add_argument("--task", default="tweet_sentiment")
    ap.add_argument("--expert-examples", type=int, default=256)
    ap.add_argument("--logit-examples", type=int, default=256)
    ap.add_argument("--ada-examples", type=int, default=32)
    ap.add_argument("--ada-steps", type=int, default=8)
    ap.add_argument("--fisher-examples", type=int, default=64)
    ap.add_argument("--gram-examples", type=int, default=128)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        out = child(args)
        out["capability"] = torch.backends.cpu.get_cpu_capability()
        out["threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(out), flush=True)
        return
    run_all(args)


if __name__ == "__main__":
    main()
