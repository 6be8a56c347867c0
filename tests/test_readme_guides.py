"""The guides of docs/extending.md, run as written: "Adding a method", "Adding a task or a suite" and "Outside the
repository".

Their code blocks that are files (named by the path comment on their first line, after any ``# @package`` header)
are written into a copy of the checkout under tmp_path (the real src/ and conf/ are never written), their shell steps
run there, and their ``mergelab`` commands run from there with the copy's src/ first on PYTHONPATH, so that the
installed console script imports the copy (``mergelab.locations`` then finds the copy's conf/ and data/), with
conftest's tiny overrides. The outside guide's files go to temp dirs standing for its ``/my/...`` placeholders, and
its commands run from a directory outside any checkout, on the real tree.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from tests.conftest import TINY, run_states

ROOT = Path(__file__).resolve().parents[1]
GUIDES = (ROOT / "docs" / "extending.md").read_text()
METHOD_GUIDE, TASK_GUIDE, OUTSIDE_GUIDE = "Adding a method", "Adding a task or a suite", "Outside the repository"
SUITE, GENERATIVE_SUITE = "/path/to/suite", "/path/to/generative_suite"  # the guides' placeholders
MY_CODE, MY_CONFS, MY_SUITE = "/my/code", "/my/confs", "/my/suite"  # the outside guide's placeholders
# A top-level fenced block: its language and body.
BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)


def section(title: str) -> str:
    """docs/extending.md's text under ``## <title>``, up to the next heading of that level."""
    start = GUIDES.index(f"\n## {title}\n")
    end = GUIDES.find("\n## ", start + 1)
    return GUIDES[start : end if end != -1 else len(GUIDES)]


def blocks(text: str, language: str) -> list[str]:
    """The bodies of ``text``'s fenced code blocks in ``language``."""
    return [body for lang, body in BLOCK.findall(text) if lang == language]


def guide_files(text: str) -> dict[str, str]:
    """The code blocks of ``text`` that are files: the path their first line's comment names -> the block."""
    files = {}
    for body in [*blocks(text, "python"), *blocks(text, "yaml")]:
        # Hydra reads a `# @package` header only on the first lines, so the path comment may come after it.
        first = next(line for line in body.splitlines() if not line.startswith("# @"))
        if first.startswith("# "):
            files[first[2:].split()[0]] = body
    return files


def mergelab_commands(text: str) -> list[list[str]]:
    """The ``mergelab`` command lines of ``text``'s bash blocks, as argument lists."""
    lines = [line for body in blocks(text, "bash") for line in body.splitlines()]
    return [shlex.split(line, comments=True) for line in lines if line.startswith("mergelab ")]


def run_in(checkout: Path, args: Sequence[str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    """``args`` (a command line: ``mergelab ...`` or ``python ...``) run in ``checkout`` on its own src/."""
    exe = sys.executable if args[0] == "python" else str(Path(sys.executable).with_name(args[0]))
    path = [str(checkout / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path)}
    return subprocess.run(
        [exe, *args[1:]], cwd=checkout, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def write_files(root: Path, files: dict[str, str], replace: dict[str, str] | None = None) -> None:
    """Write ``files`` (path relative to ``root`` -> text) with each placeholder of ``replace`` substituted."""
    for rel, text in files.items():
        for old, new in (replace or {}).items():
            text = text.replace(old, new)
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def add_task_entry(suite_dir: Path, entry_block: str) -> None:
    """Add the guide's ``tasks.yaml`` entry under the suite's ``tasks:`` (the edit the guide asks for)."""
    doc = yaml.safe_load((suite_dir / "tasks.yaml").read_text())
    doc["tasks"].update(yaml.safe_load(entry_block))
    (suite_dir / "tasks.yaml").write_text(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the checkout's code, configs, tests and the data the guides use."""
    root = tmp_path_factory.mktemp("checkout")
    skip = shutil.ignore_patterns("__pycache__", ".pytest_cache")
    for part in ("src", "conf", "tests", "data/embedded", "data/generative"):
        shutil.copytree(ROOT / part, root / part, ignore=skip)
    shutil.copy2(ROOT / "pyproject.toml", root / "pyproject.toml")
    return root


@pytest.fixture(scope="module")
def method_guide(checkout: Path) -> list[list[str]]:
    """The method guide's module and YAML written into the copy; returns its ``mergelab`` commands."""
    text = section(METHOD_GUIDE)
    files = guide_files(text)
    assert sorted(files) == ["conf/method/median.yaml", "src/mergelab/methods/median.py"]
    assert not (ROOT / "src/mergelab/methods/median.py").exists()  # so the runs below can only import the copy's
    write_files(checkout, files)
    return mergelab_commands(text)


@pytest.fixture(scope="module")
def median_run(checkout: Path, method_guide: list[list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The guide's first command, ``mergelab method=median``, with the tiny overrides and the merged model saved."""
    assert method_guide[0] == ["mergelab", "method=median"]
    out = tmp_path_factory.mktemp("median_run")
    proc = run_in(checkout, [*method_guide[0], *TINY, "save_merged=true", f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def lower_median(stacked: np.ndarray) -> np.ndarray:
    """The guide's median along axis 0: the middle value, the lower one of the two for an even count."""
    return np.sort(stacked, axis=0)[(stacked.shape[0] - 1) // 2]


def test_method_guide_runs_and_merges_the_median(median_run: Path) -> None:
    metrics = json.loads((median_run / "metrics.json").read_text())
    assert metrics["method"] == "median" and list(metrics["rows"]) == ["pretrained", "experts", "median"]
    assert set(metrics["scores"]) == {"tweet_sentiment", "food_review"}
    assert all(0.0 <= s["acc"] <= 1.0 for s in metrics["scores"].values())
    # The saved merge is theta_0 + scaling * median(tau_t), computed here from the run's own inputs.
    scaling = metrics["params"]["scaling"]
    config = yaml.safe_load((median_run / "config.yaml").read_text())
    pretrained, experts, merged = run_states(
        config["model"]["pretrained"], metrics["experts"].values(), median_run / "merged_model"
    )
    for k, v in pretrained.items():
        if not v.is_floating_point():
            continue
        taus = np.stack([(e[k] - v).numpy() for e in experts])
        expected = v + scaling * torch.from_numpy(lower_median(taus))
        torch.testing.assert_close(merged[k], expected, atol=1e-6, rtol=1e-5)


def test_method_guide_compositions_and_conformance(checkout: Path, method_guide: list[list[str]]) -> None:
    # The DARE and AWD command lines compose the median as their inner method (--cfg job: composed, not run).
    for command in method_guide[1:]:
        proc = run_in(checkout, [*command, "--cfg", "job", "--package", "method"])
        assert proc.returncode == 0, proc.stderr[-3000:]
        method = yaml.safe_load(proc.stdout)  # the `method` node (--package method)
        assert method["name"] == command[1].split("=")[1] != "median"
        assert method["merge"]["_target_"] == "mergelab.methods.median.Median"
    # The conformance matrix finds the new YAML and passes (in memory = streamed, chunking, threads, inside DARE/AWD,
    # bad options refused), and so does its declaration: the guide's `pytest tests/test_conformance.py
    # tests/test_method_declarations.py -k median`, run in the copy.
    tests = ["tests/test_conformance.py", "tests/test_method_declarations.py"]
    proc = run_in(checkout, ["python", "-m", "pytest", *tests, "-k", "median", "-v", "-p", "no:cacheprovider"])
    assert proc.returncode == 0, proc.stdout[-3000:]
    passed = set(re.findall(r"::(\w+)\[median\] PASSED", proc.stdout))
    assert passed >= {
        "test_streamed_equals_in_memory",
        "test_chunk_size_does_not_change_the_bytes",
        "test_threaded_equals_sequential",
        "test_composes_inside_dare_and_awd",
        "test_bad_options_are_refused_naming_the_option",
        "test_each_yaml_round_trips_through_mergekit_or_says_why_not",
        "test_every_yaml_option_is_a_documented_constructor_option",
    }, proc.stdout[-3000:]


def write_reviews(task_dir: Path) -> None:
    """A small binary task's parquet splits (what a user brings): templated positive / negative product reviews."""
    rng = np.random.default_rng(0)
    things = ["coffee", "blender", "novel", "hotel", "film", "phone", "jacket", "pizza", "album", "game"]
    templates = [
        ["I hated this {}", "What an awful {}", "This {} is terrible", "Poor {}, never again", "Worst {} ever"],
        ["I loved this {}", "What a wonderful {}", "This {} is excellent", "Great {}, would buy again", "Best {} ever"],
    ]
    for split, n in (("train", 64), ("validation", 32), ("test", 32)):
        labels = [i % 2 for i in range(n)]
        texts = [str(rng.choice(templates[y])).format(rng.choice(things)) for y in labels]
        datasets.Dataset.from_dict({"text": texts, "label": labels}).to_parquet(str(task_dir / f"{split}.parquet"))


def test_task_guide_runs_and_scores_the_new_task(
    checkout: Path, median_run: Path, cache_dir: Path, tmp_path: Path
) -> None:
    text = section(TASK_GUIDE)
    files = guide_files(text)
    suite = tmp_path / "suite"
    setup = blocks(text, "bash")[0]
    assert "cp -r data/embedded" in setup
    proc = subprocess.run(
        ["bash", "-ec", setup.replace(SUITE, str(suite))], cwd=checkout, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    write_reviews(suite / "my_task")
    add_task_entry(suite, files.pop(f"{SUITE}/tasks.yaml"))
    write_files(checkout, {"conf/eval/my_suite.yaml": files["conf/eval/my_suite.yaml"]}, {SUITE: str(suite)})

    command = mergelab_commands(text)[0]
    assert command == ["mergelab", "eval=my_suite"]
    experts_before = {p.name for p in (cache_dir / "experts").iterdir()}
    tiny = [o for o in TINY if not o.startswith("eval.tasks=")]  # the suite's own tasks
    out = tmp_path / "run"
    proc = run_in(checkout, [*command, *tiny, f"hydra.run.dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["suite"] == "my_suite" and metrics["tasks"] == ["my_task", "tweet_sentiment"]
    for name, row in metrics["rows"].items():
        assert set(row["scores"]) == {"my_task", "tweet_sentiment"}, name
    assert metrics["rows"]["experts"]["scores"]["my_task"]["acc"] >= 0.75  # its expert learned the new task
    # Only the new task's expert was fine-tuned: the copied task's cached expert (median_run's) was reused.
    built = {p.name for p in (cache_dir / "experts").iterdir()} - experts_before
    assert [n.split("-")[0] for n in built] == ["my_task"]


def test_generative_suite_config_composes_and_reads_the_new_task(checkout: Path, tmp_path: Path) -> None:
    # Not run with SmolLM2 (minutes on CPU): the config composes with model=smollm2 and the suite reads my_task.
    text = section(TASK_GUIDE)
    suite = tmp_path / "generative_suite"
    shutil.copytree(checkout / "data/generative", suite)  # "a copy of data/generative with my_task added"
    shutil.copytree(suite / "tweet_mentions", suite / "my_task")
    doc = yaml.safe_load((suite / "tasks.yaml").read_text())
    add_task_entry(suite, yaml.safe_dump({"my_task": doc["tasks"]["tweet_mentions"]}))
    yaml_file = "conf/eval/my_generative.yaml"
    write_files(checkout, {yaml_file: guide_files(text)[yaml_file]}, {GENERATIVE_SUITE: str(suite)})
    command = mergelab_commands(text)[1]
    assert command == ["mergelab", "model=smollm2", "eval=my_generative"]
    with initialize_config_dir(version_base="1.3", config_dir=str(checkout / "conf")):
        cfg = compose("config", overrides=command[1:])
    built = instantiate(cfg.eval, _convert_="all")
    assert built.name == "my_generative" and built.task_names == ["my_task", "sentiment_words"]
    assert len(built.dataset("my_task", "test")) > 0  # read and checked against its tasks.yaml entry


@pytest.fixture(scope="module")
def outside(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The outside guide's files written to temp dirs standing for its placeholders; placeholder -> real path.

    ``/my/suite`` stands for the checkout's embedded suite (read only); ``/my/code`` gets the module and the empty
    ``__init__.py`` the guide asks for next to it.
    """
    base = tmp_path_factory.mktemp("outside")
    real = {MY_CODE: str(base / "code"), MY_CONFS: str(base / "confs"), MY_SUITE: str(ROOT / "data" / "embedded")}
    files = guide_files(section(OUTSIDE_GUIDE))
    assert sorted(files) == [
        "/my/code/my_methods/median.py",
        "/my/confs/eval/my_suite.yaml",
        "/my/confs/experiment/my_table.yaml",
        "/my/confs/method/my_median.yaml",
        "/my/confs/model/my_experts.yaml",
    ]
    for path, body in files.items():
        target = Path(path.replace(MY_CODE, real[MY_CODE]).replace(MY_CONFS, real[MY_CONFS]))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(body.replace(MY_SUITE, real[MY_SUITE]))
    (base / "code" / "my_methods" / "__init__.py").write_text("")
    return real


def outside_commands() -> list[list[str]]:
    """The outside guide's ``mergelab`` commands; its bash block must export the module's dir first."""
    text = section(OUTSIDE_GUIDE)
    assert f"export PYTHONPATH={MY_CODE}" in blocks(text, "bash")[0]
    return mergelab_commands(text)


def run_outside(args: Sequence[str], real: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """A guide command run from ``cwd`` (outside any checkout) on the real tree, the guide's module dir on
    PYTHONPATH, placeholders replaced."""
    for placeholder, path in real.items():
        args = [a.replace(f"file://{placeholder}", f"file://{path}").replace(placeholder, path) for a in args]
    exe = str(Path(sys.executable).with_name("mergelab"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([real[MY_CODE], *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([exe, *args[1:]], cwd=cwd, env=env, capture_output=True, text=True, timeout=900, check=False)


def test_outside_guide_runs_a_method_and_a_suite_from_a_searchpath(outside: dict[str, str], tmp_path: Path) -> None:
    command = outside_commands()[0]
    assert command == ["mergelab", "hydra.searchpath=[file:///my/confs]", "method=my_median", "eval=my_suite"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    tiny = [o for o in TINY if not o.startswith("eval.tasks=")]  # the suite's own tasks
    out = tmp_path / "run"
    proc = run_outside([*command, *tiny, f"hydra.run.dir={out}"], outside, elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "my_median" and list(metrics["rows"]) == ["pretrained", "experts", "my_median"]
    assert metrics["suite"] == "my_suite" and metrics["tasks"] == ["tweet_sentiment", "food_review"]
    # The guide's warning: the short form names only mergelab's own conf/method.
    short = ["mergelab", command[1], "method=dare", "method.merge=my_median", *TINY, f"hydra.run.dir={tmp_path / 'r2'}"]
    proc = run_outside(short, outside, elsewhere)
    assert proc.returncode == 1 and "no method config 'my_median'" in proc.stderr, proc.stderr[-3000:]


def composed(args: Sequence[str], real: dict[str, str], cwd: Path, package: str) -> dict:
    """The ``package`` node of the config ``args`` compose (``--cfg job``: nothing runs)."""
    proc = run_outside([*args, "--cfg", "job", "--package", package], real, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return yaml.safe_load(proc.stdout)


def test_outside_guide_inner_method_preset_pool_and_sweep_compose(outside: dict[str, str], tmp_path: Path) -> None:
    inner, table, pool, sweep = outside_commands()[1:]
    method = composed(inner, outside, tmp_path, "method")
    assert method["name"] == "dare" and method["merge"]["_target_"] == "my_methods.median.Median"
    root = composed(table, outside, tmp_path, "_global_")
    assert root["tune"] is True and root["eval"]["name"] == "my_suite"
    assert sorted(root["table"]["methods"]) == ["my_median", "task_arithmetic"]
    model = composed(pool, outside, tmp_path, "model")
    assert model["_target_"] == "mergelab.text.pool.ClassifierPool"  # from mergelab's local_experts, extended
    assert model["pretrained"] == "/ckpt/roberta-base" and sorted(model["experts"]) == ["cola", "sst2"]
    # The sweep's first job (Hydra refuses --cfg with -m): the same overrides with the first swept value.
    assert sweep[:2] == ["mergelab", "-m"] and sweep[-1] == "method.scaling=0.5,1.0"
    job = composed(["mergelab", *sweep[2:-1], "method.scaling=0.5"], outside, tmp_path, "method")
    assert job["name"] == "my_median" and job["scaling"] == 0.5
