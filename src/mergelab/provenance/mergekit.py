"""MergeKit merge configs: written beside a mergelab merge where MergeKit defines the same merge
(:func:`export_merge`), and read back into the equivalent mergelab run (``mergelab mergekit=path.yml``,
:func:`mergekit_overrides`).

The translation of each method lives with the method: its class attribute ``mergekit``, a
:class:`~mergelab.methods.declaration.MergeKitMapping` (how it exports, and which MergeKit merge methods it reads
back) or the reason MergeKit has no equivalent (see :mod:`mergelab.methods.declaration`; the table of every
method's translation is generated into docs/methods.md). This module holds what is generic: the file (unique keys,
the top-level keys read or refused, model references, dtypes), the experts' names and the config written.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mergelab.methods.declaration import (
    REQUIRED,
    Import,
    MergeKitInput,
    MergeKitMethod,
    NotExpressible,
    mergekit_of,
    quote,
)

__all__ = ["CONFIG_FILE", "KEY", "Export", "Import", "NotExpressible", "export_merge", "mergekit_overrides"]

#: The file written in a merged dir when MergeKit defines the same merge.
CONFIG_FILE = "mergekit_config.yml"

#: The config key of ``mergelab mergekit=path.yml``.
KEY = "mergekit"

#: Why a top-level MergeKit key is refused (any other unknown key is refused as unknown).
REFUSED_KEYS = {
    "slices": "layer slices are not imported (mergelab merges whole checkpoints; list them under models)",
    "tokenizer_source": "not imported (mergelab keeps the base model's tokenizer and vocabulary)",
    "tokenizer": "not imported (mergelab keeps the base model's tokenizer and vocabulary)",
    "chat_template": "not imported (mergelab copies the base model's tokenizer files as they are)",
    "modules": "per-module definitions are not imported (mergelab merges one model)",
}
ALLOWED_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype")

# Hub ids: "name" or "owner/name".
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")


# ----------------------------------------------------------------------------------------------- out


@dataclass
class Export:
    """A merge in MergeKit's terms: ``config`` (None when MergeKit has no equivalent; ``reason`` says why) and
    ``notes`` on where MergeKit's implementation may still differ in the last bits."""

    config: dict[str, Any] | None
    reason: str | None = None
    notes: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        """The config as MergeKit YAML (for ``mergekit-yaml`` or ``mergelab mergekit=``)."""
        assert self.config is not None
        head = "# Written by mergelab: this merge as a MergeKit config (mergelab_recipe.json has the whole record).\n"
        return head + yaml.safe_dump(self.config, sort_keys=False)


def _ref(path: str) -> str:
    """How a config names a checkpoint: a local one by its absolute path (MergeKit resolves against its own working
    dir), a hub id as is."""
    p = Path(path).expanduser()
    return os.path.abspath(p) if p.exists() else path


def _translate_out(method: Any, n_experts: int) -> Any:
    """What ``method``'s class declares for it in MergeKit's terms (an ``Exported``), or NotExpressible."""
    from mergelab.methods.base import expert_count_error

    mapping = mergekit_of(type(method))
    if isinstance(mapping, str):
        raise NotExpressible(mapping)
    count = getattr(type(method), "expert_count", None)
    if count is not None and n_experts != count:
        raise NotExpressible(expert_count_error(type(method), n_experts, method.expert_names(n_experts)))
    return mapping.export(method, n_experts)


def export_merge(
    method: Any,
    pretrained: str,
    experts: Sequence[str],
    streamed: bool,
    pool: str,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    vocab_extended: bool = False,
    base_dtypes: Sequence[str] = (),
    gguf_file: str | None = None,
) -> Export:
    """The MergeKit config of a merge of ``experts`` (paths or hub ids, in task order) into ``pretrained`` by
    ``method``, or why there is none.

    ``streamed``: the merged dir is the pretrained checkpoint's layout with merged tensors (a checkpoint pool, or a
    causal-LM pool's whole LM); ``pool`` names the pool otherwise. ``include``/``exclude``: the pool's tensor
    filters; ``vocab_extended``: experts' extra vocabulary rows were merged in; ``base_dtypes``: the pretrained
    checkpoint's floating-point dtypes; ``gguf_file``: the pretrained model is that GGUF file in ``pretrained``.
    """
    try:
        exported = _translate_out(method, len(experts))
    except NotExpressible as e:
        return Export(None, str(e))
    notes = list(exported.notes)
    if gguf_file:
        return Export(
            None,
            f"the pretrained model is the GGUF file {gguf_file} in {pretrained} (model.gguf_file), and MergeKit reads "
            "safetensors or PyTorch checkpoints, not GGUF (mergelab merged its weights dequantised into a "
            "safetensors copy in mergelab's cache)",
        )
    if not streamed:
        return Export(
            None,
            f"{pool} builds its merged model in memory in its own layout (e.g. a backbone and per-task heads), not as "
            "the pretrained checkpoint with merged tensors that MergeKit writes; checkpoint pools (model=checkpoints) "
            "get a MergeKit config",
        )
    if include or exclude:
        return Export(
            None,
            f"model.include {list(include)} / model.exclude {list(exclude)} keep tensors pretrained by regex; "
            "MergeKit's per-tensor filters match name substrings",
        )
    if vocab_extended:
        return Export(
            None,
            "experts' extra vocabulary rows were merged in (model.vocab=extend); MergeKit reconciles vocabularies "
            "through tokenizer settings that mergelab does not map",
        )
    from mergelab.io.files import is_adapter_dir  # torch comes with it: not at import (the CLI starts without)

    adapters = [e for e in experts if Path(e).expanduser().is_dir() and is_adapter_dir(Path(e).expanduser())]
    if adapters:  # a config naming the adapter dir as a model would not load; MergeKit's base+LoRA is not mapped
        return Export(
            None,
            f"expert {adapters[0]} is a PEFT adapter; MergeKit names one as <base>+<adapter>, which mergelab does not "
            "write or read",
        )
    base = _ref(pretrained)
    per = exported.per_model
    each = per if isinstance(per, list) else [per] * len(experts)
    models = [{"model": _ref(e), **({"parameters": dict(p)} if p else {})} for e, p in zip(experts, each, strict=True)]
    if exported.base_listed:  # with weight 0: the base supplies the config, not a share of the average
        models.insert(0, {"model": base, "parameters": {"weight": 0.0}})
    config: dict[str, Any] = {"merge_method": exported.merge_method, "base_model": base, "models": models}
    if not exported.base_model:  # e.g. a Karcher mean of the experts alone: MergeKit would add a base_model to it
        del config["base_model"]
    config["parameters"] = exported.shared
    config["dtype"] = "float32"  # mergelab computes in float32 ...
    if len(base_dtypes) == 1:
        config["out_dtype"] = base_dtypes[0]  # ... and writes the base's dtype
    else:
        notes.append(f"the base checkpoint's tensors have dtypes {list(base_dtypes)}; MergeKit writes one dtype")
    return Export(config, None, notes)


# ----------------------------------------------------------------------------------------------- in


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping key given twice (PyYAML would keep the last one silently)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    repeated = sorted({str(k) for k in keys if keys.count(k) > 1})
    if repeated:
        raise yaml.constructor.ConstructorError(None, None, f"key(s) {repeated} given twice", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


class _Reader:
    """Reads one MergeKit config; every refusal is a one-line ValueError naming the file and the key at fault."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ValueError:
        return ValueError(f"mergekit config {self.path}: {key}: {problem}")

    def load(self) -> dict[str, Any]:
        try:
            text = self.path.read_text()
        except OSError as e:
            raise ValueError(f"mergekit config {self.path}: cannot read it ({e.strerror or e})") from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as e:
            raise ValueError(f"mergekit config {self.path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise ValueError(f"mergekit config {self.path}: not a mapping of MergeKit keys")
        for key in data:
            if key in REFUSED_KEYS:
                raise self.fail(str(key), REFUSED_KEYS[key])
            if key not in ALLOWED_KEYS:
                raise self.fail(str(key), f"unknown key (mergelab reads {', '.join(ALLOWED_KEYS)})")
        return data

    def scalar(self, key: str, value: Any, kind: str) -> Any:
        """A parameter's single value: a number (``kind='number'``) or a boolean (``'bool'``, 0/1 accepted)."""
        if isinstance(value, list | dict):
            raise self.fail(
                key,
                f"{value!r}: per-tensor filters and layer gradients are not imported (mergelab uses "
                "one value for every tensor)",
            )
        if kind == "bool":
            if isinstance(value, bool) or (isinstance(value, int | float) and value in (0, 1)):
                return bool(value)
            raise self.fail(key, f"{value!r} is not true or false")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"{value!r} is not a number")
        return float(value)

    def model_ref(self, key: str, value: Any) -> str:
        """A ``model:`` entry as mergelab's pool takes it: a local path (made absolute) or a hub id."""
        if not isinstance(value, str) or not value:
            raise self.fail(key, f"{value!r}: a local dir or hub id (structured model references are not imported)")
        p = Path(value).expanduser()
        if p.exists():
            return os.path.abspath(p)
        if "+" in value:
            raise self.fail(key, f"{value!r}: LoRA references (model+lora) are not imported")
        if "@" in value:
            raise self.fail(key, f"{value!r}: hub revisions (@) are not imported")
        if not _HUB_ID.fullmatch(value):
            raise self.fail(key, f"{value!r}: no such dir, and not a hub id")
        return value

    def read(self) -> Import:
        from mergelab.methods.registry import mergekit_readers  # the methods (torch): not at import

        data = self.load()
        readers = mergekit_readers()
        method = data.get("merge_method")
        if method not in readers:
            raise self.fail(
                "merge_method",
                f"{method!r} has no mergelab equivalent (mergelab imports {', '.join(sorted(readers))})",
            )
        schema, mapping, cls = readers[method]
        params = data.get("parameters") or {}
        if not isinstance(params, dict):
            raise self.fail("parameters", f"{params!r} is not a mapping")
        allowed = (*schema.shared, *schema.per_model)
        for k in params:
            if k not in allowed:
                raise self.fail(f"parameters.{k}", f"not a parameter of {method} that mergelab maps ({allowed})")
        shared = {k: self.value(schema, f"parameters.{k}", params.get(k, d)) for k, d in schema.shared.items()}
        base = self.model_ref("base_model", data["base_model"]) if data.get("base_model") is not None else None
        if base is None and not schema.base_in_models:
            raise self.fail("base_model", f"missing: {method} adds task vectors to the base model")
        models, experts = self.models(data.get("models"), schema, base, params)
        count = getattr(cls, "expert_count", None)
        if count is not None and len(experts) != count:
            from mergelab.methods.base import expert_count_error

            raise self.fail("models", expert_count_error(cls, len(experts), list(experts)))
        spec = mapping.read(MergeKitInput(method, base, experts, models, shared, self.fail))
        self.check_dtypes(data, spec.pretrained)
        return spec

    def value(self, schema: MergeKitMethod, key: str, value: Any) -> Any:
        """A parameter's value as its schema types it (a boolean where MergeKit's default is one, a structured value
        as given for the method's own reader to check, else a number)."""
        name = key.rsplit(".", 1)[-1]
        if value is REQUIRED:
            raise self.fail(key, f"missing (MergeKit's {schema.name} requires it)")
        if name in schema.structured:
            return value
        return self.scalar(key, value, "bool" if schema.is_flag(name) else "number")

    def models(
        self, models: Any, schema: MergeKitMethod, base: str | None, params: Mapping[str, Any]
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        """Each expert's per-model parameters (the base's entry left out unless the base is merged as a model) and
        the experts by name."""
        method = schema.name
        if not isinstance(models, list) or not models:
            raise self.fail("models", "missing or empty: list the models, each as {model: ..., parameters: ...}")
        per_model: list[dict[str, Any]] = []
        experts: dict[str, str] = {}
        seen: set[str] = set()
        for i, entry in enumerate(models):
            where = f"models[{i}]"
            if not isinstance(entry, dict) or "model" not in entry:
                raise self.fail(where, f"{entry!r} is not a mapping with model:")
            for k in entry:
                if k not in ("model", "parameters"):
                    raise self.fail(f"{where}.{k}", "unknown key (mergelab reads model and parameters)")
            ref = self.model_ref(f"{where}.model", entry["model"])
            if ref in seen:
                raise self.fail(f"{where}.model", f"{ref} is listed twice")
            seen.add(ref)
            own = entry.get("parameters") or {}
            if not isinstance(own, dict):
                raise self.fail(f"{where}.parameters", f"{own!r} is not a mapping")
            if ref == base and not schema.base_in_models:
                if own:  # MergeKit takes no task vector from the base: its parameters would be ignored
                    raise self.fail(f"{where}.parameters", f"unused by {method} for the base model; remove them")
                continue
            per_model.append(self.model_parameters(schema, where, own, params))
            experts[_expert_name(ref, experts)] = ref
        if not schema.base_in_models and not experts:
            raise self.fail("models", "no model besides the base model")
        return per_model, experts

    def model_parameters(
        self, schema: MergeKitMethod, where: str, own: Mapping[str, Any], params: Mapping[str, Any]
    ) -> dict[str, Any]:
        """One model's per-model parameters: its own, else the shared ``parameters``' value, else MergeKit's
        default (a required one missing is refused)."""
        for k in own:
            if k not in schema.per_model:
                raise self.fail(
                    f"{where}.parameters.{k}",
                    f"not a per-model parameter of {schema.name} that mergelab maps ({tuple(schema.per_model)})",
                )
        out = {}
        for k, default in schema.per_model.items():
            value = own.get(k, params.get(k, default))
            if value is REQUIRED:
                raise self.fail(f"{where}.parameters.{k}", f"missing (MergeKit's {schema.name} requires it)")
            out[k] = self.value(schema, f"{where}.parameters.{k}", value)
        return out

    def check_dtypes(self, data: Mapping[str, Any], base: str) -> None:
        """``dtype`` must be mergelab's float32 compute dtype; the output dtype (``out_dtype``, else ``dtype``) must
        be the base checkpoint's, which mergelab writes."""
        dtype = data.get("dtype")
        if dtype is not None and dtype != "float32":
            raise self.fail("dtype", f"{dtype!r}: mergelab computes merges in float32 (set float32 or remove it)")
        out_key = "out_dtype" if data.get("out_dtype") is not None else "dtype"
        out = data.get(out_key)
        if out is None:
            return
        from mergelab.provenance.identity import checkpoint_identity

        found = checkpoint_identity(base)
        if found["hub"]:
            raise self.fail(
                out_key,
                f"{out!r}: mergelab writes the base model's dtype and cannot check a hub "
                "model's before downloading it; remove it",
            )
        if found["float_dtypes"] != [out]:
            raise self.fail(out_key, f"{out!r}: mergelab writes the base model's dtype ({found['float_dtypes']})")


def _expert_name(ref: str, taken: Mapping[str, str]) -> str:
    """An expert name (a config key) from its path's or hub id's last part, made unique."""
    stem = re.sub(r"\W", "_", ref.rstrip("/").rsplit("/", 1)[-1]) or "expert"
    stem = stem if stem[0].isalpha() else f"m_{stem}"
    name, i = stem, 2
    while name in taken:
        name, i = f"{stem}_{i}", i + 1
    return name


def read_mergekit(path: str | Path) -> Import:
    """The mergelab equivalent of the MergeKit config at ``path``; a one-line ValueError naming the file and the key
    or value it cannot translate exactly (never a key skipped)."""
    return _Reader(Path(path)).read()


def mergekit_overrides(path: str | Path) -> list[str]:
    """The overrides of the mergelab run equivalent to the MergeKit config at ``path``: a checkpoint pool of its
    base and models (``model.vocab=base``: as MergeKit, extra vocabulary rows are dropped), the method, a
    merge-only run (``eval=none``) and ``mergekit=<path>``, which records the source."""
    source = os.path.abspath(Path(path).expanduser())
    spec = read_mergekit(source)
    experts = "{" + ",".join(f"{n}:{quote(p)}" for n, p in spec.experts.items()) + "}"
    return [
        "model=checkpoints",
        f"model.pretrained={quote(spec.pretrained)}",
        f"model.experts={experts}",
        "model.vocab=base",
        *spec.method,
        "eval=none",
        f"{KEY}={quote(source)}",
    ]


#: Keys ``mergelab mergekit=...`` sets from the file (any override of them conflicts), and the model options that
#: do not change the merge (chunk size, shard size, trust_remote_code), which may be given beside it.
DEFINED_BY_FILE = ("model", "method", "tune", "experiment", "table")
FREE_MODEL_KEYS = ("model.chunk_elems", "model.max_shard_bytes", "model.trust_remote_code")


def _override_key(arg: str) -> str | None:
    """The key of a command-line override (``+k=v``, ``~k``, ``group@pkg=v``), None for a flag."""
    if arg.startswith("-"):
        return None
    return arg.lstrip("+~").split("=", 1)[0].strip()


def expand_command_line(args: Sequence[str]) -> list[str]:
    """``args`` with ``mergekit=<file>`` replaced by :func:`mergekit_overrides`; unchanged without it.

    Done before Hydra composes the config, so the run is an ordinary one and ``cfg.overrides`` spells it out.
    An ``eval=`` given beside it replaces ``eval=none`` (e.g. ``eval=lm_harness`` to score the merge); overrides
    of what the file defines (model, method, tune, experiment presets) are refused.
    """
    found = [i for i, a in enumerate(args) if _override_key(a) == KEY and "=" in a]
    if not found:
        return list(args)
    if len(found) > 1:
        raise ValueError(f"{KEY}= is given {len(found)} times; give one MergeKit config")
    i = found[0]
    value = args[i].split("=", 1)[1].strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        value = value[1:-1]
    elif "," in value:
        raise ValueError(f"{KEY}={value}: one MergeKit config per run (sweeps over files are not supported)")
    if value in ("", "null"):
        return list(args)
    others = [a for j, a in enumerate(args) if j != i]
    for a in others:
        key = _override_key(a)
        if key is None or key in FREE_MODEL_KEYS:
            continue
        head = re.split(r"[.@]", key, maxsplit=1)[0]
        if head in DEFINED_BY_FILE:
            raise ValueError(
                f"{a!r} conflicts with {KEY}={value}: the MergeKit config defines the model pool and the method "
                "(edit the file instead)"
            )
    generated = mergekit_overrides(value)
    if any(_override_key(a) == "eval" for a in others):
        generated.remove("eval=none")
    return [*args[:i], *generated, *args[i + 1 :]]
