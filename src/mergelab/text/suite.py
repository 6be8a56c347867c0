"""Text-classification task suites: data + YAML, loaded through ``datasets``.

A suite directory holds ``tasks.yaml`` and ``<task>/{train,validation,test}.parquet`` with columns ``text`` and
``label``. Under ``tasks:``, each task gives its ``labels`` (class names in label-id order; required) and may
document itself with the keys :data:`DOC_KEYS` lists (``description``, ``source``, ``license``, counts, ...); other
keys are refused. Adding a task means adding its files and a ``tasks.yaml`` entry; no code."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader, Sampler

from mergelab.suites.base import (
    COMMON_DOC_KEYS,
    SPLITS,
    SuiteOptions,
    check_task_keys,
    file_digest,
    load_split,
    read_tasks_yaml,
    split_files,
    subsample,
)

REQUIRED_KEYS = ("labels",)


# Written by scripts/build_embedded_suite.py to document a task; the suite does not read them.
DOC_KEYS = (
    *COMMON_DOC_KEYS,
    "num_labels",
    "upstream",
    "how",
    "seed",
    "dedup",
    "available_per_class",
    "sizes",
    "per_class",
    "test_majority_baseline",
)


@dataclass(frozen=True)
class TaskInfo:
    """What the suite knows about one task."""

    name: str
    labels: list[str]
    description: str
    files: dict[str, Path]

    @property
    def num_labels(self) -> int:
        return len(self.labels)


def parse_text_task(name: str, entry: Mapping[str, Any], data_dir: Path, where: Path) -> TaskInfo:
    """Check one ``tasks.yaml`` entry and build its :class:`TaskInfo`; errors name the file, task and key."""
    check_task_keys(entry, where, name, REQUIRED_KEYS, DOC_KEYS)
    at = f"{where}: task '{name}'"
    labels = entry["labels"]
    if (
        not isinstance(labels, list)
        or not labels
        or not all(isinstance(x, str) and x for x in labels)
        or len(set(labels)) != len(labels)
    ):
        raise ValueError(
            f"{at}: labels must be a non-empty list of distinct, non-empty strings (quote names YAML reads as "
            f"booleans or numbers), got {labels!r}"
        )
    return TaskInfo(name, list(labels), str(entry.get("description", "")), split_files(data_dir, name, where))


class TextClassificationSuite(SuiteOptions):
    """Scores models on every task of a suite.

    Args:
        name: suite name (for reports).
        data_dir: directory with ``tasks.yaml`` and one sub-directory per task.
        tasks: the task names to use, in report order.
        batch_size: evaluation batch size.
        max_length: tokens per example (longer texts are truncated).
        max_eval_examples: evaluate on the first N examples of each split (None = all); a fixed, seeded
            subset so that every model sees the same examples.
        tune_split / report_split: the split used to choose coefficients, and the one reported.
        seed: seed of the evaluation subset.
    """

    def __init__(
        self,
        name: str,
        data_dir: str,
        tasks: Sequence[str],
        batch_size: int = 64,
        max_length: int = 64,
        max_eval_examples: int | None = None,
        tune_split: str = "validation",
        report_split: str = "test",
        seed: int = 0,
    ) -> None:
        super().__init__(
            name, data_dir, tasks, batch_size, max_length, max_eval_examples, tune_split, report_split, seed
        )
        self.tasks = self._read_tasks()
        # (task, split, max examples) -> (tokenizer, length-sorted tokenized rows): every model of a run is scored
        # on the same examples, so they are read and tokenized once (10% of an evaluation on MiniLM).
        self._eval_rows: dict[tuple[Any, ...], tuple[Any, list[dict[str, Any]]]] = {}

    def _read_tasks(self) -> dict[str, TaskInfo]:
        entries = read_tasks_yaml(self.data_dir, self.name, self.task_names)
        return {t: parse_text_task(t, entry, self.data_dir, self.index) for t, entry in entries.items()}

    # ------------------------------------------------------------------------------------------- data

    def dataset(self, task: str, split: str, max_examples: int | None = None) -> datasets.Dataset:
        """One split of one task as a ``datasets.Dataset``, checked against the task's label names."""
        info = self.tasks[task]
        ds = load_split(info.files[split], split)
        labels = ds["label"]
        bad = sorted({int(v) for v in labels if not 0 <= int(v) < info.num_labels})
        if bad:
            raise ValueError(
                f"task '{task}': {info.files[split]} has label id(s) {bad[:10]} outside the "
                f"{info.num_labels} labels {info.labels} of tasks.yaml"
            )
        return subsample(ds, max_examples, self.seed)

    def eval_dataset(self, task: str, split: str) -> datasets.Dataset:
        """The (possibly subsampled) split every model is scored on."""
        return self.dataset(task, split, self.max_eval_examples)

    def tokenize(self, ds: datasets.Dataset, tokenizer: Any) -> list[dict[str, Any]]:
        """Each example's token lists, without padding (batches are padded to their own longest example), and its
        label as ``labels``.

        The tokenizer runs on the text column itself, not through ``Dataset.map``: map fingerprints its function by
        pickling it with everything it closes over (this suite, with the rows it has cached, and the tokenizer) on
        every call, which grew with every expert a cold run built: its scoring took 4 s for the first, 31 s for the
        sixth."""
        encoded = tokenizer(list(ds["text"]), truncation=True, max_length=self.max_length)
        labels = [int(v) for v in ds["label"]]
        keys = list(encoded.keys())
        return [{"labels": label, **{k: encoded[k][i] for k in keys}} for i, label in enumerate(labels)]

    def eval_loader(self, task: str, split: str, tokenizer: Any) -> DataLoader:
        """:meth:`dataloader` of :meth:`eval_dataset`, the batches every model is scored on; the examples are read
        and tokenized once per task, split, subset size (:meth:`scoring_subset`), truncation, seed and tokenizer."""
        key = (task, split, self.max_eval_examples, self.max_length, self.seed)  # all the rows depend on
        cached = self._eval_rows.get(key)
        if cached is None or cached[0] is not tokenizer:
            cached = (tokenizer, self._rows(self.eval_dataset(task, split), tokenizer, shuffle=False))
            self._eval_rows[key] = cached
        return self._loader(cached[1], tokenizer, shuffle=False, batch_size=None, seed=0)

    def _rows(self, ds: datasets.Dataset, tokenizer: Any, shuffle: bool) -> list[dict[str, Any]]:
        rows = self.tokenize(ds, tokenizer)
        if not shuffle:
            # Sorting by length (stable) removes most padding: the same predictions, several times faster on CPU.
            rows = sorted(rows, key=lambda r: len(r["input_ids"]))
        return rows

    def dataloader(
        self, ds: datasets.Dataset, tokenizer: Any, shuffle: bool = False, batch_size: int | None = None, seed: int = 0
    ) -> DataLoader:
        """Batches of a tokenized dataset; evaluation batches are formed from length-sorted examples, shuffled
        (training) ones are length-grouped (:class:`LengthGroupedBatches`)."""
        return self._loader(self._rows(ds, tokenizer, shuffle), tokenizer, shuffle, batch_size, seed)

    def _loader(
        self, rows: list[dict[str, Any]], tokenizer: Any, shuffle: bool, batch_size: int | None, seed: int
    ) -> DataLoader:
        pad_id = tokenizer.pad_token_id or 0
        size = batch_size or self.batch_size
        collate = partial(pad_batch, pad_id=pad_id)
        if shuffle:
            lengths = [len(r["input_ids"]) for r in rows]
            sampler = LengthGroupedBatches(lengths, size, seed)
            return DataLoader(rows, batch_sampler=sampler, collate_fn=collate)  # type: ignore[arg-type]
        return DataLoader(rows, batch_size=size, shuffle=False, collate_fn=collate)  # type: ignore[arg-type]

    @cached_property
    def fingerprint(self) -> str:
        """Identifies the data every score depends on (files, subset, truncation)."""
        h = hashlib.sha256()
        for t in self.task_names:
            for s in SPLITS:
                h.update(f"{t}/{s}:{file_digest(self.tasks[t].files[s])}".encode())
        h.update(f"{self.max_eval_examples}|{self.max_length}|{self.seed}".encode())
        return h.hexdigest()[:16]


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled training batches of examples of similar length: each epoch a seeded permutation is cut into
    windows of ``group`` batches, each window sorted by length and cut into batches, and the batches shuffled.

    Every example is seen once an epoch and batches stay random in content and order, but each is padded to a
    length close to its examples' own: on the embedded suite's training data the padded tokens per epoch fall by
    about a third (random batches of 32 pad to 1.5x the tokens the examples hold), and fine-tuning time with them.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, group: int = 16) -> None:
        if batch_size < 1 or group < 1:
            raise ValueError(f"batch_size and group must be >= 1, got {batch_size}, {group}")
        self.lengths, self.batch_size, self.group = list(lengths), batch_size, group
        self.generator = torch.Generator().manual_seed(seed)  # advances every epoch: each epoch its own order

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        window = self.batch_size * self.group
        batches: list[list[int]] = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=self.lengths.__getitem__)  # stable: ties keep order
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


def pad_batch(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token lists to the longest row; build the attention mask."""
    width = max(len(r["input_ids"]) for r in rows)
    batch: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        if key == "labels":
            batch[key] = torch.tensor([r[key] for r in rows], dtype=torch.long)
            continue
        fill = pad_id if key == "input_ids" else 0
        batch[key] = torch.tensor([r[key] + [fill] * (width - len(r[key])) for r in rows], dtype=torch.long)
    return batch
