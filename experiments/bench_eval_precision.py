"""Benchmark (not a test): scoring under bf16 autocast (``precision=bf16-mixed``) against fp32, on every task.

For the pretrained model and task arithmetic (scaling 0.3) of a suite's pool, scores the report split of every
task through the pool's own evaluation (``trainer.test``) once in ``32-true`` and once in ``bf16-mixed``, and
prints per task the accuracy in each, the share of examples whose prediction is the same in both (classifier
pools: argmax of the logits, recorded by a forward hook) and the wall time of each evaluation. This is what
``tuning.precision`` would change; reported scores always use ``trainer.precision``.

    python experiments/bench_eval_precision.py [--suite embedded|generative] [--max-examples N]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

SUITES = {
    "embedded": ["model=minilm_embedded", "eval=embedded"],
    "generative": ["model=smollm2", "eval=generative"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), default="embedded")
    parser.add_argument("--max-examples", type=int, default=None, help="examples per task (default: all)")
    args = parser.parse_args()

    import torch
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from mergelab.cli import CONFIG_DIR
    from mergelab.methods import TaskArithmetic
    from mergelab.run import quiet_libraries

    quiet_libraries()
    overrides = [*SUITES[args.suite], "logger=none", "trainer.enable_progress_bar=false"]
    if args.max_examples:
        overrides.append(f"eval.max_eval_examples={args.max_examples}")
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=overrides)
    trainer: dict[str, Any] = OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[assignment]
    suite = instantiate(cfg.eval)
    pool = instantiate(cfg.model)
    pool.setup(suite, trainer)
    merged = TaskArithmetic(scaling=0.3).run(pool)
    out: dict[str, Any] = {"suite": args.suite, "split": suite.report_split, "models": {}}
    for label, state in (("pretrained", None), ("task_arithmetic_0.3", merged)):
        per_precision: dict[str, Any] = {}
        for precision in ("32-true", "bf16-mixed"):
            model = pool.model(state)
            preds: list[torch.Tensor] = []
            if hasattr(model, "task_models"):  # a classifier: record every batch's argmax, in scoring order
                model.register_forward_hook(lambda _m, _i, o, out=preds: out.append(o.detach().float().argmax(-1)))
            start = time.perf_counter()
            scores = pool.evaluate(model, suite.report_split, {**trainer, "precision": precision})
            wall = time.perf_counter() - start
            per_precision[precision] = {
                "acc": {t: round(100 * s["acc"], 2) for t, s in scores.items()},
                "wall_s": round(wall, 1),
                "preds": torch.cat(preds) if preds else None,
            }
        a, b = per_precision["32-true"], per_precision["bf16-mixed"]
        row = {
            "acc_fp32": a["acc"],
            "acc_bf16": b["acc"],
            "tasks_with_equal_acc": sum(a["acc"][t] == b["acc"][t] for t in a["acc"]),
            "wall_fp32_s": a["wall_s"],
            "wall_bf16_s": b["wall_s"],
        }
        if a["preds"] is not None:
            row["same_prediction"] = round(float((a["preds"] == b["preds"]).float().mean()), 5)
            row["examples"] = int(a["preds"].numel())
        out["models"][label] = row
        print(json.dumps({label: row}), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
