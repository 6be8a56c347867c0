"""Loaders of the offline lm-eval tasks in this dir: the parquet splits of ``data/generative``, found next to it.

lm-eval calls ``custom_dataset`` with the task's ``dataset_kwargs`` (and its metadata); paths are resolved from this
file so that the tasks work whatever the working directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets

GENERATIVE = Path(__file__).resolve().parent.parent / "generative"
SENTIMENTS = ["negative", "neutral", "positive"]


def load_generative(source: str, **_: Any) -> datasets.DatasetDict:
    """The train/validation/test parquet files of ``data/generative/<source>`` as a DatasetDict."""
    files = {split: str(GENERATIVE / source / f"{split}.parquet") for split in ("train", "validation", "test")}
    missing = [f for f in files.values() if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"lm-eval task data missing: {missing}")
    return datasets.load_dataset("parquet", data_files=files)


def sentiment_target(doc: dict[str, Any]) -> int:
    """Index of the answer among the choices (lm-eval's multiple-choice target)."""
    return SENTIMENTS.index(doc["answer"])
