"""Every merge method, enumerated from ``conf/method/*.yaml`` (each YAML's ``_target_``), so that the docs, the
MergeKit translations and the tests cover a method added with one module and one YAML, and nothing else."""

from __future__ import annotations

import functools
from pathlib import Path

import yaml

from mergelab.config_types import target_class
from mergelab.locations import CONFIG_DIR
from mergelab.methods.declaration import MergeKitMapping, MergeKitMethod, mergekit_of


def method_yamls() -> dict[str, Path]:
    """``conf/method`` YAML name -> path, sorted by name."""
    return {p.stem: p for p in sorted((CONFIG_DIR / "method").glob("*.yaml"))}


@functools.cache
def method_classes() -> dict[str, type]:
    """``conf/method`` YAML name -> the method class its ``_target_`` names (a ValueError naming the file when it
    has none or it does not resolve)."""
    out = {}
    for name, path in method_yamls().items():
        target = (yaml.safe_load(path.read_text()) or {}).get("_target_")
        try:
            out[name] = target_class(str(target))
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"{path}: _target_ {target!r} does not name a class ({e})") from None
    return out


def distinct_classes() -> list[type]:
    """The method classes, each once, in YAML order."""
    return list(dict.fromkeys(method_classes().values()))


@functools.cache
def mergekit_readers() -> dict[str, tuple[MergeKitMethod, MergeKitMapping, type]]:
    """MergeKit merge method name -> its schema, the mapping that reads it and the method class declaring that
    mapping, from every method's declaration (a ValueError when two methods claim the same MergeKit method)."""
    out: dict[str, tuple[MergeKitMethod, MergeKitMapping, type]] = {}
    for cls in distinct_classes():
        mapping = mergekit_of(cls)
        if isinstance(mapping, str):
            continue
        for schema in mapping.reads:
            if schema.name in out and out[schema.name][1] is not mapping:
                raise ValueError(f"MergeKit's {schema.name} is read by two methods ({cls.__name__} and another)")
            out[schema.name] = (schema, mapping, cls)
    return out
