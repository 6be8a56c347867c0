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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Range:
    """A numeric option's range, declared on the constructor: ``chunk_elems: Annotated[int, Range(low=1)]``;
    ``low_open`` / ``high_open`` leave a bound out (``Range(0.0, 1.0, low_open=True)`` is (0, 1])."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` lies in the range (NaN never does)."""
        if math.isnan(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        return above and (self.high is None or (value < self.high if self.high_open else value <= self.high))

    def describe(self) -> str:
        """The range in words: ``in (0.0, 1.0]``, ``>= 1``, ``> 0.0``."""
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low!r}, {self.high!r}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low!r}"
        if self.high is not None:
            return f"{'<' if self.high_open else '<='} {self.high!r}"
        return "a number"

    def check(self, key: str, value: Any) -> None:
        """Refuse ``value`` outside the range (and NaN), naming ``key``."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return  # the type check names it
        if not self.contains(value):
            raise ValueError(f"{key} must be {self.describe()}, got {value!r}")


@dataclass(frozen=True)
class Doc:
    """An option's one-line documentation, declared on the constructor beside its type and range:
    ``density: Annotated[float, Range(0, 1), Doc("fraction of each task vector kept")] = 0.9``."""

    text: str


@dataclass(frozen=True)
class Length:
    """A list option's number of entries, declared beside its type: ``betas: Annotated[Sequence[float], Length(2),
    Range(0.0, 1.0, high_open=True)]`` (a ``Range`` on a list of numbers holds for each entry)."""

    n: int


@dataclass(frozen=True)
class Requires:
    """A condition between options, declared once on the class (``requires = (Requires(...),)``) where one
    option's range depends on another's value: ``holds`` takes the ``options`` as keywords, ``doc`` says the
    condition in words (the docs and the refusal both print it)."""

    options: tuple[str, ...]
    holds: Callable[..., bool]
    doc: str

    def check(self, values: Mapping[str, Any], label: Callable[[str], str]) -> None:
        """Refuse ``values`` (option -> value) that break the condition, naming the first option, the values and
        the condition; a condition over options ``values`` lacks is not checked here."""
        if not set(self.options) <= values.keys():
            return
        given = {k: values[k] for k in self.options}
        if not self.holds(**given):
            shown = ", ".join(f"{k}={v!r}" for k, v in given.items())
            raise ValueError(f"{label(self.options[0])} ({shown}): {self.doc}")


def check_fields(obj: Any, label: Callable[[str], str]) -> None:
    """Check a dataclass instance's fields against their annotations (``Annotated`` with ``Range``, ``Literal``
    choices, ``Length``): the same declaration a method's constructor option reuses."""
    hints = typing.get_type_hints(type(obj), include_extras=True)
    check_values(hints, {k: getattr(obj, k) for k in hints if hasattr(obj, k)}, label)


def literal_choices(hint: Any) -> tuple[Any, ...]:
    """The values of the ``Literal[...]`` among ``hint``'s alternatives (``Literal["a", "b"] | None`` -> a, b)."""
    return tuple(v for h in _alternatives(hint) if typing.get_origin(h) is typing.Literal for v in typing.get_args(h))


def target_class(target: str) -> type:
    """The class a dotted ``_target_`` names (ImportError / AttributeError when it does not resolve)."""
    module, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module), attr)


def constructor_hints(target: str) -> dict[str, Any]:
    """The type hints of ``target``'s ``__init__`` (a dotted class path), with their ``Annotated`` extras; empty
    when it cannot be resolved (the instantiation then reports its own error)."""
    try:
        return typing.get_type_hints(target_class(target).__init__, include_extras=True)
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


def _forms_error(key: str, allowed: set[Any], value: Any) -> str:
    """Why ``value`` is none of several container forms (and not null where null is allowed)."""
    origins = {typing.get_origin(h) for h in allowed}
    forms = ["null"] if type(None) in allowed else []
    forms += ["a list"] if origins & {abc.Sequence, list, tuple} else []
    forms += ["a mapping (name: value)"] if origins & {abc.Mapping, dict} else []
    return f"{key} must be {', '.join(forms[:-1])} or {forms[-1]}, got {type(value).__name__} {value!r}"


def _alternatives(hint: Any) -> set[Any]:
    origin = typing.get_origin(hint)
    return set(typing.get_args(hint)) if origin is typing.Union or origin is types.UnionType else {hint}


def check_option_types(node: Mapping[str, Any], label: Callable[[str], str], prefix: str = "") -> None:
    """Refuse a word for a number or a fraction for a whole number, as the constructor of ``node['_target_']``
    annotates its arguments; nested configs (a method inside a method) are checked under their key. ``label``
    turns a dotted key into how the error names it (e.g. ``model.chunk_elems``)."""
    target = node.get("_target_")
    hints = constructor_hints(target) if isinstance(target, str) and "." in target else {}
    check_values(hints, node, label, prefix)


def check_values(
    hints: Mapping[str, Any], values: Mapping[str, Any], label: Callable[[str], str], prefix: str = ""
) -> None:
    """Check ``values`` against their annotations ``hints`` (type, ``Range``, ``Literal`` choices), as
    :func:`check_option_types` does for a config node and a method's constructor does for its arguments."""
    for key, value in values.items():
        if isinstance(value, str) and value == "???":  # OmegaConf's missing value: composition reports it
            continue
        hint = hints.get(key) if not key.startswith("_") else None
        metadata = getattr(hint, "__metadata__", ())
        ranges = [m for m in metadata if isinstance(m, Range)]
        if hint is not None and typing.get_origin(hint) is typing.Annotated:
            hint = typing.get_args(hint)[0]  # Annotated[int, Range(...), Doc(...)] -> int
        allowed = _alternatives(hint) if hint is not None else set()
        if not (value is None and type(None) in allowed):
            containers = [h for h in allowed if typing.get_origin(h) in CONTAINERS]
            only_containers = len(containers) == len(allowed - {type(None)})
            if containers and only_containers and not any(h in allowed for h in (Any, str)):
                problems = [_container_error(label(prefix + key), h, value) for h in containers]
                if all(problems):
                    raise ValueError(
                        problems[0] if len(problems) == 1 else _forms_error(label(prefix + key), allowed, value)
                    )
        if _scalar_or_per_expert(allowed):
            _check_per_expert(label, prefix + key, ranges, value)
            continue
        lengths = [m for m in metadata if isinstance(m, Length)]
        if isinstance(value, list | tuple) and (ranges or lengths):
            _check_entries(label, prefix + key, ranges, lengths, value)
            continue
        if isinstance(value, Mapping):
            check_option_types(value, label, f"{prefix}{key}.")
            continue
        choices = literal_choices(hint) if hint is not None else ()
        if choices and not (value is None and type(None) in allowed):
            if isinstance(value, bool) or value not in choices:
                raise ValueError(f"{label(prefix + key)} must be one of {choices}, got {value!r}")
            continue
        _check_scalar(label(prefix + key), allowed, ranges, value)


def _scalar_or_per_expert(allowed: set[Any]) -> bool:
    """Whether an annotation's alternatives are a number, or one per expert as a mapping or a list of numbers (and
    nothing else): ``float | Mapping[str, float] | Sequence[float]``."""
    numbers = {int, float} & allowed
    containers = {h for h in allowed if typing.get_origin(h) in CONTAINERS and typing.get_args(h)[-1:] == (float,)}
    return bool(numbers) and bool(containers) and allowed == numbers | containers


def _check_per_expert(label: Callable[[str], str], key: str, ranges: Sequence[Range], value: Any) -> None:
    """A number, or a non-empty mapping {expert: number} or list of numbers, each in ``ranges`` (named by its
    expert or position: ``method option 'k.math'``, ``method option 'k[1]'``)."""
    if not isinstance(value, Mapping | list | tuple):
        _check_scalar(label(key), {float}, ranges, value)
        return
    if not value:
        raise ValueError(f"{label(key)} must be a number, a mapping (expert: number) or a list, got {value!r}")
    items = value.items() if isinstance(value, Mapping) else enumerate(value)
    for at, v in items:
        _check_scalar(label(f"{key}.{at}" if isinstance(value, Mapping) else f"{key}[{at}]"), {float}, ranges, v)


def _check_entries(
    label: Callable[[str], str], key: str, ranges: Sequence[Range], lengths: Sequence[Length], value: Sequence[Any]
) -> None:
    """A list of numbers of the declared length, each entry in ``ranges`` (named by position: ``'betas[1]'``)."""
    for length in lengths:
        if len(value) != length.n:
            raise ValueError(f"{label(key)} must be a list of {length.n} numbers, got {list(value)!r}")
    for at, v in enumerate(value):
        _check_scalar(label(f"{key}[{at}]"), {float}, ranges, v)


def _check_scalar(name: str, allowed: set[Any], ranges: Sequence[Range], value: Any) -> None:
    """A number where the annotation ``allowed`` (its alternatives) wants one, whole for an int, in ``ranges``."""
    if not allowed or any(typing.get_origin(h) is not None for h in allowed):
        return  # unannotated, or a container: checked by the caller
    if (value is None and type(None) in allowed) or str in allowed or Any in allowed:
        return
    if {int, float} & allowed and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if int in allowed and float not in allowed and isinstance(value, float) and not value.is_integer():
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    for r in ranges:
        r.check(name, value)
