"""PART OF suite: suites.base"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import datasets

SPLITS = ("train", "validation", "test")


def file_digest(path: Path) -> str:
    """sha256 of a file's bytes (used in cache keys)."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


class SuiteOptions:
    """The options every evaluation suite shares, set and checked once, with errors naming the ``eval.`` key at fault.

    ``min_length``: the smallest ``max_length`` the suite can work with (prompts need room for their answer).
    """

    def __init__(
        self,
        name: str,
        data_dir: str,
        tasks: Sequence[str],
        batch_size: int,
        max_length: int,
        max_eval_examples: int | None,
        tune_split: str,
        report_split: str,
        seed: int,
        min_length: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"eval.batch_size must be >= 1, got {batch_size}")
        if max_length < min_length:
            raise ValueError(f"eval.max_length must be >= {min_length} (prompt tokens), got {max_length}")
        if max_eval_examples is not None and max_eval_examples < 1:
            raise ValueError(f"eval.max_eval_examples must be >= 1 or null, got {max_eval_examples}")
        for key, split in (("tune_split", tune_split), ("report_split", report_split)):
            if split not in SPLITS:
                raise ValueError(f"eval.{key} must be one of {SPLITS}, got {split!r}")
        self.name = name
        self.data_dir = Path(data_dir)
        self.task_names = list(tasks)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.max_eval_examples = max_eval_examples
        self.tune_split, self.report_split, self.seed = tune_split, report_split, seed


def load_split(path: Path, split: str) -> datasets.Dataset:
    """One parquet split file as a ``datasets.Dataset``."""
    return datasets.load_dataset("parquet", data_files={split: str(path)}, split=split)


def subsample(ds: datasets.Dataset, max_examples: int | None, seed: int) -> datasets.Dataset:
    """The first ``max_examples`` of a seeded shuffle (all of ``ds`` when None), so every model sees the same."""
    if max_examples is not None and len(ds) > max_examples:
        ds = ds.shuffle(seed=seed).select(range(max_examples))
    return ds


class EvalSuite(Protocol):
    """An evaluation suite: named tasks with train/validation/test splits."""

    name: str
    task_names: list[str]
    tune_split: str
    report_split: str
    max_length: int

    @property
    def fingerprint(self) -> str:
        """Identifies everything the scores depend on (data files, subset, formatting)."""
        ...
