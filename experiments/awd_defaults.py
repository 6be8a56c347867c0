"""How AWD's defaults were chosen: fit delta under several settings on the embedded suite's six experts, then
score AWD-TA on the validation split (best merge coefficient of a small grid). Prints one line per setting and
writes experiments/awd_defaults.json. Not a test: it takes tens of minutes on 2 cores.

    python experiments/awd_defaults.py                       # the settings below
    python experiments/awd_defaults.py granularity=tensor lr=0.1 alpha=0.1   # one setting (default optimiser)
    python experiments/awd_defaults.py optimizer=sgd lr_relative=false lr=1.0  # the old optimiser
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from mergelab.callbacks import MergeCallback
from mergelab.cli import CONFIG_DIR
from mergelab.methods import AWD, TaskArithmetic
from mergelab.run import build, quiet_libraries
from mergelab.suites.scoring import average
from mergelab.text.model import evaluate

# The objective's settings were compared with plain SGD at an absolute lr (the optimiser of the time; the records
# in awd_defaults.json); the current default optimiser (Adam, lr relative to rms(tau), guarded) is the last setting.
# Its robustness across pools is measured by experiments/awd_robustness.py.
OLD_SGD = {"optimizer": "sgd", "lr_relative": False}
SETTINGS = [
    {"granularity": "row", "lr": 0.01, **OLD_SGD},
    {"granularity": "row", "lr": 0.1, **OLD_SGD},
    {"granularity": "row", "lr": 1.0, **OLD_SGD},
    {"granularity": "tensor", "lr": 0.1, **OLD_SGD},
    {"granularity": "tensor", "lr": 1.0, **OLD_SGD},
    {"granularity": "model", "lr": 1.0, **OLD_SGD},
    {"granularity": "row"},
]
SCALINGS = [0.3, 0.5]


def parse(arg: str) -> tuple[str, object]:
    key, value = arg.split("=", 1)
    if value in ("true", "false"):
        return key, value == "true"
    try:
        return key, float(value)
    except ValueError:
        return key, value


def main() -> None:
    quiet_libraries()
    settings = [dict(parse(a) for a in sys.argv[1:])] if len(sys.argv) > 1 else SETTINGS
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose("config", overrides=["logger=none", "trainer.enable_progress_bar=false"])
    trainer = {**dict(cfg.trainer), "enable_progress_bar": False}
    pool, suite = build(cfg.model), build(cfg.eval)
    pool.setup(suite, trainer)
    results = []
    for setting in settings:
        t0 = time.perf_counter()
        method = AWD(**setting)
        method.prepare(pool, trainer)
        fit_s = time.perf_counter() - t0
        val = {}
        for scaling in SCALINGS:
            m = AWD(**setting, merge=TaskArithmetic(scaling=scaling))
            m.fit = method.fit
            val[scaling] = average(
                evaluate(
                    pool.classifier(), suite, "validation", pool.tokenizer, trainer, callbacks=[MergeCallback(m, pool)]
                )
            )
        rep = method.report()
        rec = {
            **setting,
            "fit_s": round(fit_s, 1),
            "val_avg_acc": val,
            "L_O": [rep["L_O_start"], rep["L_O_end"]],
            "mean_abs_cos": [rep["mean_abs_cos_before"], rep["mean_abs_cos_after"]],
            "delta_norm": rep["delta_norm"],
            "guard_backoffs": rep.get("guard_backoffs"),
        }
        results.append(rec)
        print(json.dumps(rec), flush=True)
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")
    out = Path(__file__).with_name("awd_defaults.json")
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
