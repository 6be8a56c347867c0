"""Where mergelab's configs and data live: ``conf/`` and ``data/`` at the repository root (editable install)."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT_DIR = PACKAGE_DIR.parents[1]
CONFIG_DIR = ROOT_DIR / "conf"
DATA_DIR = ROOT_DIR / "data"
