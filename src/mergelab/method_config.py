"""Method configs named inside other methods' configs (DARE's ``merge: ties``, MetaGPT's ``sparsify: dare``).

They are composed by Hydra as the root config composes ``method=<name>`` (nested ``/method@key: other`` defaults
expanded by Hydra itself) and resolved against the run's root config, so ``${seed}`` means the run's seed there as
it does in the method's own node (:func:`mergelab.run.method_candidates`). Outside a run (a method built in Python)
the root config's defaults stand in for the run's.

Only mergelab's own ``conf/`` is searched: a searchpath given to one run (``hydra.searchpath``) reaches methods
named by config group (``method@method.merge=...``), not by value.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from mergelab.locations import CONFIG_DIR

if TYPE_CHECKING:
    from omegaconf import DictConfig

#: The root config that named methods' interpolations resolve against (:func:`resolving_against`); None: the
#: root config's defaults.
_RUN_ROOT: ContextVar[DictConfig | None] = ContextVar("mergelab_run_root", default=None)


@contextmanager
def resolving_against(root: DictConfig) -> Iterator[None]:
    """Within the block, methods named by value resolve their interpolations against ``root`` (the run's config)."""
    token = _RUN_ROOT.set(root)
    try:
        yield
    finally:
        _RUN_ROOT.reset(token)


@functools.cache
def _composed_root(name: str) -> DictConfig:
    """The root config as Hydra composes it with ``method=<name>`` and nothing else (read once per name)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl  # what hydra.compose runs, minus its global
    from hydra._internal.utils import create_config_search_path
    from hydra.types import RunMode

    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONFIG_DIR)))
    return loader.load_configuration("config", overrides=[f"method={name}"], run_mode=RunMode.RUN)


def named_method_config(name: str) -> dict[str, Any]:
    """The config of ``conf/method/<name>.yaml`` as a plain dict: composed by Hydra, interpolations resolved against
    the run's config (see the module's doc). An unknown name is refused naming the file and the known names."""
    from omegaconf import OmegaConf, open_dict

    path = CONFIG_DIR / "method" / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml"))
        raise ValueError(f"no method config '{name}' ({path} does not exist); known: {known}")
    node = _composed_root(name).method
    root = _RUN_ROOT.get()
    if root is None:
        return OmegaConf.to_container(node, resolve=True)  # type: ignore[return-value]
    # Resolved where the run's own method node would be: in a shallow copy of the run's root (left unchanged).
    scratch = root.copy()
    with open_dict(scratch):
        scratch["_named_method_"] = node
    return OmegaConf.to_container(scratch["_named_method_"], resolve=True)  # type: ignore[return-value]
