"""Writing results: atomically, and never over an existing result unless asked."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

RESULT_FILES = ("metrics.json", "results.md", "results.csv", "config.yaml", "merged_model")


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON version of :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=float) + "\n")


def atomic_save_figure(fig: Any, path: str | Path) -> None:
    """Save a matplotlib figure through a temporary file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def move_dir_into_place(tmp: Path, final: Path) -> None:
    """Rename a completed temporary dir to ``final`` (which must not exist)."""
    if final.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"{final} already exists")
    tmp.rename(final)


@contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """A fresh temporary dir beside ``final`` to write into; moved into place when the block completes, removed if
    it raises, so ``final`` is never half-written (and must not exist: see :func:`move_dir_into_place`)."""
    final = Path(final)
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_dir_into_place(tmp, final)


def guard_output_dir(out_dir: str | Path, overwrite: bool, names: Iterable[str] = RESULT_FILES) -> None:
    """Refuse to run when ``out_dir`` already holds a result, unless ``overwrite`` is set."""
    out = Path(out_dir)
    existing = [n for n in names if (out / n).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"output dir {out} already holds {existing}; choose another hydra.run.dir or set overwrite=true"
        )
