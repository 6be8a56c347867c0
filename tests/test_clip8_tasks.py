"""The shipped 8-task CLIP suite (data/clip8/tasks.yaml), checked offline: nothing is downloaded, no model is loaded.

The facts below (class counts, each dataset's split names, label-order anchors) are those of the hub datasets that
tasks.yaml names, as their cards and viewers show them; the YAML is read through the suite's own parser.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import yaml

from mergelab.causal_lm.suite import template_fields
from mergelab.vision.suite import ImageTask, ZeroShotImageSuite

ROOT = Path(__file__).resolve().parents[1]
SUITE_DIR = ROOT / "data" / "clip8"
CONF = ROOT / "conf" / "eval" / "clip8.yaml"

# task -> (dataset, number of classes)
CLASSES = {
    "sun397": ("tanganke/sun397", 397),
    "stanford_cars": ("tanganke/stanford_cars", 196),
    "resisc45": ("tanganke/resisc45", 45),
    "eurosat": ("tanganke/eurosat", 10),
    "svhn": ("ufldl-stanford/svhn", 10),
    "gtsrb": ("tanganke/gtsrb", 43),
    "mnist": ("ylecun/mnist", 10),
    "dtd": ("tanganke/dtd", 47),
}

# The labelled splits each dataset has besides its corrupted copies of test (contrast, gaussian_noise, ...).
SPLITS = {
    "tanganke/sun397": {"train", "test"},
    "tanganke/stanford_cars": {"train", "test"},
    "tanganke/resisc45": {"train", "test"},
    "tanganke/eurosat": {"train", "test"},
    "ufldl-stanford/svhn": {"train", "test", "extra"},  # config cropped_digits
    "tanganke/gtsrb": {"train", "test"},
    "ylecun/mnist": {"train", "test"},
    "tanganke/dtd": {"train", "test"},
}

# Label id -> class name, where the dataset's label order is known (its ClassLabel / viewer). CLIP's own EuroSAT list
# is in another order (it starts with "forest"): the heads must follow the dataset's.
ANCHORS = {
    "sun397": {0: "abbey", 1: "airplane cabin", 396: "youth hostel"},
    "stanford_cars": {0: "AM General Hummer SUV 2000", 1: "Acura RL Sedan 2012", 195: "smart fortwo Convertible 2012"},
    "resisc45": {0: "airplane", 44: "wetland"},
    "eurosat": {0: "annual crop land", 1: "forest", 2: "brushland or shrubland", 9: "lake or sea"},
    "gtsrb": {0: "red and white circle 20 kph speed limit", 1: "red and white circle 30 kph speed limit", 14: "stop"},
    "dtd": {0: "banded", 1: "blotchy", 2: "braided", 46: "zigzagged"},
}

NOMINAL = 1000  # split length used to resolve slices; only their shape is checked


@pytest.fixture(scope="module")
def suite() -> ZeroShotImageSuite:
    return ZeroShotImageSuite("clip8", str(SUITE_DIR), list(CLASSES))


def resolve(info: ImageTask, split: str) -> list[tuple[str, int, int]]:
    """``(split name, from, to)`` of each piece of a suite split's expression, as ``datasets`` reads it."""
    known = SPLITS[info.dataset]
    absolute = datasets.ReadInstruction.from_spec(info.splits[split]).to_absolute(dict.fromkeys(known, NOMINAL))
    return [(a.splitname, a.from_, a.to) for a in absolute]


def test_conf_and_yaml_list_the_same_tasks_in_order() -> None:
    conf = yaml.safe_load(CONF.read_text())
    doc = yaml.safe_load((SUITE_DIR / "tasks.yaml").read_text())
    assert conf["tasks"] == list(doc["tasks"]) == list(CLASSES)
    assert (conf["tune_split"], conf["report_split"]) == ("validation", "test")


def test_every_task_parses_with_its_dataset_and_columns(suite: ZeroShotImageSuite) -> None:
    assert list(suite.tasks) == list(CLASSES)
    for task, info in suite.tasks.items():
        assert info.dataset == CLASSES[task][0], task
        assert not info.local, task
        assert (info.image_column, info.label_column) == ("image", "label"), task
    assert suite.tasks["svhn"].config == "cropped_digits"
    assert suite.tasks["mnist"].config == "mnist"


@pytest.mark.parametrize("task", list(CLASSES))
def test_class_names_are_the_datasets_classes(suite: ZeroShotImageSuite, task: str) -> None:
    names = suite.tasks[task].classnames
    assert names is not None, f"{task}: classnames must be pinned, not taken from the hub's ClassLabel"
    assert len(names) == CLASSES[task][1]
    assert all(isinstance(n, str) and n and n == n.strip() and "  " not in n for n in names), names
    assert len(set(names)) == len(names), [n for n in names if names.count(n) > 1]
    assert len({n.lower() for n in names}) == len(names), "names differing only in case"


@pytest.mark.parametrize("task", ["svhn", "mnist"])
def test_digit_names(suite: ZeroShotImageSuite, task: str) -> None:
    assert suite.tasks[task].classnames == [str(d) for d in range(10)]


@pytest.mark.parametrize("task", list(ANCHORS))
def test_class_names_follow_the_label_order(suite: ZeroShotImageSuite, task: str) -> None:
    names = suite.tasks[task].classnames
    assert names is not None
    assert {i: names[i] for i in ANCHORS[task]} == ANCHORS[task]


@pytest.mark.parametrize("task", list(CLASSES))
def test_templates_fill_in_the_class_name_once(suite: ZeroShotImageSuite, task: str) -> None:
    templates = suite.tasks[task].templates
    assert templates and len(set(templates)) == len(templates)
    for t in templates:
        assert t.count("{classname}") == 1 and template_fields(t) == ["classname"], t
        assert t == t.strip() and t.format(classname="X") != t
    names = suite.tasks[task].classnames or []
    prompts = {t.format(classname=n) for t in templates for n in names}
    assert len(prompts) == len(templates) * len(names)


@pytest.mark.parametrize("task", list(CLASSES))
def test_train_and_test_are_the_whole_splits(suite: ZeroShotImageSuite, task: str) -> None:
    info = suite.tasks[task]
    assert set(info.splits) == {"train", "validation", "test"}
    assert resolve(info, "train") == [("train", 0, NOMINAL)]
    assert resolve(info, "test") == [("test", 0, NOMINAL)]


@pytest.mark.parametrize("task", list(CLASSES))
def test_validation_is_held_out_from_the_experts_where_the_dataset_allows(suite: ZeroShotImageSuite, task: str) -> None:
    info = suite.tasks[task]
    pieces = resolve(info, "validation")
    assert pieces and all(end > start for _, start, end in pieces)
    assert all(name != "test" for name, _, _ in pieces), "validation must not come from the reported split"
    held_out = SPLITS[info.dataset] - {"train", "test"}
    if held_out:  # the experts were fine-tuned on train: tune on a split they never saw
        assert {name for name, _, _ in pieces} <= held_out, info.splits
    else:  # only train and test: a strict slice of train, the fallback
        assert {name for name, _, _ in pieces} == {"train"}
        assert sum(end - start for _, start, end in pieces) < NOMINAL


def test_every_task_names_its_sources() -> None:
    doc = yaml.safe_load((SUITE_DIR / "tasks.yaml").read_text())
    for task, entry in doc["tasks"].items():
        source = entry.get("source", "")
        assert "fusion_bench/tasks/clip_classification/" in source, task
        if task != "svhn":  # CLIP's prompts.md has no SVHN entry
            assert "openai/CLIP data/prompts.md" in source, task


def test_a_sliced_split_is_drawn_from_a_seeded_permutation(tmp_path: Path) -> None:
    # A train split stored sorted by label (as the tanganke/* ones are): the last 10% of a seeded permutation holds
    # many classes, the plain last 10% one; the complementary slices partition the split; the draw is fixed.
    from mergelab.vision.suite import load_shuffled_slices

    datasets.Dataset.from_dict({"label": [i // 10 for i in range(100)], "i": list(range(100))}).to_parquet(
        str(tmp_path / "train.parquet")
    )
    plain = datasets.load_dataset(str(tmp_path), split="train[-10%:]")
    assert set(plain["label"]) == {9}
    val = load_shuffled_slices(str(tmp_path), None, "train[-10%:]", None)
    rest = load_shuffled_slices(str(tmp_path), None, "train[:90%]", None)
    assert len(val) == 10 and len(set(val["label"])) >= 5
    assert sorted(list(val["i"]) + list(rest["i"])) == list(range(100))
    assert list(load_shuffled_slices(str(tmp_path), None, "train[-10%:]", None)["i"]) == list(val["i"])
    both = load_shuffled_slices(str(tmp_path), None, "train[:10%]+train[-10%:]", None)
    assert len(both) == 20
    assert len(load_shuffled_slices(str(tmp_path), None, "train", None)) == 100
