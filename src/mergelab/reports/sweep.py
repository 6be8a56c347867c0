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
    """One record per finished job under ``sweep_dir``: its overrides, objective and each row's averages."""
    records = []
    for metrics in sorted(Path(sweep_dir).glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        res = json.loads(metrics.read_text())
        rec: dict[str, Any] = {
            "job": metrics.parent.name,
            "overrides": " ".join(res.get("overrides", [])),
            res["objective"]["name"]: res["objective"]["value"],
        }
        for name, row in res["rows"].items():
            rec[f"{name}/avg_acc"] = row["avg_acc"]
            if row.get("avg_norm_acc") is not None:
                rec[f"{name}/avg_norm_acc"] = row["avg_norm_acc"]
        records.append(rec)
    return records


def write_summary(sweep_dir: str | Path) -> Path | None:
    """summary.json and summary.md in ``sweep_dir`` (None when no job finished)."""
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
