"""Generative task suites for causal LMs: data + YAML, no code per task.

A suite directory holds ``tasks.yaml`` and ``<task>/{train,validation,test}.parquet``. Under ``tasks:``, each task
says how its prompt is built and how it is scored:

- ``prompt``: a ``str.format`` template over the parquet columns (e.g. ``"Tweet: {text}"``);
- ``chat`` (false): wrap the prompt as a user turn with the tokenizer's chat template;
- ``answer_field``: the column holding the answer; ``answer_prefix`` (""): text between prompt and answer
  (e.g. a space for plain-text completion). The model is trained to produce prefix + answer + end-of-sequence;
- ``metric``: ``exact_match`` (greedy generation of at most ``max_new_tokens``, cut at the first ``stop`` string,
  compared with :func:`normalize_answer`) or ``choice`` (log-likelihood accuracy over ``choices``: the choice whose
  tokens plus end-of-sequence get the highest summed log-probability after the prompt);
- ``description``, ``source``, ``license``, ``how``, ``seed``, ``sizes``, ``test_majority_*``: documentation.

Both metrics are reported as ``acc``."""

from __future__ import annotations

import hashlib
import json
import string
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader

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

METRICS = ("exact_match", "choice")


REQUIRED_KEYS = ("prompt", "answer_field", "metric")


SCORING_KEYS = ("chat", "answer_prefix", "choices", "stop", "max_new_tokens")


DOC_KEYS = (
    *COMMON_DOC_KEYS,
    "upstream",
    "how",
    "seed",
    "sizes",
    "test_majority_answer",
    "test_majority_baseline",
)


TRAINING_KEYS = ("name", "prompt", "answer_field", "chat", "answer_prefix")  # the rest only changes scoring


IGNORE_INDEX = -100  # label of the tokens the fine-tuning loss skips (prompt, padding)


STRIP = ".,;:!?\"' "


def normalize_answer(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding ``.,;:!?"'`` stripped: what exact match compares."""
    return " ".join(text.split()).strip(STRIP).lower()


def template_fields(template: str) -> list[str]:
    """The ``{field}`` names a ``str.format`` template uses (ValueError when it is malformed)."""
    return [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` without leading whitespace, up to the first ``stop`` string."""
    text = text.lstrip()
    cuts = [i for i in (text.find(s) for s in stop) if i >= 0]
    return text[: min(cuts)] if cuts else text


@dataclass(frozen=True)
class GenerativeTask:
    """How one task's examples are prompted and scored (one ``tasks.yaml`` entry)."""

    name: str
    prompt: str
    answer_field: str
    metric: str
    chat: bool
    answer_prefix: str
    choices: list[str] | None
    stop: list[str]
    max_new_tokens: int
    description: str
    files: dict[str, Path]

    @property
    def fields(self) -> list[str]:
        """The columns the prompt template uses."""
        return template_fields(self.prompt)

    def spec(self, training: bool = False) -> dict[str, Any]:
        """What determines prompts, targets and scores (for cache keys); ``training``: only what fine-tuning sees."""
        kept = TRAINING_KEYS if training else [k for k in asdict(self) if k not in ("files", "description")]
        return {k: v for k, v in asdict(self).items() if k in kept}


def parse_task(name: str, entry: Mapping[str, Any], data_dir: Path, where: Path) -> GenerativeTask:
    """Check one ``tasks.yaml`` entry and build its :class:`GenerativeTask`; errors name the file, task and key."""
    check_task_keys(entry, where, name, REQUIRED_KEYS, (*SCORING_KEYS, *DOC_KEYS))
    at = f"{where}: task '{name}'"
    metric = entry["metric"]
    if metric not in METRICS:
        raise ValueError(f"{at}: metric must be one of {METRICS}, got {metric!r}")
    for key in ("prompt", "answer_field"):
        if not isinstance(entry[key], str) or not entry[key]:
            raise ValueError(f"{at}: {key} must be a non-empty string, got {entry[key]!r}")
    choices = entry.get("choices")
    if metric == "choice":
        if not isinstance(choices, list) or len(choices) < 2 or len(set(map(str, choices))) != len(choices):
            raise ValueError(f"{at}: metric 'choice' needs choices, a list of >= 2 distinct answers, got {choices!r}")
        choices = [str(c) for c in choices]
    elif choices is not None:
        raise ValueError(f"{at}: choices only apply to metric 'choice' (metric is {metric!r})")
    stop = entry.get("stop", ["\n"])
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"{at}: stop must be a list of non-empty strings, got {stop!r}")
    max_new = entry.get("max_new_tokens", 16)
    if not isinstance(max_new, int) or isinstance(max_new, bool) or max_new < 1:
        raise ValueError(f"{at}: max_new_tokens must be an integer >= 1, got {max_new!r}")
    chat = entry.get("chat", False)
    if not isinstance(chat, bool):
        raise ValueError(f"{at}: chat must be true or false, got {chat!r}")
    try:
        fields = template_fields(entry["prompt"])
    except ValueError as e:
        raise ValueError(f"{at}: prompt is not a valid template ({e}): {entry['prompt']!r}") from e
    if not fields or any(not f.isidentifier() for f in fields):
        raise ValueError(f"{at}: prompt must use column names in braces, e.g. '{{text}}', got {entry['prompt']!r}")
    files = split_files(data_dir, name, where)
    return GenerativeTask(
        name=name,
        prompt=entry["prompt"],
        answer_field=entry["answer_field"],
        metric=metric,
        chat=chat,
        answer_prefix=str(entry.get("answer_prefix", "")),
        choices=choices,
        stop=list(stop),
        max_new_tokens=max_new,
        description=str(entry.get("description", "")),
        files=files,
    )


class GenerativeSuite(SuiteOptions):
    """Generative tasks scored by exact match of greedy generation or log-likelihood accuracy over choices.

    Args:
        name: suite name (for reports).
        data_dir: directory with ``tasks.yaml`` and one sub-directory per task.
        tasks: the task names to use, in report order.
        batch_size: evaluation batch size (prompts per batch).
        max_length: prompt tokens kept (longer prompts lose their beginning; the answer comes at the end).
        max_eval_examples: evaluate on the first N examples of a seeded shuffle of each split (None = all).
        tune_split / report_split: the split used to choose coefficients, and the one reported.
        seed: seed of the evaluation subset.
    """

    def __init__(
        self,
        name: str,
        data_dir: str,
        tasks: Sequence[str],
        batch_size: int = 16,
        max_length: int = 256,
        max_eval_examples: int | None = None,
        tune_split: str = "validation",
        report_split: str = "test",
        seed: int = 0,
    ) -> None:
        super().__init__(
            name, data_dir, tasks, batch_size, max_length, max_eval_examples, tune_split, report_split, seed, 8
        )
        self.tasks = self._read_tasks()

    def _read_tasks(self) -> dict[str, GenerativeTask]:
        entries = read_tasks_yaml(self.data_dir, self.name, self.task_names)
        return {t: parse_task(t, entry, self.data_dir, self.index) for t, entry in entries.items()}

    # ------------------------------------------------------------------------------------------- data

    def dataset(self, task: str, split: str, max_examples: int | None = None) -> datasets.Dataset:
        """One split of one task, checked against its ``tasks.yaml`` entry (columns, answers, choices)."""
        info = self.tasks[task]
        path = info.files[split]
        ds = load_split(path, split)
        needed = [*info.fields, info.answer_field]
        missing = [c for c in needed if c not in ds.column_names]
        if missing:
            raise ValueError(
                f"task '{task}': {path} has no column(s) {missing} used by prompt/answer_field in {self.index}; "
                f"columns: {ds.column_names}"
            )
        for i, answer in enumerate(ds[info.answer_field]):
            if not isinstance(answer, str) or not answer.strip():
                raise ValueError(f"task '{task}': {path} row {i}: answer {answer!r} is not a non-empty string")
            if info.choices is not None and answer not in info.choices:
                raise ValueError(
                    f"task '{task}': {path} row {i}: answer {answer!r} is not one of the choices {info.choices} "
                    f"({self.index})"
                )
        return subsample(ds, max_examples, self.seed)

    def eval_dataset(self, task: str, split: str) -> datasets.Dataset:
        """The (possibly subsampled) split every model is scored on."""
        return self.dataset(task, split, self.max_eval_examples)

    def prompt_ids(self, task: str, example: Mapping[str, Any], tokenizer: Any) -> list[int]:
        """The prompt's token ids (the last ``max_length`` of them)."""
        info = self.tasks[task]
        text = info.prompt.format(**{f: example[f] for f in info.fields})
        if info.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"task '{task}' has chat: true ({self.index}) but the tokenizer has no chat template")
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
        # A chat template writes its own special tokens; a plain prompt gets the tokenizer's (e.g. BOS).
        ids = tokenizer(text, add_special_tokens=not info.chat)["input_ids"]
        return ids[-self.max_length :]

    def target_ids(self, task: str, answer: str, tokenizer: Any) -> list[int]:
        """What the model should produce after the prompt: prefix + answer, then end-of-sequence."""
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos token: answers could not be terminated")
        text = self.tasks[task].answer_prefix + answer
        return [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]

    def train_loader(
        self, task: str, tokenizer: Any, batch_size: int, max_examples: int | None, seed: int
    ) -> DataLoader:
        """Shuffled fine-tuning batches: prompt + target, the loss on the target tokens only."""
        info = self.tasks[task]
        rows = []
        for ex in self.dataset(task, "train", max_examples):
            prompt, target = (
                self.prompt_ids(task, ex, tokenizer),
                self.target_ids(task, ex[info.answer_field], tokenizer),
            )
            rows.append({"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target})
        return DataLoader(
            rows,  # type: ignore[arg-type]
            batch_size=batch_size,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            collate_fn=lambda b: pad_sequences(b, pad_id(tokenizer), left=False),
        )

    def eval_loader(self, task: str, split: str, tokenizer: Any) -> DataLoader:
        """Evaluation batches, length-sorted (less padding), left-padded so every answer starts at the end.

        ``exact_match`` batches hold the prompts and the reference ``answers``; ``choice`` batches hold the prompts,
        the choices' tokens once (:func:`collate_choices`) and the answer's index in ``labels``.
        """
        info = self.tasks[task]
        examples = [
            (self.prompt_ids(task, ex, tokenizer), ex[info.answer_field]) for ex in self.eval_dataset(task, split)
        ]
        examples.sort(key=lambda e: len(e[0]))
        pad = pad_id(tokenizer)
        if info.choices is None:
            rows = [{"input_ids": p, "answer": a} for p, a in examples]
            return DataLoader(rows, batch_size=self.batch_size, collate_fn=lambda b: collate_prompts(b, pad))  # type: ignore[arg-type]
        targets = [self.target_ids(task, c, tokenizer) for c in info.choices]
        rows = [{"prompt": p, "label": info.choices.index(a)} for p, a in examples]
        return DataLoader(rows, batch_size=self.batch_size, collate_fn=lambda b: collate_choices(b, targets, pad))  # type: ignore[arg-type]

    @cached_property
    def fingerprint(self) -> str:
        """Identifies everything the scores depend on (task specs, data files, subset, truncation)."""
        h = hashlib.sha256()
        for t in self.task_names:
            h.update(json.dumps(self.tasks[t].spec(), sort_keys=True).encode())
            for s in SPLITS:
                h.update(f"{t}/{s}:{file_digest(self.tasks[t].files[s])}".encode())
        h.update(f"{self.max_eval_examples}|{self.max_length}|{self.seed}".encode())
        return h.hexdigest()[:16]


def pad_id(tokenizer: Any) -> int:
    """The padding id (padded positions are masked out; end-of-sequence when the tokenizer has no pad token)."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pid if pid is not None else 0)


def pad_sequences(rows: Sequence[Mapping[str, list[int]]], pad: int, left: bool) -> dict[str, torch.Tensor]:
    """Pad ``input_ids`` (and ``labels`` with -100) to the longest row; attention mask and position ids."""
    width = max(len(r["input_ids"]) for r in rows)
    out: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "position_ids": []}
    if "labels" in rows[0]:
        out["labels"] = []
    for r in rows:
        n = len(r["input_ids"])
        fill = width - n

        def padded(seq: list[int], value: int, fill: int = fill) -> list[int]:
            return [value] * fill + seq if left else seq + [value] * fill

        out["input_ids"].append(padded(list(r["input_ids"]), pad))
        out["attention_mask"].append(padded([1] * n, 0))
        # Positions count real tokens only, so left padding does not shift them.
        out["position_ids"].append(padded(list(range(n)), 0))
        if "labels" in out:
            out["labels"].append(padded(list(r["labels"]), IGNORE_INDEX))
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def collate_prompts(rows: Sequence[Mapping[str, Any]], pad: int) -> dict[str, Any]:
    """Left-padded prompts for generation, with their reference answers."""
    batch: dict[str, Any] = pad_sequences(rows, pad, left=True)
    batch["answers"] = [r["answer"] for r in rows]
    return batch


def collate_choices(rows: Sequence[Mapping[str, Any]], targets: Sequence[list[int]], pad: int) -> dict[str, Any]:
    """The examples' prompts once (left-padded) and the task's choice targets once (right-padded, ``targets`` with
    ``target_len``), with each answer's index in ``labels``: the prompt is scored once and its key/value cache shared
    by every choice (:meth:`mergelab.causal_lm.model.GenerativeEvaluator.target_logprobs`)."""
    batch: dict[str, Any] = pad_sequences([{"input_ids": r["prompt"]} for r in rows], pad, left=True)
    width = max(len(t) for t in targets)
    batch["targets"] = torch.tensor([list(t) + [pad] * (width - len(t)) for t in targets], dtype=torch.long)
    batch["target_len"] = torch.tensor([len(t) for t in targets], dtype=torch.long)
    batch["labels"] = torch.tensor([r["label"] for r in rows], dtype=torch.long)
    return batch
