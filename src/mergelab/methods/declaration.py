"""What a merge method declares about itself, in one place that the checks, docs, card and MergeKit read.

A method class (one module under ``methods/`` plus one ``conf/method`` YAML) declares:

- its options, on its constructor: ``density: Annotated[float, Range(0.0, 1.0, low_open=True), Doc("...")] = 0.9``
  (choices as ``Literal[...]``, a list's length as ``Length``), and as ``requires`` (a tuple of
  :class:`~mergelab.config_types.Requires`) the conditions between options. :func:`checked_init` checks every
  construction against them (the config path checks the same annotations first, through
  :func:`mergelab.config_types.check_option_types`);
- ``reference``: the paper (title, authors and year, arXiv id or URL), or "MergeKit's X" for methods defined there;
- ``mergekit``: a :class:`MergeKitMapping` (how it exports to MergeKit and how MergeKit configs read back), or a
  string saying why MergeKit has no equivalent.

Only what a class declares itself counts (a subclass may merge differently: it declares again).
"""

from __future__ import annotations

import collections.abc as abc
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mergelab.config_types import Doc, Length, Range, Requires, check_values, literal_choices

#: The label a constructor's refusal names an option by (as the config path does).
OPTION_LABEL = "method option '{}'"

#: Per-expert weights as a config gives them: null (all 1), a list in expert order, or {expert: weight}.
ExpertWeights = Mapping[str, float] | Sequence[float] | None

#: An option one number for every expert, or one per expert (MergeKit's per-model ``density``): a number, a list in
#: expert order, or {expert: value} naming every expert; each value checked against the option's ``Range``.
PerExpertFloat = float | Mapping[str, float] | Sequence[float]

#: A per-model MergeKit parameter without a default: every model must give it.
REQUIRED = object()


# ----------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Option:
    """One constructor option as declared: its annotation's type, range, choices and doc, and its default."""

    name: str
    type: str
    default: Any
    doc: str
    range: Range | None = None
    choices: tuple[Any, ...] = ()
    length: int | None = None  # a list option's declared number of entries
    entries: bool = False  # a list of numbers whose range holds for each entry

    def allowed(self) -> str:
        """The values it takes, in words (its choices, else its length and range, else empty)."""
        if self.choices:
            return " | ".join(str(c) for c in self.choices)
        described = self.range.describe() if self.range is not None else ""
        if self.entries and described:
            described = f"each {described}"
        if self.length is not None:
            return f"{self.length} numbers{', ' + described if described else ''}"
        return described


def init_hints(cls: type) -> dict[str, Any]:
    """The annotations of ``cls.__init__`` with their ``Annotated`` extras (a ValueError naming the class when they
    do not resolve: a declaration must be readable)."""
    try:
        return typing.get_type_hints(cls.__init__, include_extras=True)
    except Exception as e:
        raise ValueError(f"{cls.__module__}.{cls.__qualname__}.__init__: annotations do not resolve ({e})") from None


def _type_text(hint: Any) -> str:
    text = str(hint).replace("typing.", "").replace("collections.abc.", "")
    return text.removeprefix("<class '").removesuffix("'>")


def _list_of_numbers(hint: Any) -> bool:
    """Whether ``hint`` is a list of numbers and not a number too (a per-expert option is either)."""
    alternatives = set(typing.get_args(hint)) if isinstance(hint, types.UnionType) else {hint}
    lists = [h for h in alternatives if typing.get_origin(h) in (abc.Sequence, list, tuple)]
    return bool(lists) and not ({int, float} & alternatives)


def options(cls: type) -> list[Option]:
    """The constructor options of ``cls`` in signature order, as their annotations declare them."""
    hints = init_hints(cls)
    out = []
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        hint = hints.get(name, Any)
        extras = getattr(hint, "__metadata__", ())
        base = typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Annotated else hint
        default = None if param.default is inspect.Parameter.empty else param.default
        out.append(
            Option(
                name=name,
                type=_type_text(base),
                default=default,
                doc=next((m.text for m in extras if isinstance(m, Doc)), ""),
                range=next((m for m in extras if isinstance(m, Range)), None),
                choices=literal_choices(base),
                length=next((m.n for m in extras if isinstance(m, Length)), None),
                entries=_list_of_numbers(base),
            )
        )
    return out


def requirements(cls: type) -> tuple[Requires, ...]:
    """The conditions between options ``cls`` declares (``requires``; a subclass keeps its parent's unless it
    declares its own), checked on construction after each option's own declaration."""
    return tuple(getattr(cls, "requires", ()))


def checked_init(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` (a method's ``__init__``) preceded by the check of its arguments against its own annotations, so a
    method built in Python (tests, a wrapper's inner method) is refused as a config is, naming the option."""
    if getattr(init, "__checks_options__", False):
        return init
    cached: dict[str, Any] = {}

    @functools.wraps(init)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> None:
        if not cached:
            cached["signature"] = inspect.signature(init)
            try:
                cached["hints"] = typing.get_type_hints(init, include_extras=True)
            except Exception:  # unresolvable annotations (e.g. a test's ad hoc method): nothing declared to check
                cached["hints"] = {}
        bound = cached["signature"].bind(self, *args, **kwargs)
        bound.apply_defaults()
        # A config object (an OmegaConf node) is checked when the method builds it (build_method), resolved.
        arguments = list(bound.arguments.items())[1:]
        values = {k: v for k, v in arguments if k in cached["hints"] and not _unresolved_mapping(v)}
        check_values(cached["hints"], values, OPTION_LABEL.format)
        for condition in requirements(type(self)):
            condition.check(values, OPTION_LABEL.format)
        init(self, *args, **kwargs)

    wrapper.__checks_options__ = True  # type: ignore[attr-defined]
    return wrapper


def _unresolved_mapping(value: Any) -> bool:
    """A mapping that is not a plain dict (an OmegaConf node, whose ``${...}`` may need its root to resolve)."""
    return isinstance(value, Mapping) and not isinstance(value, dict)


# ----------------------------------------------------------------------------------------------- MergeKit


class NotExpressible(ValueError):
    """A mergelab merge that MergeKit does not define the same way (the message says why)."""


@dataclass(frozen=True)
class MergeKitMethod:
    """A MergeKit merge method as mergelab reads it: its shared and per-model parameters with MergeKit's defaults
    (:data:`REQUIRED`: none), booleans where the default is one; ``base_in_models``: the base model is one of the
    models merged (``linear``), not the origin of task vectors."""

    name: str
    shared: Mapping[str, Any]
    per_model: Mapping[str, Any]
    base_in_models: bool = False
    #: Parameters whose value may be a list or mapping (SLERP's layer gradients and filters), handed to the
    #: method's reader as written.
    structured: tuple[str, ...] = ()

    def is_flag(self, key: str) -> bool:
        return isinstance({**self.per_model, **self.shared}.get(key), bool)


@dataclass
class Exported:
    """A merge in MergeKit's terms: ``merge_method``, per-model parameters (one mapping for every model, or a list
    of one per expert), shared ``parameters`` and notes on where the implementations may differ in the last bits;
    ``base_listed``: the base model is listed under ``models`` with weight 0 (``linear``)."""

    merge_method: str
    per_model: Any
    shared: dict[str, Any]
    notes: list[str] = field(default_factory=list)
    base_listed: bool = False
    #: Whether the config names the pool's pretrained model as ``base_model`` (a Karcher mean of the experts alone
    #: does not: MergeKit would average it in).
    base_model: bool = True


@dataclass
class Import:
    """A MergeKit config as a mergelab run: the pretrained model, the experts (name -> path or hub id) and the
    method overrides."""

    pretrained: str
    experts: dict[str, str]
    method: list[str]


@dataclass
class MergeKitInput:
    """A MergeKit config read and checked generically, for a method's :meth:`MergeKitMapping.read`: its base model,
    experts (name -> reference; the base left out unless ``base_in_models``), each expert's per-model parameters and
    the shared ones (MergeKit's defaults filled in), and ``fail(key, problem)``, the one-line error to raise."""

    merge_method: str
    base: str | None
    experts: dict[str, str]
    models: list[dict[str, Any]]
    shared: dict[str, Any]
    fail: Callable[[str, str], ValueError]

    def column(self, key: str) -> list[Any]:
        """Each expert's value of the per-model parameter ``key``."""
        return [m[key] for m in self.models]

    def single(self, key: str) -> Any:
        """The one value every expert gives the per-model parameter ``key`` (refused when they differ)."""
        values = self.column(key)
        if len(set(values)) > 1:
            raise self.fail(f"models[].parameters.{key}", f"{values} differ: mergelab uses one {key}")
        return values[0]

    def by_expert(self, values: Sequence[float]) -> str:
        """Per-expert values as a Hydra mapping override value, keyed by expert name: ``{a: 1.0, b: 2.0}``."""
        return "{" + ", ".join(f"{n}: {v!r}" for n, v in zip(self.experts, values, strict=True)) + "}"

    def one_or_each(self, values: Sequence[float]) -> str:
        """Per-expert values as an override value: the one number when they are all equal, else :meth:`by_expert`."""
        return repr(values[0]) if len(set(values)) == 1 else self.by_expert(values)

    def imported(self, overrides: list[str]) -> Import:
        """The run: the base model, the experts and the method ``overrides``."""
        assert self.base is not None
        return Import(self.base, dict(self.experts), overrides)


class MergeKitMapping:
    """How one mergelab method class exports to MergeKit and how configs of MergeKit's ``reads`` merge methods read
    back into mergelab overrides. A method declares an instance as its ``mergekit`` class attribute."""

    #: The MergeKit merge methods this mapping reads.
    reads: tuple[MergeKitMethod, ...] = ()

    #: Option values under which the method's conf/method YAMLs export (none: they do as they are), for the docs
    #: and the round-trip test.
    expressible: Mapping[str, Any] = {}

    def export(self, method: Any, n_experts: int) -> Exported:
        """``method`` (an instance of the declaring class) merging ``n_experts`` experts, in MergeKit's terms;
        :class:`NotExpressible` for option combinations MergeKit does not compute."""
        raise NotExpressible(f"{type(method).__name__}: mergelab does not write a MergeKit config for it")

    def read(self, config: MergeKitInput) -> Import:
        """The mergelab run equivalent to ``config`` (one of :attr:`reads`); ``config.fail`` for what has none."""
        raise config.fail("merge_method", f"{config.merge_method!r} is not read by {type(self).__name__}")


def declared(cls: type, attribute: str) -> Any:
    """What ``cls`` itself declares as ``attribute`` (``reference``, ``mergekit``): None when only a base class
    does, since a subclass may merge differently."""
    return cls.__dict__.get(attribute)


def mergekit_of(cls: type) -> MergeKitMapping | str:
    """``cls``'s MergeKit declaration: a mapping, or the reason MergeKit has no equivalent."""
    found = declared(cls, "mergekit")
    if isinstance(found, MergeKitMapping | str):
        return found
    return f"{cls.__name__} declares no MergeKit mapping or reason (its class attribute mergekit)"


def same_or_each(per: list[dict[str, Any]]) -> Any:
    """One mapping when every expert has the same parameters (the config written before per-expert weights), else
    the list, one per expert."""
    return per[0] if all(p == per[0] for p in per) else per


def decimal(x: float) -> float:
    """``x`` to 12 significant digits: a coefficient derived from decimal YAML values (0.7 -> p = 0.3, not
    0.30000000000000004), so that a config mergelab wrote reads back to the very same options."""
    return float(f"{x:.12g}")


def quote(value: str) -> str:
    """``value`` as a single-quoted string in Hydra's override grammar, where a backslash is literal unless backslashes
    precede a quote (the string's end included): those are doubled, and a quote inside is escaped."""
    escaped = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    escaped = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, escaped)
    return f"'{escaped}'"


def override_value(value: Any) -> str:
    """``value`` (a number, string, boolean, None, or lists and mappings of them) in Hydra's override grammar,
    strings quoted (:func:`quote`), so that it composes back to the very same value."""
    if isinstance(value, bool) or value is None:
        return "null" if value is None else str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {override_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(override_value(v) for v in value) + "]"
    raise TypeError(f"{value!r} has no override form")
