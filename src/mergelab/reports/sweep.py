"""Aggregating a ``-m`` sweep: one row per job, written when the sweep ends."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from mergelab.io.atomic import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One record per job dir under ``sweep_dir``: its overrides, objective and each row's averages.

    Every run writes the same ``metrics.json`` schema: a merge-only run (``eval=none``) has a null objective and
    rows without scores, whose method report (e.g. MetaGPT's lambdas) is listed instead. A job dir without a
    readable ``metrics.json`` (failed, or still running) is listed with its ``status``.
    """
    records = []
    jobs = [p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith(".")]
    for job in sorted(jobs, key=lambda p: (len(p.name), p.name)):
        rec: dict[str, Any] = {"job": job.name}
        try:
            res = json.loads((job / "metrics.json").read_text())
        except FileNotFoundError:
            records.append({**rec, "status": "no metrics.json (failed or unfinished)"})
            continue
        except (OSError, json.JSONDecodeError) as e:
            records.append({**rec, "status": f"unreadable metrics.json: {e}"})
            continue
        rec["overrides"] = " ".join(res.get("overrides") or [])
        objective = res.get("objective") or {}
        if objective.get("name") is not None:
            rec[objective["name"]] = objective.get("value")
        for name, row in (res.get("rows") or {}).items():
            for key in ("avg_acc", "avg_norm_acc"):
                if row.get(key) is not None:
                    rec[f"{name}/{key}"] = row[key]
            if "scores" not in row:  # merge only: what the method computed is all there is
                for key, value in (row.get("method_report") or {}).items():
                    if isinstance(value, int | float) and not isinstance(value, bool):
                        rec[f"{name}/{key}"] = value
        if res.get("merged_model"):
            rec["merged_model"] = res["merged_model"]
        records.append(rec)
    return records


def write_summary(sweep_dir: str | Path) -> Path | None:
    """summary.json and summary.md in ``sweep_dir`` (None when it holds no job dir)."""
    records = summarize(sweep_dir)
    if not records:
        return None
    out = Path(sweep_dir)
    columns = list(dict.fromkeys(k for r in records for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in records:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in (r.get(c, "") for c in columns)]
        lines.append("| " + " | ".join(cells) + " |")
    atomic_write_text(out / "summary.md", "\n".join(lines) + "\n")
    atomic_write_json(out / "summary.json", records)
    return out / "summary.md"


class SweepSummary(Callback):
    """Hydra callback: after a multirun, aggregate the jobs' metrics into the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        path = write_summary(config.hydra.sweep.dir)
        if path is not None:
            log.info("sweep summary: %s\n%s", path, path.read_text())
