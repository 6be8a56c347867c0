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
from mergelab.provenance.identity import checkpoint_identity, package_versions
from mergelab.provenance.mergekit import CONFIG_FILE, KEY, export_merge

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
    """The merged row's scores (per task and averages, with the splits), None when the run did not score it."""
    row = record.rows.get(record.name) or {}
    if "scores" not in row:
        return None
    return {
        "suite": record.suite,
        "split": record.split,
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


def build_recipe(record: MergeRecord, merged_dir: Path) -> tuple[dict[str, Any], str | None]:
    """The recipe of the merge written in ``merged_dir``, and the MergeKit YAML (None when MergeKit has no
    equivalent; the recipe's ``mergekit.reason`` says why)."""
    model = record.config.get("model") or {}
    pretrained = str(model.get("pretrained"))
    given = dict(model.get("experts") or {})
    pool = record.pool
    base_id = checkpoint_identity(pretrained)
    experts = {t: {"given": given.get(t), **checkpoint_identity(pool.resolved[t])} for t in pool.tasks}
    export = export_merge(
        record.method,
        pretrained,
        [pool.resolved[t] for t in pool.tasks],
        streamed=not pool.in_memory,
        pool=pool.describe(),
        include=list(model.get("include") or []),
        exclude=list(model.get("exclude") or []),
        vocab_extended=not pool.in_memory and _vocab_extended(model, pretrained, merged_dir),
        base_dtypes=base_id.get("float_dtypes", []),
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
