"""PEFT LoRA adapters as experts: the one place where an adapter's weights become an expert's.

An adapter dir holds ``adapter_config.json`` and ``adapter_model.safetensors`` (or ``.bin``). Its expert is the
pool's pretrained model plus, for every LoRA-adapted module, the task vector ``scaling * B @ A`` (transposed for
``fan_in_fan_out`` layers and embeddings), with ``scaling = lora_alpha / r`` (``lora_alpha / sqrt(r)`` with
``use_rslora``; ``rank_pattern`` / ``alpha_pattern`` per module), and with the modules PEFT saved whole
(``modules_to_save``: a classifier's head) replacing the pretrained ones. Other PEFT methods, DoRA and LoRA
variants whose merged weights are not base + B @ A are refused, naming the adapter dir and the config key.

:class:`LoraAdapter` reads the names and maps them onto the pretrained model's tensors; :class:`LoraDelta` computes
rows of a task vector (rows of B @ A are rows of B times A); :class:`AdapterCheckpoint` is an expert streamed from
the pretrained checkpoint, one row block at a time; :func:`apply_adapter` builds an in-memory expert's state dict.
Both compute in float32 in the same fixed row tiles, so an adapter expert has the same bytes whatever the block
size, in memory and streamed. Files are opened by :mod:`mergelab.io.reader` (``open_adapter``, ``open_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from mergelab.io.files import CheckpointReader
from mergelab.task_vectors import compute_dtype

log = logging.getLogger(__name__)

# Rows of B @ A are computed in tiles of this many rows, aligned to the tensor, whatever rows are asked for: a
# matrix product's rounding can depend on its row count, and fixed tiles make every block's rows the same bytes.
ROW_TILE = 64


# PeftModel names every tensor of the model it wraps under this prefix.
PEFT_PREFIX = "base_model.model."


# The factors' names in PEFT's state dicts: linear layers (and GPT-2's Conv1D) and embeddings.
LORA_FACTORS = {"lora_A": "A", "lora_B": "B", "lora_embedding_A": "A", "lora_embedding_B": "B"}


# Config keys of LoRA variants whose merged weights are not base + scaling * B @ A (refused when set).
UNSUPPORTED = {
    "use_dora": "DoRA rescales each column of the merged weight by a learned magnitude",
    "lora_bias": "LoRA with a bias on B also changes the layers' biases",
    "target_parameters": "LoRA on bare parameters (e.g. MoE experts) is not a module's weight",
    "layer_replication": "replicated layers change the model's structure",
    "trainable_token_indices": "trainable tokens are stored as a partial embedding",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_qalora": "QA-LoRA pools its inputs",
}


@dataclass(frozen=True)
class LoraSettings:
    """What ``adapter_config.json`` says about the arithmetic (checked by :func:`read_adapter_config`)."""

    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None

    def rank_and_alpha(self, module: str) -> tuple[int, float]:
        """``module``'s rank and alpha: the first ``rank_pattern`` / ``alpha_pattern`` key matching it, as PEFT
        matches them (the key is a regex matching the whole module name or a dotted suffix of it), else r and alpha."""
        return (
            int(_pattern_value(self.rank_pattern, module, self.r)),
            float(_pattern_value(self.alpha_pattern, module, self.lora_alpha)),
        )

    def scaling(self, module: str) -> float:
        """lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA, with ``module``'s own rank and alpha."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", module):
            return value
    return default


def read_adapter_config(path: Path, where: str) -> LoraSettings:
    """The LoRA settings of an ``adapter_config.json``; a one-line ValueError naming ``where``, the file and the key
    for anything that is not a plain LoRA adapter (another PEFT method, DoRA, the variants of :data:`UNSUPPORTED`)."""
    at = f"{where}: PEFT adapter config {path}"
    try:
        cfg = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{at} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{at} is not a JSON object")
    kind = cfg.get("peft_type", "LORA")
    if kind != "LORA":
        raise ValueError(f"{at}: peft_type {kind!r} is not LoRA (mergelab merges LoRA adapters only)")
    for key, why in UNSUPPORTED.items():
        if cfg.get(key):
            raise ValueError(f"{at}: {key}: {cfg[key]!r} is not supported ({why}, so it is not base + B @ A)")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ValueError(f"{at}: no '{key}'")
    r, alpha = cfg["r"], cfg["lora_alpha"]
    if type(r) is not int or r < 1:
        raise ValueError(f"{at}: r must be a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise ValueError(f"{at}: lora_alpha must be a number, got {alpha!r}")
    patterns = {}
    for key, positive_int in (("rank_pattern", True), ("alpha_pattern", False)):
        value = cfg.get(key) or {}
        if not isinstance(value, dict):
            raise ValueError(f"{at}: {key} must be an object (module pattern -> value), got {value!r}")
        for pattern, v in value.items():
            ok = type(v) is int and v >= 1 if positive_int else isinstance(v, (int, float)) and not isinstance(v, bool)
            if not ok:
                raise ValueError(f"{at}: {key} '{pattern}': {v!r} is not a valid {key.split('_')[0]}")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"{at}: {key} '{pattern}' is not a valid regex ({e})") from None
        patterns[key] = dict(value)
    for key in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(cfg.get(key, False), bool):
            raise ValueError(f"{at}: {key} must be true or false, got {cfg[key]!r}")
    base = cfg.get("base_model_name_or_path")
    return LoraSettings(
        r,
        float(alpha),
        cfg.get("use_rslora", False),
        cfg.get("fan_in_fan_out", False),
        patterns["rank_pattern"],
        patterns["alpha_pattern"],
        base if isinstance(base, str) and base else None,
    )


class LoraDelta:
    """The task vector ``scaling * left @ right`` of one adapted tensor, computed a row block at a time in float32.

    For a linear layer ``left`` is B and ``right`` is A; for a ``fan_in_fan_out`` layer (GPT-2's Conv1D) and an
    embedding, whose weights are stored transposed, ``left`` is A^T and ``right`` is B^T. The factors are held
    in float32 (an adapter is small next to its model).
    """

    def __init__(self, left: Tensor, right: Tensor, scaling: float) -> None:
        self.left = left.float().contiguous()
        self.right = right.float().contiguous()
        self.scaling = float(scaling)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    def rows(self, start: int | None = None, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of the task vector (all when both are None), float32.

        Rows of B @ A are rows of B times A, so only those rows are computed (plus the rest of the first and last
        :data:`ROW_TILE` tiles they touch, for bytes that do not depend on the block boundaries).
        """
        n = self.left.shape[0]
        s = 0 if start is None else start
        e = n if stop is None else min(stop, n)
        t0, t1 = s - s % ROW_TILE, min(n, -(-e // ROW_TILE) * ROW_TILE)
        out = torch.empty((max(t1 - t0, 0), self.right.shape[1]), dtype=torch.float32)
        for a in range(t0, t1, ROW_TILE):
            b = min(a + ROW_TILE, n)
            torch.mm(self.left[a:b], self.right, out=out[a - t0 : b - t0])
        return out[s - t0 : e - t0].mul_(self.scaling)

    def add_to(self, base: Tensor, start: int | None = None, stop: int | None = None) -> Tensor:
        """The expert's rows ``start:stop``: ``base`` (those rows of the pretrained tensor) plus the task vector,
        computed in the compute dtype (float32; float64 for float64 weights) and returned in ``base``'s dtype."""
        return torch.add(base.to(compute_dtype(base.dtype)), self.rows(start, stop)).to(base.dtype)


class Bound(NamedTuple):
    """An adapter mapped onto a pretrained model's tensor names (:meth:`LoraAdapter.bind`)."""

    deltas: dict[str, LoraDelta]  # pretrained tensor -> its task vector
    saved: dict[str, str]  # pretrained tensor -> the adapter tensor that replaces it whole (modules_to_save)


class LoraAdapter:
    """A PEFT LoRA adapter: its settings, its factors by module and the tensors it saved whole.

    ``weights`` is the adapter's weight file, opened (and closed by :meth:`close`). Tensor names are read as PEFT
    writes them (``base_model.model.<module>.lora_A.weight``, ``lora_embedding_A``, ``<module>.base_layer.weight``,
    ``modules_to_save``, with or without an adapter name such as ``default``). An adapter holding no LoRA factor
    (only saved modules), a factor without its pair, DoRA magnitudes, LoRA biases, or several adapters in one
    file are refused, naming the adapter dir and the tensor.
    """

    def __init__(self, adapter_dir: Path, name: str, settings: LoraSettings, weights: CheckpointReader) -> None:
        self.dir, self.name, self.settings, self.weights = Path(adapter_dir), name, settings, weights
        self.where = f"{name}: PEFT adapter {self.dir}"
        self.factors: dict[str, dict[str, str]] = {}  # module -> {"A": key, "B": key, "embedding": ...}
        self.whole: dict[str, str] = {}  # tensor name (PEFT prefix stripped) -> key of a tensor saved whole
        names: set[str] = set()
        for key in weights:
            self._add(key, names)
        if len(names) > 1:
            raise ValueError(f"{self.where}: holds several adapters ({sorted(names)}); save one per dir")
        if not self.factors:
            some = ", ".join(f"'{k}'" for k in list(self.whole.values())[:3])
            raise ValueError(
                f"{self.where}: holds no LoRA weights (lora_A/lora_B), only whole modules ({some}): a "
                "modules_to_save-only adapter is not a LoRA expert"
            )
        for parts in self.factors.values():
            for side in ("A", "B"):
                if side not in parts:
                    other = parts["B" if side == "A" else "A"]
                    raise ValueError(f"{self.where}: tensor '{other}' has no lora_{side} beside it")

    def _add(self, key: str, adapter_names: set[str]) -> None:
        """File one tensor of the adapter under its module (a LoRA factor) or its tensor name (saved whole)."""
        parts = key.removeprefix(PEFT_PREFIX).split(".")
        if "lora_magnitude_vector" in parts:
            raise ValueError(f"{self.where}: tensor '{key}' is a DoRA magnitude (not base + B @ A)")
        hit = next((i for i, p in enumerate(parts) if p in LORA_FACTORS), None)
        if hit is None:
            if "original_module" in parts:  # PEFT's untouched copy of a module it saves whole
                return
            if "modules_to_save" in parts:  # a raw PeftModel state dict: <module>.modules_to_save.<adapter>.<param>
                i = parts.index("modules_to_save")
                del parts[i : i + (2 if len(parts) - i > 2 else 1)]
            self.whole[".".join(p for p in parts if p != "base_layer")] = key
            return
        kind, rest = parts[hit], parts[hit + 1 :]
        embedding = kind.startswith("lora_embedding")
        if rest[-1:] == ["bias"]:
            raise ValueError(f"{self.where}: tensor '{key}' is a LoRA bias (lora_bias), not supported")
        tail = rest if embedding else rest[:-1]
        if (not embedding and rest[-1:] != ["weight"]) or len(tail) > 1:
            raise ValueError(f"{self.where}: tensor '{key}' is not a LoRA factor mergelab reads")
        adapter_names.update(tail)
        module = ".".join(parts[:hit])
        entry = self.factors.setdefault(module, {})
        side = LORA_FACTORS[kind]
        if side in entry:
            raise ValueError(
                f"{self.where}: module '{module}' has two lora_{side} tensors, '{entry[side]}' and '{key}'"
            )
        entry[side] = key
        if embedding:
            entry["embedding"] = key

    def check_base(self, pretrained: str | None) -> None:
        """Warn (once per adapter and pretrained model) when the adapter names another base model than the pool's.

        The pool's pretrained model is the base either way; ``base_model_name_or_path`` is only informational, and
        the same model is often a hub id in one place and a local dir in the other, so only the last path
        components (the model names) are compared.
        """
        base = self.settings.base_model
        if not base or not pretrained:
            return

        def model_name(p: str) -> str:
            return Path(p.rstrip("/")).name.lower()

        if model_name(base) != model_name(pretrained) and (str(self.dir), pretrained) not in _WARNED:
            _WARNED.add((str(self.dir), pretrained))
            log.warning(
                "%s: base_model_name_or_path is '%s', the pool's pretrained model is '%s'; the adapter is applied to "
                "the pool's pretrained model",
                self.where,
                base,
                pretrained,
            )

    def delta(self, module: str) -> LoraDelta:
        """``module``'s task vector, its factors checked against the rank the config gives it."""
        parts = self.factors[module]
        a, b = self.weights[parts["A"]], self.weights[parts["B"]]
        for side, t in (("A", a), ("B", b)):
            if t.dim() != 2:
                raise ValueError(
                    f"{self.where}: tensor '{parts[side]}' has shape {tuple(t.shape)}: only LoRA on linear layers "
                    "and embeddings (2-D factors) is supported, not on convolutions"
                )
        r, _ = self.settings.rank_and_alpha(module)
        if a.shape[0] != r or b.shape[1] != r:
            raise ValueError(
                f"{self.where}: tensors '{parts['A']}' {tuple(a.shape)} and '{parts['B']}' {tuple(b.shape)} do not "
                f"have the rank {r} adapter_config.json gives module '{module}'"
            )
        if "embedding" in parts or self.settings.fan_in_fan_out:
            return LoraDelta(a.T, b.T, self.settings.scaling(module))
        return LoraDelta(b, a, self.settings.scaling(module))

    def bind(self, shapes: Mapping[str, tuple[int, ...]], ignore: Sequence[str] = ()) -> Bound:
        """Map the adapter onto a pretrained model's tensors (name -> shape).

        Each LoRA module's ``<module>.weight`` and each tensor saved whole is matched to the pretrained name equal
        to it, else to the one pretrained name of which it is a dotted suffix or which is a dotted suffix of it (an
        adapter trained on a model with or without a wrapper, e.g. ``BertModel`` vs ``BertForSequenceClassification``).
        Names starting with one of ``ignore`` (after the PEFT prefix) are left out: parts of the model a pool
        never merges. A name matching no tensor or several, two names on one tensor, or a task vector whose shape
        is not its tensor's are refused, naming the adapter tensor. Tensors saved whole keep their own shapes (a
        classifier's head may have another label count than the pretrained's): their users check them.
        """
        match = _Matcher(shapes, self.where)
        deltas: dict[str, LoraDelta] = {}
        saved: dict[str, str] = {}
        for module, parts in self.factors.items():
            if module.startswith(tuple(ignore)):
                continue
            target = match(f"{module}.weight", parts["A"])
            delta = self.delta(module)
            if delta.shape != tuple(shapes[target]):
                raise ValueError(
                    f"{self.where}: tensor '{parts['A']}' gives a task vector of shape {delta.shape} for "
                    f"'{target}', whose shape is {tuple(shapes[target])} (an adapter of another model?)"
                )
            _claim(deltas, target, parts["A"], self.where)
            deltas[target] = delta
        for name, key in self.whole.items():
            if name.startswith(tuple(ignore)):
                continue
            target = match(name, key)
            _claim(saved, target, key, self.where)
            # A LoRA'd embedding is saved whole too (PEFT's save_embedding_layers): the delta goes on that copy.
            if target in deltas and tuple(self.weights.shape(key)) != tuple(shapes[target]):
                raise ValueError(
                    f"{self.where}: tensor '{key}' has shape {tuple(self.weights.shape(key))}, the pretrained "
                    f"'{target}' it carries LoRA factors for has {tuple(shapes[target])}"
                )
            saved[target] = key
        return Bound(deltas, saved)

    def close(self) -> None:
        self.weights.close()


_WARNED: set[tuple[str, str]] = set()


def _claim(taken: Mapping[str, Any], target: str, key: str, where: str) -> None:
    if target in taken:
        raise ValueError(f"{where}: tensor '{key}' and another adapter tensor both map to '{target}'")


class _Matcher:
    """Finds the pretrained tensor an adapter's name stands for (see :meth:`LoraAdapter.bind`)."""

    def __init__(self, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
        self.names, self.where = set(shapes), where
        self.by_suffix: dict[str, list[str]] = {}  # proper dotted suffix -> the names ending with it
        for name in shapes:
            parts = name.split(".")
            for i in range(1, len(parts)):
                self.by_suffix.setdefault(".".join(parts[i:]), []).append(name)

    def __call__(self, name: str, key: str) -> str:
        if name in self.names:
            return name
        parts = name.split(".")
        found = list(self.by_suffix.get(name, []))
        found += [s for s in (".".join(parts[i:]) for i in range(1, len(parts))) if s in self.names]
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError(
                f"{self.where}: tensor '{key}' ({name}) matches no tensor of the pretrained model (an adapter of "
                "another model?)"
            )
        raise ValueError(f"{self.where}: tensor '{key}' ({name}) matches several pretrained tensors {sorted(found)}")


class AdapterCheckpoint:
    """An adapter expert as a checkpoint reader: the pretrained checkpoint ``base`` with the adapter applied.

    A row block of an adapted tensor is the base's rows plus ``scaling * B[rows] @ A`` (:meth:`LoraDelta.add_to`),
    in the base's dtype; a tensor the adapter saved whole is read from the adapter's file (plus its delta, for a
    LoRA'd embedding PEFT saved whole); every other tensor comes straight from ``base``. So the streaming engine and
    every method read it as any expert checkpoint, and no whole task vector is ever formed. Memory: the adapter's
    factors (in float32) plus the blocks being read. ``base`` is shared with the caller, which closes it;
    :meth:`close` closes the adapter's file. ``pretrained``: how the pool names its pretrained model, for
    :meth:`LoraAdapter.check_base`.
    """

    def __init__(self, base: CheckpointReader, adapter: LoraAdapter, pretrained: str | None = None) -> None:
        self.base, self.adapter = base, adapter
        self.name, self.dir = adapter.name, adapter.dir
        adapter.check_base(pretrained)
        self.deltas, self.saved = adapter.bind({k: base.shape(k) for k in base})

    def keys(self) -> list[str]:
        return list(self.base.keys())

    def __contains__(self, name: object) -> bool:
        return name in self.base

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, name: str) -> Tensor:
        return self.get_rows(name)

    def get(self, name: str) -> Tensor:
        return self.get_rows(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.adapter.weights.shape(self.saved[name]) if name in self.saved else self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.adapter.weights.dtype(self.saved[name]) if name in self.saved else self.base.dtype(name)

    def block_nbytes(self, name: str, start: int | None = None, stop: int | None = None) -> int:
        if name in self.saved:
            return self.adapter.weights.block_nbytes(self.saved[name], start, stop)
        return self.base.block_nbytes(name, start, stop)

    def get_rows(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        """Rows ``start:stop`` of the expert's tensor (the whole tensor when both are None)."""
        if name in self.saved:
            rows = self.adapter.weights.get_rows(self.saved[name], start, stop)
        else:
            rows = self.base.get_rows(name, start, stop)
        return self.deltas[name].add_to(rows, start, stop) if name in self.deltas else rows

    def read_rows_into(self, name: str, start: int | None, stop: int | None, buf: Tensor) -> Tensor:
        """Rows ``start:stop`` in the caller's buffer (the base's rows are read into it and the delta added)."""
        if name in self.saved:
            rows = self.adapter.weights.read_rows_into(self.saved[name], start, stop, buf)
        else:
            rows = self.base.read_rows_into(name, start, stop, buf)
        return rows.copy_(self.deltas[name].add_to(rows, start, stop)) if name in self.deltas else rows

    def close(self) -> None:
        self.adapter.close()


class AdaptedState(NamedTuple):
    """An in-memory expert built from an adapter (:func:`apply_adapter`)."""

    state: dict[str, Tensor]  # the pretrained state dict with the deltas added and the saved tensors in place
    saved: set[str]  # the names taken whole from the adapter (a classifier's head, when PEFT saved it)


def apply_adapter(
    state: Mapping[str, Tensor], adapter: LoraAdapter, pretrained: str | None = None, ignore: Sequence[str] = ()
) -> AdaptedState:
    """The expert of ``adapter`` over the pretrained ``state``, in memory (see :meth:`LoraAdapter.bind` for the
    name matching and ``ignore``; the same arithmetic as streamed, :meth:`LoraDelta.add_to`)."""
    adapter.check_base(pretrained)
    bound = adapter.bind({k: tuple(v.shape) for k, v in state.items()}, ignore)
    out = dict(state)
    for name, key in bound.saved.items():
        out[name] = adapter.weights[key]
    for name, delta in bound.deltas.items():
        out[name] = delta.add_to(out[name].detach())
    return AdaptedState(out, set(bound.saved))
