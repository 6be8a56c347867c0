"""Config values checked against the annotations of the constructor that takes them.

Hydra passes a mistyped command-line override through as a word (``method.scaling=abc``, ``model.chunk_elems=1e``),
and the component's first comparison or ``int()`` then fails without naming the key. Checking every value against
``_target_``'s ``__init__`` annotations first names it, for every method, pool and suite, present and future."""

from __future__ import annotations

import collections.abc as abc
import importlib
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """A numeric option's range, declared on the constructor: ``chunk_elems: Annotated[int, Range(low=1)]``."""

    low: float | None = None
    high: float | None = None

    def check(self, key: str, value: Any) -> None:
        """Refuse ``value`` outside the range (and NaN), naming ``key``."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return  # the type check names it
        inside = not math.isnan(value) and (self.low is None or value >= self.low)
        inside = inside and (self.high is None or value <= self.high)
        if not inside:
            bounds = [f">= {self.low:g}" if self.low is not None else "", f"<= {self.high:g}" if self.high else ""]
            raise ValueError(f"{key} must be {' and '.join(b for b in bounds if b)}, got {value!r}")


def constructor_hints(target: str) -> dict[str, Any]:
    """The type hints of ``target``'s ``__init__`` (a dotted class path), with their ``Annotated`` extras; empty
    when it cannot be resolved (the instantiation then reports its own error)."""
    module, _, attr = target.rpartition(".")
    try:
        return typing.get_type_hints(getattr(importlib.import_module(module), attr).__init__, include_extras=True)
    except Exception:
        return {}


#: Annotations of containers whose form is checked (a mapping where one is expected, a list where a sequence is).
CONTAINERS = (abc.Mapping, dict, abc.Sequence, list, tuple)


def _container_error(key: str, hint: Any, value: Any) -> str | None:
    """Why ``value`` is not of the container type ``hint`` (a mapping or sequence annotation), or None."""
    origin = typing.get_origin(hint)
    if origin in (abc.Mapping, dict):
        if not isinstance(value, Mapping):
            return f"{key} must be a mapping (name: value), got {type(value).__name__} {value!r}"
        args = typing.get_args(hint)
        allowed = _alternatives(args[1]) if len(args) == 2 else {Any}
        if type(None) not in allowed and Any not in allowed:
            for k, v in value.items():
                if v is None:
                    return f"{key}.{k} is null; give a value (e.g. a hub id or a local dir)"
        return None
    is_list = isinstance(value, list | tuple)
    if origin in (abc.Sequence, list, tuple) and not is_list:
        return f"{key} must be a list, got {type(value).__name__} {value!r}"
    return None


def _alternatives(hint: Any) -> set[Any]:
    origin = typing.get_origin(hint)
    return set(typing.get_args(hint)) if origin is typing.Union or origin is types.UnionType else {hint}


def check_option_types(node: Mapping[str, Any], label: Callable[[str], str], prefix: str = "") -> None:
    """Refuse a word for a number or a fraction for a whole number, as the constructor of ``node['_target_']``
    annotates its arguments; nested configs (a method inside a method) are checked under their key. ``label``
    turns a dotted key into how the error names it (e.g. ``model.chunk_elems``)."""
    target = node.get("_target_")
    hints = constructor_hints(target) if isinstance(target, str) and "." in target else {}
    for key, value in node.items():
        if value == "???":  # OmegaConf's missing value: composition reports it, not a type
            continue
        hint = hints.get(key) if not key.startswith("_") else None
        ranges = [m for m in getattr(hint, "__metadata__", ()) if isinstance(m, Range)]
        if ranges:
            hint = typing.get_args(hint)[0]  # Annotated[int, Range(...)] -> int
        allowed = _alternatives(hint) if hint is not None else set()
        if not (value is None and type(None) in allowed):
            containers = [h for h in allowed if typing.get_origin(h) in CONTAINERS]
            only_containers = len(containers) == len(allowed - {type(None)})
            if containers and only_containers and not any(h in allowed for h in (Any, str)):
                problems = [_container_error(label(prefix + key), h, value) for h in containers]
                if all(problems):
                    raise ValueError(problems[0])
        if isinstance(value, Mapping):
            check_option_types(value, label, f"{prefix}{key}.")
            continue
        if hint is None or any(typing.get_origin(h) is not None for h in allowed):
            continue  # unannotated, or a container: checked above
        if (value is None and type(None) in allowed) or str in allowed or Any in allowed:
            continue
        if {int, float} & allowed and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"{label(prefix + key)} must be a number, got {value!r}")
        if int in allowed and float not in allowed and isinstance(value, float) and not value.is_integer():
            raise ValueError(f"{label(prefix + key)} must be a whole number, got {value!r}")
        for r in ranges:
            r.check(label(prefix + key), value)
