"""The one ``tasks.yaml`` reader: every suite family refuses a bad file or entry, naming the file, task and key."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergelab.causal_lm.suite import GenerativeSuite
from mergelab.suites.base import check_task_keys, read_tasks_yaml
from mergelab.text.suite import TextClassificationSuite
from mergelab.vision.suite import ZeroShotImageSuite

DATA = Path(__file__).parents[1] / "data"

# family -> (suite class, a valid entry, a required key, a family-specific bad value and the message it gives)
FAMILIES: dict[str, tuple[Callable[..., Any], dict[str, Any], str, dict[str, Any], str]] = {
    "text": (
        TextClassificationSuite,
        {"labels": ["neg", "pos"], "description": "d", "source": "s", "license": "MIT", "num_labels": 2},
        "labels",
        {"labels": [False, True]},
        r"labels must be a non-empty list of distinct, non-empty strings",
    ),
    "generative": (
        GenerativeSuite,
        {"prompt": "Q: {text}", "answer_field": "answer", "metric": "exact_match", "license": "MIT"},
        "metric",
        {"metric": "bleu"},
        r"metric must be one of \('exact_match', 'choice'\), got 'bleu'",
    ),
    "image": (
        ZeroShotImageSuite,
        {"dataset": "someone/digits", "templates": ["a photo of {classname}."], "description": "d"},
        "templates",
        {"templates": ["a photo of {name}."]},
        r"each template must use '\{classname\}' once",
    ),
}


def write(root: Path, doc: Any, raw: str | None = None) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "tasks.yaml").write_text(raw if raw is not None else yaml.safe_dump(doc))
    return root


def build(family: str, root: Path, tasks: list[str]) -> Any:
    return FAMILIES[family][0]("s", str(root), tasks)


def names(match: str, *parts: str) -> str:
    """A pattern requiring ``parts`` (escaped) in this order, then ``match``."""
    return ".*".join([*(re.escape(p) for p in parts), match])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_file_errors_name_the_file(tmp_path: Path, family: str) -> None:
    root = tmp_path / "s"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=names("is not a file", str(root / "tasks.yaml"))):
        build(family, root, ["a"])
    write(root, None, raw="tasks:\n  a: [unclosed\n")
    with pytest.raises(ValueError, match=names("is not valid YAML", str(root / "tasks.yaml"))):
        build(family, root, ["a"])
    for doc in ({"task": {"a": {}}}, {"tasks": ["a"]}, ["tasks"], None):
        write(root, doc)
        with pytest.raises(ValueError, match=names("has no 'tasks:' mapping", str(root / "tasks.yaml"))):
            build(family, root, ["a"])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_task_selection(tmp_path: Path, family: str) -> None:
    root = write(tmp_path / "s", {"tasks": {"a": FAMILIES[family][1]}})
    unknown = r"unknown task\(s\) \['b'\]; " + re.escape(f"{root / 'tasks.yaml'} defines ['a']")
    with pytest.raises(ValueError, match=unknown):
        build(family, root, ["a", "b"])
    with pytest.raises(ValueError, match=r"suite 's': eval\.tasks is empty"):
        build(family, root, [])


@pytest.mark.parametrize("family", list(FAMILIES))
def test_entry_errors_name_the_file_task_and_key(tmp_path: Path, family: str) -> None:
    _, valid, required, bad, bad_match = FAMILIES[family]
    index = str(tmp_path / "s" / "tasks.yaml")
    cases = [
        ({"a": valid, "b": ["not", "a", "mapping"]}, names("must be a mapping of keys, got list", index, "task 'b'")),
        ({"a": {k: v for k, v in valid.items() if k != required}}, names(r"has no \['" + required, index, "task 'a'")),
        ({"a": {**valid, "colour": "red"}}, names(r": unknown key\(s\) \['colour'\]; known: ", index, "task 'a'")),
        ({"a": {**valid, **bad}}, names(bad_match, index, "task 'a'")),
    ]
    for tasks, match in cases:
        root = write(tmp_path / "s", {"tasks": tasks})
        with pytest.raises(ValueError, match=match):
            build(family, root, ["a"])


def test_text_suite_needs_every_split(tmp_path: Path) -> None:
    root = write(tmp_path / "s", {"tasks": {"a": FAMILIES["text"][1]}})
    with pytest.raises(FileNotFoundError, match=names(r"has no train split at .*a/train\.parquet", "tasks.yaml")):
        build("text", root, ["a"])


def test_reader_returns_entries_in_the_asked_order(tmp_path: Path) -> None:
    root = write(tmp_path / "s", {"tasks": {"a": {"x": 1}, "b": {"y": 2}}, "other": "kept out"})
    assert read_tasks_yaml(root, "s") == {"a": {"x": 1}, "b": {"y": 2}}
    assert list(read_tasks_yaml(root, "s", ["b", "a"])) == ["b", "a"]


def test_check_task_keys(tmp_path: Path) -> None:
    where = tmp_path / "tasks.yaml"
    check_task_keys({"a": 1, "doc": 2}, where, "t", ["a"], ["doc"])
    with pytest.raises(ValueError, match=names(r"has no \['a'\] \(required: \['a'\]\)", str(where), "task 't'")):
        check_task_keys({"doc": 2}, where, "t", ["a"], ["doc"])
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['z'\]; known: \['a', 'doc'\]"):
        check_task_keys({"a": 1, "z": 0}, where, "t", ["a"], ["doc"])


@pytest.mark.parametrize(("family", "suite"), [("text", "embedded"), ("generative", "generative"), ("image", "clip8")])
def test_shipped_suites_pass(family: str, suite: str) -> None:
    tasks = list(read_tasks_yaml(DATA / suite, suite))
    built = build(family, DATA / suite, tasks)
    assert list(built.tasks) == tasks
