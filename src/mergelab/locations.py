"""Where mergelab's configs and data live.

In a source checkout (and an editable install) they are ``conf/`` and ``data/`` at the repository root; a wheel
(``pip install .``) carries the same files inside the package as ``mergelab/resources/{conf,data}``. Nothing here
imports more than ``pathlib``: every entry point may use it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE_DIR.parents[1]
#: The dir holding ``conf/`` and ``data/``: the checkout's root, else the installed package's resources.
ROOT_DIR = _CHECKOUT if (_CHECKOUT / "conf" / "config.yaml").is_file() else PACKAGE_DIR / "resources"
CONFIG_DIR = ROOT_DIR / "conf"
DATA_DIR = ROOT_DIR / "data"
