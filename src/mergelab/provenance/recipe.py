"""The files a run writes into its merged dir, before the dir is moved into place: the recipe
(``mergelab_recipe.json``), the model card (``README.md``) and, where MergeKit defines the same merge,
``mergekit_config.yml``."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergelab.io.atomic import atomic_write_json, atomic_write_text
from mergelab.methods.base import option_summary, set_option
from mergelab.provenance.card import model_card, reproduce_command
from mergelab.provenance.identity import (
    adapter_base,
    checkpoint_identity,
    hub_identity,
    package_versions,
    safetensors_header,
)
from mergelab.provenance.mergekit import CONFIG_FILE, KEY, export_merge
from mergelab.reports.tables import eval_subset

if TYPE_CHECKING:
    from mergelab.methods.base import MergeMethod
    from mergelab.pools.base import ModelPool

RECIPE_FILE = "mergelab_recipe.json"
CARD_FILE = "README.md"

#: Bump when the recipe's layout changes.
RECIPE_FORMAT = 1


@dataclass
class MergeRecord:
    """What a run knows about the merge it writes: all the recipe, the card and the MergeKit config say.

    Args:
        config: the run's resolved config (``OmegaConf.to_container(cfg, resolve=True)``).
        overrides: the overrides that define the run (``cfg.overrides`` without ``resume``/``overwrite``); None for
            a run not started by the ``mergelab`` command (e.g. ``run(cfg)`` from Python), whose command is unknown.
        name: the merged row's name (the method's ``name``, or a table row).
        method_config: that row's resolved method config (``_target_``, options, ``grid``).
        grid_point: the grid point chosen on the tune split, or None when the method was not tuned.
        method: the method as it merged (its report holds the computed coefficients).
        pool: the run's model pool (tasks, resolved experts, capability flags).
        rows: the run's table rows (the merged row's scores, and the reference rows for the card).
        tasks: the table's columns (suite tasks).
        suite / split / tune_split: the suite's name, report and tune splits (None for a merge-only run).
    """

    config: dict[str, Any]
    overrides: list[str] | None
    name: str
    method_config: dict[str, Any]
    grid_point: dict[str, Any] | None
    method: MergeMethod
    pool: ModelPool
    rows: Mapping[str, Mapping[str, Any]]
    tasks: list[str]
    suite: str | None = None
    split: str | None = None
    tune_split: str | None = None


def _options(record: MergeRecord) -> dict[str, Any]:
    """The merged method's options (:func:`option_summary`), the chosen grid point applied."""
    node = copy.deepcopy(record.method_config)
    for key, value in (record.grid_point or {}).items():
        set_option(node, key, value)
    return option_summary(node)


def _scores(record: MergeRecord) -> dict[str, Any] | None:
    """The merged row's scores (per task and averages, with the splits and, when not every example of each task
    was scored, the ``subset``: the config key and its value), None when the run did not score it."""
    row = record.rows.get(record.name) or {}
    if "scores" not in row:
        return None
    subset = eval_subset(record.config)
    return {
        "suite": record.suite,
        "split": record.split,
        "subset": {"key": subset[0], "value": subset[1]} if subset is not None else None,
        "tasks": row["scores"],
        **{k: v for k, v in row.items() if k.startswith("avg_") or k == "norm_acc"},
        "tune": {"split": record.tune_split, "avg_acc": row.get(f"{record.tune_split}_avg_acc")},
    }


def _vocab_size(model: str | Path) -> int | None:
    """``vocab_size`` in the config.json of a local model dir, or of a hub model already in the local HF cache
    (never downloaded); None when there is none."""
    path: Any = Path(model).expanduser() / "config.json"
    if not path.is_file() and not Path(model).expanduser().exists():
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(str(model), "config.json")
    try:
        return json.loads(Path(path).read_text()).get("vocab_size")
    except (OSError, TypeError, ValueError, AttributeError):
        return None


def _vocab_extended(model: Mapping[str, Any], pretrained: str, merged_dir: Path) -> bool:
    """Whether experts' extra vocabulary rows went into the merge (``vocab=extend`` grows the merged config's
    ``vocab_size``); assumed so when the base's vocabulary cannot be read locally."""
    if model.get("vocab", "extend") != "extend":
        return False
    mine = _vocab_size(merged_dir)
    return mine is None or mine != _vocab_size(pretrained)


def _adapter_bases(pool: ModelPool) -> list[tuple[str, str]]:
    """(task, base model) of each expert that is a local PEFT adapter naming its base (``base_model_name_or_path``)."""
    out = []
    for t in pool.tasks:
        base = adapter_base(pool.resolved[t]) if Path(pool.resolved[t]).expanduser().is_dir() else None
        if base is not None:
            out.append((t, base))
    return out


def _tensor_shapes(path_or_id: str) -> dict[str, tuple[int, ...]] | None:
    """Name -> shape of a full checkpoint's tensors: a local dir, or a hub id in the local Hugging Face cache (where
    the pool's loading put it; nothing is downloaded). None for a PEFT adapter or what cannot be read here."""
    from huggingface_hub import snapshot_download

    from mergelab.io.files import is_adapter_dir
    from mergelab.io.reader import open_checkpoint

    path = Path(path_or_id).expanduser()
    if not path.exists():
        try:
            path = Path(snapshot_download(path_or_id, local_files_only=True))
        except Exception:  # not a hub id, or not in the cache: nothing to compare with
            return None
    if not path.is_dir() or is_adapter_dir(path):
        return None
    try:
        checkpoint = open_checkpoint(path)
    except (OSError, ValueError):
        return None
    try:
        return {name: tuple(checkpoint.shape(name)) for name in checkpoint}
    finally:
        checkpoint.close()


def _written_shapes(merged_dir: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor in the safetensors files of a merged dir (each file's header only)."""
    out: dict[str, tuple[int, ...]] = {}
    for f in sorted(merged_dir.glob("*.safetensors")):
        with open(f, "rb") as handle:
            header = json.loads(safetensors_header(handle, f, f.stat().st_size)[8:])
        out.update({k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    return out


def _pretrained_layout(pool: ModelPool, merged_dir: Path, pretrained: str) -> bool:
    """Whether an in-memory pool's merged dir is the pretrained checkpoint with its tensors merged, as MergeKit
    writes a merge: its safetensors files hold exactly the pretrained checkpoint's tensors (names and shapes), and
    every expert checkpoint holds them too (a PEFT adapter expert aside: it gets its own reason). So a causal-LM
    pool's whole LM is, and a classifier pool's backbone with per-task heads or a CLIP pool's merged vision tower
    with zero-shot heads is not (nor anything whose pretrained checkpoint cannot be read here)."""
    base = _tensor_shapes(pretrained)
    if base is None or _written_shapes(merged_dir) != base:
        return False
    for task in pool.tasks:
        shapes = _tensor_shapes(pool.resolved[task])
        if shapes is not None and any(shapes.get(k) != v for k, v in base.items()):
            return False
    return True


def build_recipe(record: MergeRecord, merged_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The recipe of the merge written in ``merged_dir``, and the MergeKit YAML (None when MergeKit has no
    equivalent; the recipe's ``mergekit.reason`` says why)."""
    model = record.config.get("model") or {}
    pretrained = str(model.get("pretrained"))
    gguf_file = model.get("gguf_file") or None
    given = dict(model.get("experts") or {})
    pool = record.pool
    base_id = checkpoint_identity(pretrained)
    # The hub ids the experts' adapter configs name as their base: the pretrained model's, if its weights say so.
    hints = [(b, f"expert '{t}''s adapter_config.json (base_model_name_or_path)") for t, b in _adapter_bases(pool)]
    base_id.update(hub_identity(pretrained, gguf_file, hints))
    if gguf_file:
        base_id["gguf_file"] = gguf_file
    experts = {t: {"given": given.get(t), **checkpoint_identity(pool.resolved[t])} for t in pool.tasks}
    export = export_merge(
        record.method,
        pretrained,
        [pool.resolved[t] for t in pool.tasks],
        streamed=not pool.in_memory or (not gguf_file and _pretrained_layout(pool, merged_dir, pretrained)),
        pool=pool.describe(),
        include=list(model.get("include") or []),
        exclude=list(model.get("exclude") or []),
        vocab_extended=not pool.in_memory and _vocab_extended(model, pretrained, merged_dir),
        base_dtypes=base_id.get("float_dtypes", []),
        gguf_file=gguf_file,
    )
    source = record.config.get(KEY)
    versions = package_versions()
    recipe: dict[str, Any] = {
        "format": RECIPE_FORMAT,
        "written_by": f"mergelab {versions.get('mergelab')}",
        "method": {
            "name": record.name,
            "target": record.method_config.get("_target_"),
            "options": _options(record),
            "grid_point": record.grid_point,
        },
        "coefficients": record.method.report(),
        "pretrained": base_id,
        "experts": experts,
        "scores": _scores(record),
        "mergekit": {"file": CONFIG_FILE, "notes": export.notes}
        if export.config is not None
        else {"file": None, "reason": export.reason},
        # The command spells out the run: a MergeKit import's overrides stand for the file (kept under source).
        "command": reproduce_command(record.overrides, skip=(KEY,)) if record.overrides is not None else None,
        "overrides": record.overrides,
        "source": {
            KEY: source,
            "sha256": hashlib.sha256(Path(source).read_bytes()).hexdigest() if Path(source).is_file() else None,
        }
        if source
        else None,
        "versions": versions,
        "config": record.config,
    }
    return recipe, export.yaml() if export.config is not None else None


def write_provenance(merged_dir: str | Path, record: MergeRecord) -> dict[str, Any]:
    """Write the recipe, the card and (when expressible) the MergeKit config into ``merged_dir``; returns the recipe.

    Called on the finished merged dir before it is moved into place (see ``mergelab.run``), each file written
    atomically, so the final dir is never seen without them.
    """
    merged_dir = Path(merged_dir)
    recipe, mergekit_yaml = build_recipe(record, merged_dir)
    if mergekit_yaml is not None:
        atomic_write_text(merged_dir / CONFIG_FILE, mergekit_yaml)
    atomic_write_text(merged_dir / CARD_FILE, model_card(recipe, record.rows, record.tasks))
    atomic_write_json(merged_dir / RECIPE_FILE, recipe)
    return recipe
