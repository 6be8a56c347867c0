"""mergelab's MergeKit methods against ``mergekit-yaml`` on a small random Llama-shaped pool.

MergeKit is a measuring tool in its own venv, never a dependency::

    python3 -m venv /tmp/mkvenv && /tmp/mkvenv/bin/pip install torch==2.13.0 mergekit
    .venv/bin/python experiments/bench_mergekit_methods.py --mergekit /tmp/mkvenv/bin/mergekit-yaml

Writes ``experiments/bench_mergekit_methods.json``: per method, the max |mergelab - MergeKit| over all tensors
(float32 weights, MergeKit run with ``dtype: float32``). DELLA draws its drops from another generator than
MergeKit's, so only its deterministic limit (density 1) and its statistics can agree; it is listed for the record.
SLERP merges the base and the first expert (MergeKit's base_model and one model), with a scalar ``t`` and with
MergeKit's filter/gradient list; Karcher merges the three experts, and with ``base_model`` the base too. TIES with
per-model weights (one negative) keeps half of each tensor (an integer count for every tensor here, so MergeKit's
int(density x n) and mergelab's ceil agree); dare_ties with density 1 drops nothing, so it is deterministic.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from mergelab.engine.passes import merge_in_memory
from mergelab.io.writer import write_checkpoint
from mergelab.methods import DARE, DELLA, SCE, SLERP, TIES, Breadcrumbs, KarcherMean, ModelStock, NearSwap

HIDDEN, INTER, VOCAB, LAYERS = 32, 64, 96, 4  # 4 layers: a gradient is read between its points at layers 1 and 2
CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def shapes() -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN), "model.norm.weight": (HIDDEN,)}
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            out[f"{p}self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        out[f"{p}mlp.gate_proj.weight"] = (INTER, HIDDEN)
        out[f"{p}mlp.up_proj.weight"] = (INTER, HIDDEN)
        out[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTER)
        out[f"{p}input_layernorm.weight"] = (HIDDEN,)
        out[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    return out


def make_pool(root: Path) -> tuple[dict, list[dict], list[Path]]:
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g) for k, s in shapes().items()}
    experts = [
        {k: v + 0.05 * torch.randn(v.shape, generator=g) + 0.01 * (i - 1) for k, v in base.items()} for i in range(3)
    ]
    dirs = []
    for name, state in [("base", base), *[(f"e{i}", e) for i, e in enumerate(experts)]]:
        d = write_checkpoint(state, root / name)
        (d / "config.json").write_text(json.dumps(CONFIG))
        dirs.append(d)
    return base, experts, dirs


# MergeKit's usual SLERP gradient: attention and MLP go opposite ways across the layers, the rest at 0.5.
GRADIENT = [
    {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
    {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
    {"value": 0.5},
]
CASES = {
    "breadcrumbs": (Breadcrumbs(0.8, 0.05, [1.0, 0.5, 2.0]), {}, {"density": 0.8, "gamma": 0.05}),
    "breadcrumbs_ties": (Breadcrumbs(0.8, 0.05, consensus=True), {}, {"density": 0.8, "gamma": 0.05, "weight": 1.0}),
    "della": (DELLA(0.6, 0.2, seed=0), {}, {"density": 0.6, "epsilon": 0.2, "weight": 1.0}),
    "della_linear": (DELLA(0.6, 0.2, consensus=False, normalize=False), {}, {"density": 0.6, "epsilon": 0.2}),
    "model_stock": (ModelStock(), {}, {}),
    "model_stock_filter_wise": (ModelStock(filter_wise=True), {"filter_wise": True}, {}),
    "sce": (SCE(0.3), {"select_topk": 0.3}, {}),
    "sce_all": (SCE(1.0), {"select_topk": 1.0}, {}),
    "slerp": (SLERP(0.3), {"t": 0.3}, {}),
    "slerp_gradient": (SLERP(GRADIENT), {"t": GRADIENT}, {}),
    "karcher": (KarcherMean(), {}, {}),
    "karcher_pretrained": (KarcherMean(include_pretrained=True), {}, {}),
    "karcher_tol": (KarcherMean(tol=1e-7), {"tol": 1e-7}, {}),  # at the default tol these experts stop at step 0
    "nearswap": (NearSwap(0.02), {"t": 0.02}, {}),  # |tau| ~ 0.05 here: some coordinates taken whole, most stepped
    "ties_weights": (
        TIES(50.0, "per_tensor", "sum", 1.0, [1.0, -0.5, 2.0]),
        {"normalize": False},
        {"density": 0.5},
    ),
    "ties_weights_mean": (
        TIES(50.0, "per_tensor", "mean", 1.0, [0.5, 2.0, 1.0]),
        {"normalize": True},
        {"density": 0.5},
    ),
    "dare_ties_weights_p0": (
        DARE(0.0, merge=TIES(100.0, "per_tensor", "sum", 1.0, [1.0, -0.5, 2.0])),
        {"normalize": False},
        {"density": 1.0},
    ),
}
WEIGHTS = {
    "breadcrumbs": [1.0, 0.5, 2.0],
    "della_linear": [1.0, 1.0, 1.0],
    "ties_weights": [1.0, -0.5, 2.0],
    "ties_weights_mean": [0.5, 2.0, 1.0],
    "dare_ties_weights_p0": [1.0, -0.5, 2.0],
}
MERGE_METHOD = {"ties_weights": "ties", "ties_weights_mean": "ties", "dare_ties_weights_p0": "dare_ties"}
NO_BASE_MODEL = {"karcher", "karcher_tol"}  # the experts alone: no base_model in the MergeKit config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mergekit", default="/tmp/mkvenv/bin/mergekit-yaml")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, experts, dirs = make_pool(root)
        for name, (method, params, model_params) in CASES.items():
            mk_method = name.split("_filter_wise")[0].removesuffix("_all").removesuffix("_gradient")
            mk_method = MERGE_METHOD.get(name, mk_method.removesuffix("_pretrained").removesuffix("_tol"))
            count = method.expert_count  # SLERP: MergeKit's base_model and the first expert
            pool_experts = experts[:count] if count else experts
            cfgs = []
            for i in range(len(pool_experts)):
                mp = dict(model_params)
                if name in WEIGHTS:
                    mp["weight"] = WEIGHTS[name][i]
                cfgs.append(mp)
            models = "\n".join(
                f"  - model: {d}\n    parameters: {json.dumps(mp)}" if mp else f"  - model: {d}"
                for d, mp in zip(dirs[1 : 1 + len(pool_experts)], cfgs, strict=True)
            )
            base_model = "" if name in NO_BASE_MODEL else f"base_model: {dirs[0]}\n"
            text = (
                f"merge_method: {mk_method}\n{base_model}dtype: float32\n"
                f"parameters: {json.dumps(params)}\nmodels:\n{models}\n"
            )
            (root / f"{name}.yml").write_text(text)
            out = root / f"out_{name}"
            run = subprocess.run(
                [args.mergekit, str(root / f"{name}.yml"), str(out), "--no-copy-tokenizer"],
                capture_output=True,
                text=True,
            )
            if run.returncode != 0:
                results[name] = {"error": run.stderr[-800:]}
                continue
            theirs: dict = {}
            for f in out.glob("*.safetensors"):
                theirs.update(load_file(str(f)))
            ours = merge_in_memory(method, base, pool_experts)
            diffs = {k: float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours if k in theirs}
            moved = max(float((ours[k].double() - base[k].double()).abs().max()) for k in ours)
            results[name] = {
                "mergekit_yaml": text,
                "max_abs_diff": max(diffs.values()),
                "worst_tensor": max(diffs, key=diffs.__getitem__),
                "max_abs_change_from_base": moved,
                "tensors_compared": len(diffs),
            }
            if method.report():  # what the method says of its merge (Karcher: steps taken, unconverged tensors)
                results[name]["mergelab_report"] = method.report()
            print(name, results[name].get("max_abs_diff"))
    import importlib.metadata as md

    payload = {
        "date": datetime.date.today().isoformat(),
        "mergekit": subprocess.run(
            [
                str(Path(args.mergekit).parent / "python"),
                "-c",
                "import mergekit, importlib.metadata as m;print(m.version('mergekit'))",
            ],
            capture_output=True,
            text=True,
        ).stdout.strip(),
        "torch": md.version("torch"),
        "results": results,
    }
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
