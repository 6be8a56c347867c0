"""What every evaluation suite shares: the ``eval.`` options, the ``tasks.yaml`` reader and split helpers.

:class:`SuiteOptions` checks the options every suite takes; :func:`read_tasks_yaml` finds, loads and checks the
structure of a suite dir's ``tasks.yaml`` and picks the requested tasks' entries, and :func:`check_task_keys`
checks one entry's required and allowed keys, so that each suite family (text classification, generative, image)
only parses its own fields, with errors that name the file, the task and the key. :func:`load_split`,
:func:`subsample` and :func:`split_files` read the parquet splits; :class:`EvalSuite` is the protocol the engine
scores against."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import yaml

if TYPE_CHECKING:
    import datasets

SPLITS = ("train", "validation", "test")


TASKS_FILE = "tasks.yaml"


# Documentation keys every suite family accepts in a ``tasks.yaml`` entry (families add their own).
COMMON_DOC_KEYS = ("description", "source", "license")


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
        repeated = sorted({t for t in tasks if list(tasks).count(t) > 1})
        if repeated:  # a task listed twice would have one expert and one column, the other silently dropped
            raise ValueError(f"eval.tasks lists {repeated} more than once: {list(tasks)}")
        self.name = name
        self.data_dir = Path(data_dir)
        self.index = self.data_dir / TASKS_FILE  # the suite's tasks.yaml, as errors name it
        self.task_names = list(tasks)
        self.batch_size, self.max_length = int(batch_size), int(max_length)
        self.max_eval_examples = max_eval_examples
        self.tune_split, self.report_split, self.seed = tune_split, report_split, seed

    @contextmanager
    def scoring_subset(self, n: int) -> Iterator[None]:
        """Inside the block, score at most ``n`` examples of each task: the first ``n`` of the seeded shuffle every
        split is drawn from, so the subset is part of what is scored outside it (successive-halving tuning)."""
        old = self.max_eval_examples
        self.max_eval_examples = n if old is None else min(old, n)
        try:
            yield
        finally:
            self.max_eval_examples = old


def read_tasks_yaml(
    data_dir: str | Path, suite_name: str, task_names: Sequence[str] | None = None
) -> dict[str, Mapping[str, Any]]:
    """The task entries of ``<data_dir>/tasks.yaml``, checked for structure; errors name the file and task.

    The file must exist, parse as YAML and hold a ``tasks:`` mapping whose entries are mappings of keys. With
    ``task_names`` (``eval.tasks``) it must be non-empty and every name defined in the file; the entries of those
    tasks are returned in that order. Without it, every entry is returned in file order. The entries' keys are
    not checked here: each family does that with :func:`check_task_keys` and its own field parsing.
    """
    path = Path(data_dir) / TASKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"suite '{suite_name}': no tasks.yaml in data_dir {data_dir} ({path} is not a file)")
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"suite '{suite_name}': {path} is not valid YAML: {e}") from e
    meta = doc.get("tasks") if isinstance(doc, Mapping) else None
    if not isinstance(meta, Mapping):
        raise ValueError(f"suite '{suite_name}': {path} has no 'tasks:' mapping")
    for name, entry in meta.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"{path}: task '{name}' must be a mapping of keys, got {type(entry).__name__}")
    if task_names is None:
        return {str(t): e for t, e in meta.items()}
    if not task_names:
        raise ValueError(f"suite '{suite_name}': eval.tasks is empty")
    unknown = [t for t in task_names if t not in meta]
    if unknown:
        raise ValueError(f"suite '{suite_name}': unknown task(s) {unknown}; {path} defines {sorted(map(str, meta))}")
    return {t: meta[t] for t in task_names}


def check_task_keys(
    entry: Mapping[str, Any], where: Path, task: str, required: Sequence[str], optional: Iterable[str]
) -> None:
    """Refuse a ``tasks.yaml`` entry that lacks a ``required`` key or has one that is neither required nor optional.

    ``where`` is the ``tasks.yaml`` file; errors name it, the task and the key(s).
    """
    at = f"{where}: task '{task}'"
    missing = [k for k in required if k not in entry]
    if missing:
        raise ValueError(f"{at} has no {missing} (required: {list(required)})")
    known = [*required, *(k for k in optional if k not in required)]
    unknown = sorted(str(k) for k in set(entry) - set(known))
    if unknown:
        raise ValueError(f"{at}: unknown key(s) {unknown}; known: {known}")


def split_files(data_dir: Path, task: str, where: Path) -> dict[str, Path]:
    """``<data_dir>/<task>/<split>.parquet`` for every split, each checked to exist (errors name ``where``)."""
    files = {s: Path(data_dir) / task / f"{s}.parquet" for s in SPLITS}
    for s, f in files.items():
        if not f.is_file():
            raise FileNotFoundError(f"{where}: task '{task}' has no {s} split at {f}")
    return files


def load_split(path: Path, split: str) -> datasets.Dataset:
    """One parquet split file as a ``datasets.Dataset``."""
    import datasets  # when a split is read: a merge-only run never needs it

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
