"""Where mergelab's configs and data live, and where runs write their outputs.

In a source checkout (and an editable install) they are ``conf/`` and ``data/`` at the repository root; a wheel
(``pip install .``) carries the same files inside the package as ``mergelab/resources/{conf,data}``. Both are
read-only inputs: a run writes under :func:`output_root`, which is never inside an installed package. Nothing here
imports more than ``pathlib``: every entry point may use it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
_CHECKOUT = PACKAGE_DIR.parents[1]
#: True in a source checkout or an editable install (``conf/`` beside ``src/``); False for an installed wheel.
FROM_CHECKOUT = (_CHECKOUT / "conf" / "config.yaml").is_file()
#: The dir holding ``conf/`` and ``data/``: the checkout's root, else the installed package's resources.
ROOT_DIR = _CHECKOUT if FROM_CHECKOUT else PACKAGE_DIR / "resources"
CONFIG_DIR = ROOT_DIR / "conf"
DATA_DIR = ROOT_DIR / "data"


def output_root() -> Path:
    """The dir under which runs write (``runs/``, ``multirun/``, ``analysis/``): ``paths.output_root``.

    ``<repo>/outputs`` in a checkout or an editable install, so results stay with the sources whatever the current
    dir. An installed wheel writes to ``./outputs`` of the current directory, as Hydra apps do: its package dir may
    be read-only and is replaced by a reinstall. Absolute either way (the current dir is read when Hydra resolves its
    run dir, at startup).
    """
    return ROOT_DIR / "outputs" if FROM_CHECKOUT else Path.cwd() / "outputs"
