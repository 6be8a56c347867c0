"""What lies behind the data-using rows of the embedded table (Fisher merging, AdaMerging, RegMean) and TSV-M's
kept rank, measured on the table's own experts. Writes experiments/data_methods_check.json; docs/methods.md
("Reading the data-using rows") cites it. Not a test: a few minutes on 2 cores when the experts and the Fisher and
Gram statistics are cached (as the table's run leaves them), longer otherwise (the experts are fine-tuned first).

    MERGELAB_CACHE=<the table run's cache> python experiments/data_methods_check.py            # every check
    MERGELAB_CACHE=<the table run's cache> python experiments/data_methods_check.py tsv_m      # one, updating the JSON

What it computes:

- Fisher merging (the table's options: 256 training examples per task, sampled labels, floor 1e-6): the share of
  Fisher values below the floor (the table's ``fisher_below_floor``), the share of coordinates where *every* expert
  is below it (there the merge is exactly weight averaging), each expert's share of the merge weight where it is
  not, how much of each expert's task vector survives, ||w_t * tau_t|| / ||tau_t|| (weight averaging: 1/T), each
  expert's confidence on those examples (mean max probability; mean 1 - sum_y p_y^2, the expected squared norm of
  the gradient of log p(y) with respect to the logits for y drawn from the expert), the merge's test scores and
  predicted classes, and the same merge with each expert's Fisher normalised (``normalize=true``).
- AdaMerging: the merge with the table's learned coefficients (``embedded_table/adamerging/adamerging.json``)
  rebuilt and scored, its predicted classes on each task, and the prediction entropy of the starting point (every
  coefficient 0.3, i.e. task arithmetic at 0.3) on the first training batch of each task (the fit's step 0, to
  check against ``entropy.csv``) and on the whole test split, against its maximum sum_t ln C_t.
- RegMean (alpha 1.0, the table's choice): the share of padding positions in the Gram matrices' batches, as
  mergelab forms them (length-sorted) and as the reference code does (random batches, padding included), and the
  test scores of the merge with the Gram matrices computed the reference code's way.
- TSV-M (alpha 1.0, the table's choice): every merged matrix whose rank is below the number of tasks, with the
  triplets kept per task by mergelab (at least 1) and by the reference code (int(r * (1/T)): 0 there, so the
  matrix stays pretrained), and the test scores of both.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from torch import Tensor, nn

from mergelab.cli import CONFIG_DIR
from mergelab.methods import AdaMerging, FisherMerging, RegMean, TaskArithmetic
from mergelab.methods.task_singular_vectors import TSVM
from mergelab.methods.task_statistics import expert_model
from mergelab.run import build, quiet_libraries
from mergelab.suites.base import subsample
from mergelab.text.suite import pad_batch

HERE = Path(__file__).resolve().parent
TABLE = HERE / "embedded_table"
OUT = HERE / "data_methods_check.json"


def predictions(pool: Any, state: Mapping[str, Tensor], split: str = "test") -> dict[str, dict[str, Any]]:
    """Per task: accuracy, predicted-class shares, true-class shares, and the mean prediction entropy (nats)."""
    model = pool.classifier(dict(state))
    model.eval()
    out = {}
    with torch.no_grad():
        for task in pool.tasks:
            preds, labels, ent = [], [], []
            for batch in pool.task_batches(task, split, None, 64, 0):
                logp = torch.log_softmax(pool.task_logits(model, task, batch).float(), -1)
                preds.append(logp.argmax(-1))
                labels.append(batch["labels"])
                ent.append(-(logp.exp() * logp).sum(-1))
            p, y, h = torch.cat(preds), torch.cat(labels), torch.cat(ent)
            c = model.num_labels(task)
            out[task] = {
                "acc": float((p == y).float().mean()),
                "predicted_class_shares": [round(float((p == k).float().mean()), 4) for k in range(c)],
                "true_class_shares": [round(float((y == k).float().mean()), 4) for k in range(c)],
                "mean_entropy": float(h.mean()),
                "max_entropy": math.log(c),
            }
    return out


def accuracies(pred: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    acc = {t: round(100 * v["acc"], 2) for t, v in pred.items()}
    return {**acc, "avg": round(sum(acc.values()) / len(acc), 2)}


def table_row(name: str) -> dict[str, float]:
    row = json.loads((TABLE / "metrics.json").read_text())["rows"][name]["scores"]
    acc = {t: round(100 * v["acc"], 2) for t, v in row.items()}
    return {**acc, "avg": round(sum(acc.values()) / len(acc), 2)}


# ----------------------------------------------------------------------------------------------- Fisher


def fisher_check(pool: Any) -> dict[str, Any]:
    method = FisherMerging()  # the table's options are the defaults
    method.prepare(pool)
    assert method.fishers is not None
    tasks = list(pool.tasks)
    base = pool.mergeable(pool.pretrained_state())
    experts = [pool.mergeable(s) for s in pool.expert_states()]
    floor = method.floor
    n = len(tasks)
    below = [0] * n
    mass = [0.0] * n
    total = all_below = 0
    weight_sum = [0.0] * n  # sum of w_t over coordinates where some expert is above the floor
    kept_sq = [0.0] * n  # ||w_t tau_t||^2
    tau_sq = [0.0] * n  # ||tau_t||^2
    for name in base:
        f = torch.stack([method.fishers[i][name].float() for i in range(n)])  # [T, *shape]
        tau = torch.stack([experts[i][name].float() - base[name].float() for i in range(n)])
        low = f < floor
        total += f[0].numel()
        all_low = low.all(0)
        all_below += int(all_low.sum())
        fc = f.clamp(min=floor)
        w = fc / fc.sum(0, keepdim=True)
        for i in range(n):
            below[i] += int(low[i].sum())
            mass[i] += float(f[i].double().sum())
            weight_sum[i] += float(w[i][~all_low].double().sum())
            kept_sq[i] += float((w[i] * tau[i]).double().square().sum())
            tau_sq[i] += float(tau[i].double().square().sum())
    informative = total - all_below
    per_expert = {}
    for i, task in enumerate(tasks):
        per_expert[task] = {
            "below_floor": below[i] / total,
            "fisher_sum": mass[i],
            "mean_weight_where_some_expert_above_floor": weight_sum[i] / max(informative, 1),
            "task_vector_kept": math.sqrt(kept_sq[i] / tau_sq[i]),
        }
    # Each expert's confidence on the examples its Fisher was estimated on (same subset: num_examples, seed).
    for i, task in enumerate(tasks):
        model = expert_model(pool, i)
        pmax, gsq = [], []
        with torch.no_grad():
            for batch in pool.task_batches(task, method.split, method.num_examples, 32, method.seed):
                p = torch.softmax(pool.task_logits(model, task, batch).float(), -1)
                pmax.append(p.max(-1).values)
                gsq.append(1.0 - p.square().sum(-1))
        per_expert[task]["mean_max_prob"] = float(torch.cat(pmax).mean())
        per_expert[task]["mean_1_minus_sum_p2"] = float(torch.cat(gsq).mean())
        per_expert[task]["classes"] = len(pool.suite.tasks[task].labels)
    merged = predictions(pool, method.run(pool))
    normalized = FisherMerging(normalize=True)
    normalized.prepare(pool)
    return {
        "options": {"num_examples": method.num_examples, "labels": method.labels, "floor": floor},
        "below_floor_all_values": sum(below) / (total * n),
        "table_fisher_below_floor": json.loads((TABLE / "metrics.json").read_text())["rows"]["fisher"]["method_report"][
            "fisher_below_floor"
        ],
        "coordinates": total,
        "coordinates_all_experts_below_floor": all_below / total,
        "per_expert": per_expert,
        "test_acc": accuracies(merged),
        "table_test_acc": table_row("fisher"),
        "weight_averaging_table_test_acc": table_row("weight_averaging"),
        "test_predictions": {t: v["predicted_class_shares"] for t, v in merged.items()},
        "test_true_classes": {t: v["true_class_shares"] for t, v in merged.items()},
        "normalize_true_test_acc": accuracies(predictions(pool, normalized.run(pool))),
    }


# ----------------------------------------------------------------------------------------------- AdaMerging


def adamerging_check(pool: Any) -> dict[str, Any]:
    saved = json.loads((TABLE / "adamerging" / "adamerging.json").read_text())
    coeffs: dict[str, dict[str, float]] = saved["coefficients"]
    tasks = list(pool.tasks)
    names = list(coeffs)
    method = AdaMerging()
    method.lambdas = torch.tensor([[coeffs[n][t] for n in names] for t in tasks])
    method.columns = {n: i for i, n in enumerate(names)}
    method.task_names = tasks
    method._prepared_for = pool  # the table's coefficients: no fit
    learned = predictions(pool, method.run(pool))
    start_state = TaskArithmetic(scaling=0.3).run(pool)  # every coefficient at its initial 0.3
    start = predictions(pool, start_state)
    # The fit's step 0: the first shuffled batch (16) of each task's test inputs, at the starting coefficients.
    model = pool.classifier(dict(start_state))
    model.eval()
    step0 = {}
    with torch.no_grad():
        for task in tasks:
            batch = pool.task_batches(task, "test", None, 16, 0, shuffle=True)[0]
            logp = torch.log_softmax(pool.task_logits(model, task, batch).float(), -1)
            step0[task] = float(-(logp.exp() * logp).sum(-1).mean())
    max_sum = sum(v["max_entropy"] for v in start.values())
    entropy_csv = (TABLE / "adamerging" / "entropy.csv").read_text().splitlines()
    return {
        "coefficients_from": str((TABLE / "adamerging" / "adamerging.json").relative_to(HERE.parent)),
        "lambda_means": {t: float(method.lambdas[i].mean()) for i, t in enumerate(tasks)},
        "table_lambda_means": {k: v for k, v in saved["report"].items() if k.startswith("lambda_")},
        "test_acc": accuracies(learned),
        "table_test_acc": table_row("adamerging"),
        "test_predictions": {t: v["predicted_class_shares"] for t, v in learned.items()},
        "test_true_classes": {t: v["true_class_shares"] for t, v in learned.items()},
        "max_entropy_sum": max_sum,
        "step0_entropy_sum": sum(step0.values()),
        "step0_entropy_per_task": step0,
        "entropy_csv_step0": float(entropy_csv[1].split(",")[1]),
        "entropy_csv_last": float(entropy_csv[-1].split(",")[1]),
        "start_test_entropy": {t: v["mean_entropy"] for t, v in start.items()},
        "start_test_entropy_share_of_max": {t: v["mean_entropy"] / v["max_entropy"] for t, v in start.items()},
        "start_test_entropy_sum": sum(v["mean_entropy"] for v in start.values()),
        "learned_test_entropy": {t: v["mean_entropy"] for t, v in learned.items()},
        "learned_test_entropy_sum": sum(v["mean_entropy"] for v in learned.values()),
        "start_test_acc": accuracies(start),
    }


# ----------------------------------------------------------------------------------------------- RegMean


def reference_style_grams(pool: Any, i: int, batches: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """X^T X / rows of every merged linear layer's inputs, padding positions included (the reference code)."""
    task = pool.tasks[i]
    model = expert_model(pool, i)
    keys = set(pool.mergeable(pool.pretrained_state()))
    grams: dict[str, Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str) -> Any:
        def record(module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
            grams[name] = grams[name].add_(x.T @ x) if name in grams else x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return record

    handles = [
        m.register_forward_pre_hook(hook(f"{n}.weight"))
        for n, m in model.backbone.named_modules()
        if isinstance(m, nn.Linear) and f"{n}.weight" in keys
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                pool.task_logits(model, task, batch)
    finally:
        for h in handles:
            h.remove()
    return {k: (g / rows[k]).float() for k, g in grams.items()}


def regmean_check(pool: Any) -> dict[str, Any]:
    alpha = json.loads((TABLE / "metrics.json").read_text())["rows"]["regmean"]["params"]["alpha"]
    ours = RegMean(alpha=alpha)
    ours.prepare(pool)
    ours_acc = accuracies(predictions(pool, ours.run(pool)))
    suite, tok = pool.suite, pool.tokenizer
    pad_id = tok.pad_token_id or 0
    pad_sorted, pad_random, ref_grams = {}, {}, []
    for i, task in enumerate(pool.tasks):
        sorted_batches = pool.task_batches(task, ours.split, ours.num_examples, ours.batch_size, ours.seed)
        pad_sorted[task] = 1 - sum(int(b["attention_mask"].sum()) for b in sorted_batches) / sum(
            b["attention_mask"].numel() for b in sorted_batches
        )
        rows = suite.tokenize(subsample(suite.dataset(task, ours.split), ours.num_examples, ours.seed), tok)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(ours.seed)).tolist()
        random_batches = [
            pad_batch([rows[j] for j in order[k : k + ours.batch_size]], pad_id)
            for k in range(0, len(order), ours.batch_size)
        ]
        pad_random[task] = 1 - sum(int(b["attention_mask"].sum()) for b in random_batches) / sum(
            b["attention_mask"].numel() for b in random_batches
        )
        ref_grams.append(reference_style_grams(pool, i, random_batches))
    ref = RegMean(alpha=alpha)
    ref.prepare(pool)
    ref.grams = ref_grams
    ref._inverse = {
        n: torch.linalg.inv(sum(ref.reduced(g, n) for g in ref_grams))
        for n in ours._inverse  # same layers
    }
    return {
        "alpha": alpha,
        "padding_share_sorted_batches": pad_sorted,
        "padding_share_random_batches": pad_random,
        "test_acc_padding_excluded": ours_acc,
        "table_test_acc": table_row("regmean"),
        "test_acc_padding_included_random_batches": accuracies(predictions(pool, ref.run(pool))),
    }


# ----------------------------------------------------------------------------------------------- TSV-M


def tsvm_check(pool: Any) -> dict[str, Any]:
    base = pool.mergeable(pool.pretrained_state())
    n = len(pool.tasks)
    small = {}
    for name, t in base.items():
        if t.dim() == 2 and min(t.shape) < n:
            r = min(t.shape)
            small[name] = {"shape": list(t.shape), "mergelab_k": TSVM().kept_rank(r, n), "reference_k": int(r / n)}
    ranks = sorted({min(t.shape) for t in base.values() if t.dim() == 2})
    alpha = json.loads((TABLE / "metrics.json").read_text())["rows"]["tsv_m"]["params"]["alpha"]
    state = TSVM(alpha=alpha).run(pool)
    # The reference code keeps int(r / T) = 0 triplets of such a matrix for every task: its merged task vector is 0,
    # so the matrix stays pretrained.
    reference = {k: (base[k] if k in small and small[k]["reference_k"] == 0 else t) for k, t in state.items()}
    return {
        "tasks": n,
        "matrix_ranks": ranks,
        "matrices_with_rank_below_tasks": small,
        "other_ranks_where_int_r_over_T_differs_from_r_floordiv_T": [r for r in ranks if int(r / n) != r // n],
        "alpha": alpha,
        "test_acc_mergelab": accuracies(predictions(pool, state)),
        "table_test_acc": table_row("tsv_m"),
        "test_acc_reference_rank_rule": accuracies(predictions(pool, reference)),
    }


CHECKS = {"tsv_m": tsvm_check, "adamerging": adamerging_check, "fisher": fisher_check, "regmean": regmean_check}


def main() -> None:
    names = sys.argv[1:] or list(CHECKS)
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise SystemExit(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    quiet_libraries()
    torch.manual_seed(0)
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=["logger=none", "trainer.enable_progress_bar=false"])
    trainer = {**dict(cfg.trainer), "enable_progress_bar": False}
    pool, suite = build(cfg.model), build(cfg.eval)
    pool.setup(suite, trainer)
    table_experts = json.loads((TABLE / "metrics.json").read_text())["experts"]
    same = {t: Path(str(pool.resolved[t])).name == Path(p).name for t, p in table_experts.items()}
    # Checks run alone (``python experiments/data_methods_check.py tsv_m``) update their entry of the record.
    record: dict[str, Any] = json.loads(OUT.read_text()) if OUT.exists() and sys.argv[1:] else {}
    record.update(
        {
            "date": dt.date.today().isoformat(),
            "command": "MERGELAB_CACHE=<cache> python experiments/data_methods_check.py [check ...]",
            "cache": os.environ.get("MERGELAB_CACHE", "~/.cache/mergelab"),
            "experts_are_the_tables": same,
            "torch_threads": torch.get_num_threads(),
        }
    )
    timings = record.setdefault("seconds", {})
    for key in names:
        t0 = time.perf_counter()
        record[key] = CHECKS[key](pool)
        timings[key] = round(time.perf_counter() - t0, 1)
        record[key]["date"] = record["date"]
        print(key, json.dumps(record[key])[:2000], flush=True)
    OUT.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
