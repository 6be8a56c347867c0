"""Zero-shot image-classification suites: data + YAML, read through ``datasets``, no code per task.

:class:`ZeroShotImageSuite` reads a ``tasks.yaml`` whose entries name a dataset that ``datasets.load_dataset``
reads (a hub name, or a local dir resolved against the suite dir), the split expression behind each suite split,
the image and label columns, the prompt templates (each with ``{classname}``) and optionally the class names
(default: the label column's ``ClassLabel`` names); ``description``, ``source`` and ``license`` document a task and
other keys are refused. The module also holds the file names and format version of the zero-shot head caches
that :mod:`mergelab.vision.pool` writes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

from mergelab.causal_lm.suite import template_fields
from mergelab.io.files import looks_local
from mergelab.suites.base import (
    COMMON_DOC_KEYS,
    SPLITS,
    SuiteOptions,
    check_task_keys,
    read_tasks_yaml,
    subsample,
)

# Bump when the way heads are computed changes, so stale cache entries are not reused.
HEADS_FORMAT = 1


HEADS_FILE = "heads.safetensors"


MERGED_HEADS_FILE = "zero_shot_heads.safetensors"


MERGED_HEADS_META = "zero_shot_heads.json"


CLIP_TYPES = ("clip", "clip_vision_model")  # what an expert's config.json may declare


REQUIRED_KEYS = ("dataset", "templates")


TASK_KEYS = ("dataset", "config", "revision", "splits", "image_column", "label_column", "templates", "classnames")


DOC_KEYS = COMMON_DOC_KEYS


DEFAULT_SPLITS = {"validation": "validation", "test": "test"}

#: Seed of the permutation a sliced split expression selects from (fixed: part of what a task's data is).
SLICE_SEED = 0


def load_shuffled_slices(path: str, config: str | None, expr: str, revision: str | None) -> datasets.Dataset:
    """The examples of a ``datasets`` split expression; a slice ("train[-10%:]", "extra[:2%]") selects its range
    from a seeded permutation of the whole split, not from the stored order, since several of these datasets store
    their train split sorted by label (a plain last 10% would hold the last classes only)."""
    datasets.ReadInstruction.from_spec(expr)  # a malformed expression fails here, with datasets' own message
    parts = []
    for spec in expr.split("+"):
        spec = spec.strip()
        if "[" not in spec:
            parts.append(datasets.load_dataset(path, config, split=spec, revision=revision))
            continue
        name = spec.split("[", 1)[0]
        whole = datasets.load_dataset(path, config, split=name, revision=revision)
        (absolute,) = datasets.ReadInstruction.from_spec(spec).to_absolute({name: len(whole)})
        order = torch.randperm(len(whole), generator=torch.Generator().manual_seed(SLICE_SEED))
        parts.append(whole.select(sorted(order[absolute.from_ : absolute.to].tolist())))
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


@dataclass(frozen=True)
class ImageTask:
    """How one task's images are read and its classes named (one ``tasks.yaml`` entry)."""

    name: str
    dataset: str  # hub name, or a local dir (absolute, or resolved against the suite dir)
    config: str | None
    revision: str | None
    splits: dict[str, str]  # suite split -> ``datasets`` split expression (e.g. "train[-10%:]")
    image_column: str
    label_column: str
    templates: list[str]
    classnames: list[str] | None
    description: str = ""
    local: bool = field(default=False)

    def spec(self) -> dict[str, Any]:
        """What determines the images, labels and heads (for cache keys)."""
        return {k: v for k, v in asdict(self).items() if k != "description"}


def parse_image_task(name: str, entry: Mapping[str, Any], suite_dir: Path, where: Path) -> ImageTask:
    """Check one ``tasks.yaml`` entry and build its :class:`ImageTask`; errors name the file, task and key."""
    check_task_keys(entry, where, name, REQUIRED_KEYS, (*TASK_KEYS, *DOC_KEYS))
    at = f"{where}: task '{name}'"
    dataset = entry["dataset"]
    if not isinstance(dataset, str) or not dataset:
        raise ValueError(f"{at}: dataset must be a hub name or a dir, got {dataset!r}")
    local = looks_local(dataset) or (suite_dir / dataset).exists()
    if local:
        path = Path(dataset).expanduser()
        path = path if path.is_absolute() else suite_dir / path
        if not path.exists():
            raise FileNotFoundError(f"{at}: dataset dir '{dataset}' does not exist ({path})")
        dataset = str(path)
    splits = entry.get("splits", DEFAULT_SPLITS)
    if not isinstance(splits, Mapping) or not splits:
        raise ValueError(f"{at}: splits must map suite splits {list(SPLITS)} to dataset splits, got {splits!r}")
    bad = [s for s in splits if s not in SPLITS]
    if bad or not all(isinstance(v, str) and v for v in splits.values()):
        raise ValueError(f"{at}: splits must map some of {list(SPLITS)} to split names, got {dict(splits)!r}")
    columns = {}
    for key in ("image_column", "label_column"):
        value = entry.get(key, key.split("_")[0])
        if not isinstance(value, str) or not value:
            raise ValueError(f"{at}: {key} must be a column name, got {value!r}")
        columns[key] = value
    templates = entry["templates"]
    if not isinstance(templates, list) or not templates:
        raise ValueError(f"{at}: templates must be a non-empty list of strings with '{{classname}}'")
    for t in templates:
        try:
            fields = template_fields(t) if isinstance(t, str) else None
        except ValueError as e:
            raise ValueError(f"{at}: template {t!r} is not a valid template ({e})") from e
        if fields != ["classname"]:
            raise ValueError(f"{at}: each template must use '{{classname}}' once and no other field, got {t!r}")
    classnames = entry.get("classnames")
    if classnames is not None and (
        not isinstance(classnames, list) or not classnames or not all(isinstance(c, str) and c for c in classnames)
    ):
        raise ValueError(f"{at}: classnames must be null or a non-empty list of strings, got {classnames!r}")
    for key in ("config", "revision"):
        if entry.get(key) is not None and not isinstance(entry[key], str):
            raise ValueError(f"{at}: {key} must be a string or null, got {entry[key]!r}")
    return ImageTask(
        name=name,
        dataset=dataset,
        config=entry.get("config"),
        revision=entry.get("revision"),
        splits={str(k): str(v) for k, v in splits.items()},
        image_column=columns["image_column"],
        label_column=columns["label_column"],
        templates=list(templates),
        classnames=list(classnames) if classnames is not None else None,
        description=str(entry.get("description", "")),
        local=local,
    )


def dir_fingerprint(path: str | Path) -> str:
    """Identity of a local dataset dir: every file's relative path, size and mtime (no reading of the images)."""
    root = Path(path)
    h = hashlib.sha256()
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root) if f != root else f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class ImageCollator:
    """Rows of a dataset -> ``pixel_values`` (images in RGB through the image processor) and ``labels``.

    A class rather than a closure so that DataLoader workers can receive it under any start method.
    """

    def __init__(self, processor: Any, image_column: str, label_column: str) -> None:
        self.processor, self.image_column, self.label_column = processor, image_column, label_column

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [r[self.image_column].convert("RGB") for r in rows]
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "labels": torch.tensor([int(r[self.label_column]) for r in rows])}


class ZeroShotImageSuite(SuiteOptions):
    """Image-classification tasks scored with zero-shot heads, read through ``datasets``.

    Args:
        name: suite name (for reports).
        data_dir: directory with ``tasks.yaml`` (relative dataset dirs are resolved against it).
        tasks: the task names to use, in report order.
        batch_size: evaluation batch size (images per batch).
        max_length: text tokens per prompt when building heads (CLIP's context is 77).
        max_eval_examples: evaluate on the first N examples of a seeded shuffle of each split (None = all).
        tune_split / report_split: the suite split used to choose coefficients, and the one reported; each task's
            ``splits`` says which dataset split (expression) stands behind them.
        seed: seed of the evaluation subset.
        num_workers: DataLoader workers decoding and preprocessing images.
    """

    def __init__(
        self,
        name: str,
        data_dir: str,
        tasks: Sequence[str],
        batch_size: int = 64,
        max_length: int = 77,
        max_eval_examples: int | None = None,
        tune_split: str = "validation",
        report_split: str = "test",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(
            name, data_dir, tasks, batch_size, max_length, max_eval_examples, tune_split, report_split, seed, 4
        )
        if num_workers < 0:
            raise ValueError(f"eval.num_workers must be >= 0, got {num_workers}")
        self.num_workers = int(num_workers)
        self.tasks = self._read_tasks()
        for t, info in self.tasks.items():
            for key, split in (("tune_split", tune_split), ("report_split", report_split)):
                if split not in info.splits:
                    raise ValueError(
                        f"suite '{name}': task '{t}' has no split for eval.{key} '{split}' "
                        f"(its splits: {info.splits}; {self.index})"
                    )
        self._loaded: dict[tuple[str, str], datasets.Dataset] = {}

    def _read_tasks(self) -> dict[str, ImageTask]:
        entries = read_tasks_yaml(self.data_dir, self.name, self.task_names)
        return {t: parse_image_task(t, entry, self.data_dir, self.index) for t, entry in entries.items()}

    # ------------------------------------------------------------------------------------------- data

    def dataset(self, task: str, split: str) -> datasets.Dataset:
        """The whole ``split`` of ``task`` (loaded once), checked against its ``tasks.yaml`` entry."""
        if (task, split) in self._loaded:
            return self._loaded[(task, split)]
        info = self.tasks[task]
        where = f"task '{task}' ({info.dataset}, {self.index})"
        if split not in info.splits:
            raise ValueError(f"{where}: no '{split}' in splits {info.splits}")
        expr = info.splits[split]
        try:
            ds = load_shuffled_slices(info.dataset, info.config, expr, info.revision)
        except Exception as e:  # datasets raises several types for missing files, splits and hub errors
            raise ValueError(f"{where}: cannot load split '{expr}' (splits.{split}): {type(e).__name__}: {e}") from e
        for key in ("image_column", "label_column"):
            column = getattr(info, key)
            if column not in ds.column_names:
                raise ValueError(
                    f"{where}: {key} '{column}' is not a column of split '{expr}'; columns: {ds.column_names}"
                )
        if not isinstance(ds.features[info.image_column], datasets.Image):
            raise ValueError(
                f"{where}: image_column '{info.image_column}' holds {ds.features[info.image_column]}, not images"
            )
        label = ds.features[info.label_column]
        if not isinstance(label, datasets.ClassLabel) and not (
            isinstance(label, datasets.Value) and label.dtype.startswith(("int", "uint"))
        ):
            raise ValueError(f"{where}: label_column '{info.label_column}' holds {label}, not integer class ids")
        n = len(self._classnames(info, ds, where))
        bad = sorted({int(v) for v in ds[info.label_column] if not 0 <= int(v) < n})
        if bad:
            raise ValueError(f"{where}: split '{expr}' has label id(s) {bad[:10]} outside the {n} class names")
        self._loaded[(task, split)] = ds
        return ds

    @staticmethod
    def _classnames(info: ImageTask, ds: datasets.Dataset, where: str) -> list[str]:
        feature = ds.features[info.label_column]
        names = list(feature.names) if isinstance(feature, datasets.ClassLabel) else None
        if info.classnames is None:
            if names is None:
                raise ValueError(
                    f"{where}: label_column '{info.label_column}' is {feature}, not a ClassLabel with names: "
                    f"set 'classnames' in tasks.yaml"
                )
            return names
        if names is not None and len(info.classnames) != len(names):
            raise ValueError(
                f"{where}: classnames has {len(info.classnames)} names but label_column '{info.label_column}' has "
                f"{len(names)} classes {names[:5]}{'...' if len(names) > 5 else ''}"
            )
        return list(info.classnames)

    def classnames(self, task: str) -> list[str]:
        """The class names of ``task`` in label order: ``classnames`` of tasks.yaml, else the ClassLabel names."""
        info = self.tasks[task]
        return self._classnames(info, self.dataset(task, self.report_split), f"task '{task}' ({self.index})")

    def templates(self, task: str) -> list[str]:
        """The prompt templates of ``task`` (``{classname}`` is filled with each class name)."""
        return list(self.tasks[task].templates)

    def eval_dataset(self, task: str, split: str) -> datasets.Dataset:
        """The (possibly subsampled) split every model is scored on."""
        return subsample(self.dataset(task, split), self.max_eval_examples, self.seed)

    def eval_loader(self, task: str, split: str, processor: Any) -> DataLoader:
        """Batches of ``pixel_values`` (the model's image processor, images converted to RGB) and ``labels``."""
        info = self.tasks[task]
        collate = ImageCollator(processor, info.image_column, info.label_column)
        return DataLoader(
            self.eval_dataset(task, split),  # type: ignore[arg-type]
            batch_size=self.batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
        )

    @cached_property
    def fingerprint(self) -> str:
        """Identifies what scores depend on: task specs, local data files (sizes, mtimes), subset and seed."""
        h = hashlib.sha256()
        for t in self.task_names:
            info = self.tasks[t]
            h.update(json.dumps(info.spec(), sort_keys=True).encode())
            if info.local:
                h.update(dir_fingerprint(info.dataset).encode())
        h.update(f"{self.max_eval_examples}|{self.max_length}|{self.seed}".encode())
        return h.hexdigest()[:16]
