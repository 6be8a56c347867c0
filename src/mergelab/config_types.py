"""Config values checked against the annotations of the constructor that takes them.

Hydra passes a mistyped command-line override through as a word (``method.scaling=abc``, ``model.chunk_elems=1e``),
and the component's first comparison or ``int()`` then fails without naming the key. Checking every value against
``_target_``'s ``__init__`` annotations first names it, for every method, pool and suite, present and future."""

from __future__ import annotations

import importlib
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any


def constructor_hints(target: str) -> dict[str, Any]:
    """The type hints of ``target``'s ``__init__`` (a dotted class path); empty when it cannot be resolved (the
    instantiation then reports its own error)."""
    module, _, attr = target.rpartition(".")
    try:
        return typing.get_type_hints(getattr(importlib.import_module(module), attr).__init__)
    except Exception:
        return {}


def check_option_types(node: Mapping[str, Any], label: Callable[[str], str], prefix: str = "") -> None:
    """Refuse a word for a number or a fraction for a whole number, as the constructor of ``node['_target_']``
    annotates its arguments; nested configs (a method inside a method) are checked under their key. ``label``
    turns a dotted key into how the error names it (e.g. ``model.chunk_elems``)."""
    target = node.get("_target_")
    hints = constructor_hints(target) if isinstance(target, str) and "." in target else {}
    for key, value in node.items():
        if isinstance(value, Mapping):
            check_option_types(value, label, f"{prefix}{key}.")
            continue
        hint = hints.get(key)
        if hint is None or key.startswith("_"):
            continue
        origin = typing.get_origin(hint)
        if origin is typing.Union or origin is types.UnionType:
            allowed = set(typing.get_args(hint))
        elif origin is None:
            allowed = {hint}
        else:  # a container (tuple[float, float], ...): left to the component's own checks
            continue
        if (value is None and type(None) in allowed) or str in allowed or Any in allowed:
            continue
        if {int, float} & allowed and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{label(prefix + key)} must be a number, got {value!r}")
        if int in allowed and float not in allowed and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{label(prefix + key)} must be a whole number, got {value!r}")
