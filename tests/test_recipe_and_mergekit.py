"""Provenance of merged dirs and MergeKit interoperability: every merged dir holds ``mergelab_recipe.json``, a model
card (``README.md``) and, where MergeKit defines the same merge, ``mergekit_config.yml``, which
``mergelab mergekit=<file>`` reads back into the very same merge."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergelab.io.reader import LazyCheckpoint
from mergelab.merge_candidates import InMemoryMerge
from mergelab.methods.declaration import quote
from mergelab.provenance import identity
from mergelab.provenance.identity import PACKAGES, checkpoint_identity
from mergelab.provenance.mergekit import (
    CONFIG_FILE,
    expand_command_line,
    mergekit_overrides,
    read_mergekit,
)
from mergelab.provenance.recipe import CARD_FILE, RECIPE_FILE
from mergelab.run import run
from tests import test_run_flow
from tests.conftest import make_cfg
from tests.test_run_flow import pool_overrides

#: The tiny Llama pool (base and two experts, written by tests/test_run_flow.py's fixture for this module too).
pool_dirs = test_run_flow.pool_dirs

Pool = tuple[Path, dict[str, Path]]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``mergelab <args>`` as a user types it (the console script's module), in a fresh process."""
    cmd = [sys.executable, "-m", "mergelab.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=600)


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    ck = LazyCheckpoint(model_dir)
    try:
        return {k: ck.get(k) for k in ck}
    finally:
        ck.close()


def assert_same_tensors(a: Path, b: Path) -> None:
    """Bit-identical merged tensors (names, dtypes, values)."""
    ta, tb = tensors(a), tensors(b)
    assert sorted(ta) == sorted(tb)
    for k, v in ta.items():
        assert v.dtype == tb[k].dtype and torch.equal(v, tb[k]), k


def card_header(card: str) -> dict[str, Any]:
    """The YAML metadata block of a model card (between the first two ``---`` lines)."""
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def merged(out: Path) -> Path:
    return out / "merged_model"


# ------------------------------------------------------------------------------------- the CLI, end to end


def test_streaming_run_writes_recipe_card_and_mergekit_config_that_round_trips(pool_dirs: Pool, tmp_path: Path) -> None:
    base, experts = pool_dirs
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    method = ["method=ties", "method.prune=per_tensor", "method.k=30", "method.disjoint=mean", "method.scaling=0.7"]
    proc = cli(*pool_overrides(pool_dirs), *method, "eval=none", f"hydra.run.dir={a}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = merged(a)

    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["method"]["name"] == "ties" and recipe["method"]["target"] == "mergelab.methods.TIES"
    assert recipe["method"]["options"] == {"k": 30, "prune": "per_tensor", "disjoint": "mean", "scaling": 0.7}
    assert recipe["method"]["grid_point"] is None and recipe["scores"] is None
    assert recipe["config"]["method"]["k"] == 30 and recipe["config"]["model"]["pretrained"] == str(base)
    assert recipe["pretrained"]["path"] == str(base) and len(recipe["pretrained"]["sha256"]) == 64
    assert list(recipe["experts"]) == ["e0", "e1"]
    for name, e in recipe["experts"].items():
        assert e["given"] == e["path"] == str(experts[name]) and e["float_dtypes"] == ["float32"]
        assert sum(e["weight_files"].values()) == sum(f.stat().st_size for f in experts[name].glob("*.safetensors"))
    assert recipe["experts"]["e0"]["sha256"] != recipe["experts"]["e1"]["sha256"]
    assert set(recipe["versions"]) == set(PACKAGES) and recipe["versions"]["torch"] == torch.__version__
    assert recipe["command"].startswith("mergelab model=checkpoints ") and "method.k=30" in recipe["command"]
    assert recipe["mergekit"]["file"] == CONFIG_FILE and recipe["mergekit"]["notes"]

    card = (out / CARD_FILE).read_text()
    # A local dir is no Hub id: no base_model in the metadata (the Hub would refuse it), the text names the dir.
    assert card_header(card) == {
        "tags": ["mergelab", "merge", "ties", "arxiv:2306.01708"],
        "library_name": "transformers",
    }
    assert f"Pretrained model: `{base}`. No Hugging Face Hub id is known for it" in card
    assert recipe["command"] in card and "| prune | per_tensor |" in card and "Not scored" in card

    mk = yaml.safe_load((out / CONFIG_FILE).read_text())
    assert mk["merge_method"] == "ties" and mk["base_model"] == str(base)
    assert [m["model"] for m in mk["models"]] == [str(experts["e0"]), str(experts["e1"])]
    assert all(m["parameters"] == {"density": 0.3, "weight": 1.0} for m in mk["models"])
    assert mk["parameters"] == {"normalize": True, "lambda": 0.7}  # a disjoint mean, scaled
    assert (mk["dtype"], mk["out_dtype"]) == ("float32", "float32")

    # Read back: the same merge, bit for bit, and the same MergeKit config again.
    proc = cli(f"mergekit={out / CONFIG_FILE}", "logger=none", f"hydra.run.dir={b}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(out, merged(b))
    assert (merged(b) / CONFIG_FILE).read_text() == (out / CONFIG_FILE).read_text()
    again = json.loads((merged(b) / RECIPE_FILE).read_text())
    assert again["source"]["mergekit"] == str(out / CONFIG_FILE)
    assert again["config"]["mergekit"] == str(out / CONFIG_FILE)
    assert "mergekit=" not in again["command"] and "model.vocab=base" in again["command"]
    assert any(o.startswith("mergekit=") for o in json.loads((b / "metrics.json").read_text())["overrides"])

    # The card's command, run in a shell as printed, reproduces the merge without the MergeKit file.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(
        ["bash", "-c", f"{again['command']} hydra.run.dir='{c}'"], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_tensors(out, merged(c))


def test_a_mergekit_config_mergelab_cannot_translate_is_refused_in_one_line(pool_dirs: Pool, tmp_path: Path) -> None:
    base, experts = pool_dirs
    bad = tmp_path / "passthrough.yml"
    bad.write_text(f"merge_method: passthrough\nbase_model: {base}\nmodels:\n  - model: {experts['e0']}\n")
    proc = cli(f"mergekit={bad}", f"hydra.run.dir={tmp_path / 'out'}")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    from mergelab.methods.registry import mergekit_readers

    known = sorted(mergekit_readers())  # every method's declared MergeKit reads
    expected = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "linear", "sce", "model_stock", "slerp"}
    assert expected | {"karcher", "nearswap"} <= set(known)
    assert lines == [
        f"mergelab: error: mergekit config {bad}: merge_method: 'passthrough' has no mergelab equivalent "
        f"(mergelab imports {', '.join(known)})"
    ]
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------- MergeKit in


def write_config(tmp_path: Path, pool: Pool, body: str) -> Path:
    """A MergeKit config from ``body`` with {base}, {e0}, {e1} filled in."""
    base, experts = pool
    path = tmp_path / "merge.yml"
    path.write_text(body.format(base=base, e0=experts["e0"], e1=experts["e1"]))
    return path


TA = "merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n"


@pytest.mark.parametrize(
    ("body", "at_fault"),
    [
        (  # per-model weights: TIES's mean divides by the agreeing weights, which a negative one cancels
            TA.replace("task_arithmetic", "ties")
            + "  - model: {e0}\n    parameters: {{weight: 0.3, density: 0.5}}\n"
            + "  - model: {e1}\n    parameters: {{weight: -0.5, density: 0.5}}\n",
            "models[].parameters.weight: [0.3, -0.5] has a negative weight with normalize true",
        ),
        ("merge_method: ties\nslices: []\n", "slices: layer slices are not imported"),
        (TA + "  - model: {e0}\n    parameters: {{weight: 1}}\ntokenizer_source: union\n", "tokenizer_source: not"),
        (
            TA + "  - model: {e0}\n    parameters:\n      weight: [{{filter: mlp, value: 0.5}}, {{value: 1}}]\n",
            "models[0].parameters.weight: [{'filter': 'mlp'",
        ),
        (TA + "  - model: {e0}\n    parameters: {{weight: 1}}\nfoo: 1\n", "foo: unknown key"),
        (TA + "  - model: {e0}\n    parameters: {{weight: 1, weight: 2}}\n", "given twice"),
        (TA + "  - model: {e0}\n    parameters: {{weight: 1, density: 0.5}}\n", "models[0].parameters.density: not"),
        (
            "merge_method: ties\nbase_model: {base}\nparameters: {{rescale: true}}\nmodels:\n  - model: {e0}\n"
            "    parameters: {{weight: 1, density: 0.5}}\n",
            "parameters.rescale: true",
        ),
        (
            TA + "  - model: {e0}\n    parameters: {{weight: 1}}\ndtype: bfloat16\n",
            "dtype: 'bfloat16': mergelab computes",
        ),
        (TA + "  - model: {e0}\n    parameters: {{weight: 1}}\nout_dtype: float16\n", "out_dtype: 'float16'"),
        (TA + "  - model: {e0}+some/lora\n    parameters: {{weight: 1}}\n", "models[0].model"),
        (
            TA + "  - model: {base}\n    parameters: {{weight: 1}}\n  - model: {e0}\n    parameters: {{weight: 1}}\n",
            "models[0].parameters: unused by task_arithmetic for the base model",
        ),
        (
            "merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {e0}\n    parameters: {{weight: 1}}\n",
            "base_model: not listed under models",
        ),
        (
            "merge_method: task_arithmetic\nmodels:\n  - model: {e0}\n    parameters: {{weight: 1}}\n",
            "base_model: missing",
        ),
    ],
)
def test_refusals_name_the_file_and_the_key(pool_dirs: Pool, tmp_path: Path, body: str, at_fault: str) -> None:
    path = write_config(tmp_path, pool_dirs, body)
    with pytest.raises(ValueError) as err:
        read_mergekit(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"mergekit config {path}: ")
    assert at_fault in message, message


def test_mergekit_semantics_map_onto_mergelab_options(pool_dirs: Pool, tmp_path: Path) -> None:
    base, experts = pool_dirs
    two = (
        "  - model: {e0}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
        "  - model: {e1}\n    parameters: {{weight: 0.5, density: 0.7}}\n"
    )
    cases = {
        # normalize divides task arithmetic by the summed weights: 0.5 x 2
        "task_arithmetic": (
            TA + two.replace(", density: 0.7", "") + "parameters: {{normalize: true}}\n",
            ["method=task_arithmetic", "method.scaling=0.5"],
        ),
        # ties normalizes by default: a disjoint mean; lambda scales it
        "ties": (
            "merge_method: ties\nbase_model: {base}\nparameters: {{lambda: 0.4}}\nmodels:\n" + two,
            ["method=ties", "method.k=70.0", "method.prune=per_tensor", "method.disjoint=mean", "method.scaling=0.4"],
        ),
        # DARE rescales by 1/density by default; the base listed without parameters takes no part
        "dare_ties": (
            "merge_method: dare_ties\nbase_model: {base}\nmodels:\n  - model: {base}\n" + two,
            [
                "method=dare",
                "method.p=0.3",
                "method@method.merge=ties",
                "method.merge.k=100.0",
                "method.merge.prune=per_tensor",
                "method.merge.disjoint=sum",
                "method.merge.scaling=0.5",
            ],
        ),
        # without rescale the survivors keep their size: DARE's rescaled ones times the density
        "dare_linear": (
            "merge_method: dare_linear\nbase_model: {base}\nparameters: {{rescale: false}}\nmodels:\n" + two,
            ["method=dare", "method.p=0.3", "method@method.merge=task_arithmetic", "method.merge.scaling=0.35"],
        ),
    }
    for name, (body, want) in cases.items():
        spec = read_mergekit(write_config(tmp_path, pool_dirs, body))
        assert spec.method == want, name
        assert spec.pretrained == str(base) and spec.experts == {"e0": str(experts["e0"]), "e1": str(experts["e1"])}
    linear = (
        "merge_method: linear\nmodels:\n"
        "  - model: {e0}\n    parameters: {{weight: 2}}\n  - model: {e1}\n    parameters: {{weight: 2}}\n"
    )
    spec = read_mergekit(write_config(tmp_path, pool_dirs, linear))
    assert spec.method == ["method=weight_averaging"] and list(spec.experts.values()) == [
        str(experts["e0"]),
        str(experts["e1"]),
    ]


def test_command_line_expansion(pool_dirs: Pool, tmp_path: Path) -> None:
    _, experts = pool_dirs
    path = write_config(tmp_path, pool_dirs, TA + "  - model: {e0}\n    parameters: {{weight: 1}}\n")
    assert expand_command_line(["method=ties", "-m"]) == ["method=ties", "-m"]  # no mergekit=: unchanged
    assert expand_command_line(["mergekit=null"]) == ["mergekit=null"]
    args = expand_command_line(["seed=3", f"mergekit={path}", "model.chunk_elems=64", "eval=lm_harness"])
    assert args[0] == "seed=3" and args[-2:] == ["model.chunk_elems=64", "eval=lm_harness"]
    assert "eval=none" not in args and f"mergekit='{path}'" in args and "method.scaling=1.0" in args
    assert f"model.experts={{e0:'{experts['e0']}'}}" in args
    # Paths survive Hydra's override grammar whatever quotes and backslashes they hold.
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for odd in ("/a b/it's", "/x\\'y", "/dir\\", "/a\\b"):
        assert parser.parse_override(f"model.pretrained={quote(odd)}").value() == odd
    for clash in ("method.scaling=0.5", "method=ties", "model.pretrained=/x", "model.vocab=extend", "tune=true"):
        with pytest.raises(ValueError, match="conflicts with mergekit="):
            expand_command_line([f"mergekit={path}", clash])


# ------------------------------------------------------------------------------------- MergeKit out, in process


@pytest.mark.parametrize(
    ("method", "merge_method"),
    [
        (["method=task_arithmetic", "method.scaling=0.4"], "task_arithmetic"),
        (["method=ties", "method.prune=per_tensor", "method.k=20"], "ties"),
        (["method=weight_averaging"], "linear"),
        (["method=dare", "method.p=0.3", "method.merge.scaling=0.6"], "dare_linear"),
        (
            [
                *("method=dare", "method@method.merge=ties", "method.merge.k=100"),
                *("method.merge.disjoint=mean", "method.merge.prune=per_tensor"),
            ],
            "dare_ties",
        ),
    ],
)
def test_expressible_merges_round_trip_bit_for_bit(
    pool_dirs: Pool,
    tmp_path: Path,
    method: list[str],
    merge_method: str,
) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run(make_cfg(a, [*pool_overrides(pool_dirs), *method, "eval=none"], tiny=False))
    config = merged(a) / CONFIG_FILE
    assert yaml.safe_load(config.read_text())["merge_method"] == merge_method
    run(make_cfg(b, [*mergekit_overrides(config), "logger=none"], tiny=False))
    assert_same_tensors(merged(a), merged(b))
    assert (merged(b) / CONFIG_FILE).read_text() == config.read_text()


@pytest.mark.parametrize(
    ("method", "why"),
    [
        (["method=metagpt"], "MetaGPT computes each task's coefficient from the task vectors' norms"),
        (["method=ties"], "TIES with prune=global ranks magnitudes over the whole model"),
        (["method=dare", "method@method.merge=ties", "method.merge.prune=per_tensor"], "DARE into TIES with k=20"),
        (["method=dare", "method@method.merge=ties"], "DARE into TIES with prune=global"),
        (["method=magnitude_pruned_ta", "method.prune=per_tensor"], "TIES without sign election"),
        (["method=task_arithmetic", "model.exclude=[embed]"], "model.exclude ['embed']"),
    ],
)
def test_merges_mergekit_cannot_express_get_no_file_and_the_recipe_says_why(
    pool_dirs: Pool,
    tmp_path: Path,
    method: list[str],
    why: str,
) -> None:
    run(make_cfg(tmp_path, [*pool_overrides(pool_dirs), *method, "eval=none"], tiny=False))
    out = merged(tmp_path)
    assert not (out / CONFIG_FILE).exists()
    recipe = json.loads((out / RECIPE_FILE).read_text())
    assert recipe["mergekit"]["file"] is None and why in recipe["mergekit"]["reason"]
    card = (out / CARD_FILE).read_text()
    assert f"- No MergeKit config: {recipe['mergekit']['reason']}." in card
    # run(cfg) from Python has no command line: the card says so rather than show a command that is not this run's
    assert recipe["command"] is None and "Not run by the `mergelab` command" in card
    if method == ["method=metagpt"]:  # the computed coefficients are recorded, in the recipe and the card
        lambdas = json.loads((tmp_path / "metrics.json").read_text())["method_report"]
        assert recipe["coefficients"] == lambdas and set(lambdas) == {"lambda/e0", "lambda/e1"}
        assert all(f"| {k} | {v:.6g} |" in card for k, v in lambdas.items())


# ------------------------------------------------------------------------------------- scores, writing, hashes


def test_a_scored_tuned_merge_records_its_scores_and_grid_point(pool_dirs: Pool, tmp_path: Path) -> None:
    overrides = [
        *pool_overrides(pool_dirs),
        "method=task_arithmetic",
        "tune=true",
        "method.grid.scaling=[0.0,1.0]",  # tests/test_run_flow.py's pool scores the two points differently
        "eval=lm_harness",
        "eval.tasks=[mergelab_sentiment]",
        "eval.limit=4",
        "eval.batch_size=4",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]
    run(make_cfg(tmp_path, overrides, tiny=False))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    recipe = json.loads((merged(tmp_path) / RECIPE_FILE).read_text())
    scores = recipe["scores"]
    assert scores["tasks"] == metrics["scores"] and scores["avg_acc"] == metrics["avg_acc"]
    assert (scores["suite"], scores["split"], scores["tune"]["split"]) == ("lm_harness", "harness", "harness")
    card = (merged(tmp_path) / CARD_FILE).read_text()
    acc = 100 * metrics["scores"]["mergelab_sentiment"]["acc"]
    # Scored on lm-eval's first 4 examples (eval.limit=4): the card says so.
    assert (
        "lm_harness, harness split, on a subset: at most 4 examples per task (eval.limit=4), not the whole split: "
        "accuracy (%)." in card
    )
    assert recipe["scores"]["subset"] == {"key": "eval.limit", "value": 4}
    assert f"| task_arithmetic | {acc:.2f} | {100 * metrics['avg_acc']:.2f} |" in card
    # The grid point chosen on the tune split is the recipe's, the card's and the MergeKit config's.
    chosen = metrics["params"]["scaling"]
    assert recipe["method"]["grid_point"] == {"scaling": chosen} and recipe["method"]["options"]["scaling"] == chosen
    assert f"Chosen on the harness split from the method's grid: scaling={chosen}." in card
    mk = yaml.safe_load((merged(tmp_path) / CONFIG_FILE).read_text())
    assert [m["parameters"]["weight"] for m in mk["models"]] == [chosen, chosen]


class SavingPool:
    """What InMemoryMerge.write uses of an in-memory pool: ``save_merged`` (atomic, as every pool's)."""

    def save_merged(self, state: dict[str, torch.Tensor], out_dir: Path) -> Path:
        from mergelab.io.atomic import atomic_dir

        with atomic_dir(out_dir) as tmp:
            save_file(state, str(tmp / "model.safetensors"))
        return out_dir


def test_in_memory_merge_is_completed_before_it_is_moved_into_place(tmp_path: Path) -> None:
    merge = object.__new__(InMemoryMerge)  # no Lightning callback: only what write uses
    merge.pool = SavingPool()  # type: ignore[assignment]
    merge.callback = SimpleNamespace(merged_state=lambda: {"w": torch.ones(2)})  # type: ignore[assignment]
    final = tmp_path / "merged_model"

    def finish(model_dir: Path) -> None:
        assert not final.exists() and (model_dir / "model.safetensors").is_file()
        (model_dir / RECIPE_FILE).write_text("{}")

    assert merge.write(final, overwrite=False, finish=finish) == final
    assert sorted(p.name for p in final.iterdir()) == [RECIPE_FILE, "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["merged_model"]  # no temporary left

    def broken(model_dir: Path) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        merge.write(tmp_path / "other", overwrite=False, finish=broken)
    assert [p.name for p in tmp_path.iterdir()] == ["merged_model"]  # nothing half-written, nothing left


def test_content_hashes_follow_the_weights_and_each_file_is_read_once(
    pool_dirs: Pool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, experts = pool_dirs
    copy = tmp_path / "e0"
    shutil.copytree(experts["e0"], copy)
    first = checkpoint_identity(str(copy))
    assert first["sha256"] == checkpoint_identity(str(experts["e0"]))["sha256"]  # content, not path or mtime
    assert checkpoint_identity("org/some-model") == {"id": "org/some-model", "hub": True}

    opened: list[str] = []
    real_open = open
    monkeypatch.setattr(identity, "open", lambda p, *a: opened.append(str(p)) or real_open(p, *a), raising=False)
    assert checkpoint_identity(str(copy)) == first and opened == []  # cached: nothing read again

    shard = sorted(copy.glob("*.safetensors"))[-1]
    raw = bytearray(shard.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    at = 8 + n + next(v for k, v in header.items() if k != "__metadata__")["data_offsets"][0]
    (value,) = struct.unpack("<f", raw[at : at + 4])
    raw[at : at + 4] = struct.pack("<f", value + 0.5)  # one weight changes; the header and the file size do not
    shard.write_bytes(bytes(raw))
    changed = checkpoint_identity(str(copy))
    assert changed["weight_files"] == first["weight_files"] and changed["sha256"] != first["sha256"]
    assert opened == [str(shard)]  # only the rewritten file is read

    cfg = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**cfg, "rms_norm_eps": 1e-5}))
    assert checkpoint_identity(str(copy))["sha256"] not in (first["sha256"], changed["sha256"])


def test_large_files_are_sampled_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(1 << 20)}, str(path))  # 4 MiB of data
    before = identity.weight_file_digest(path)
    data = bytearray(path.read_bytes())
    data[-1] = 1  # the last block is always sampled
    path.write_bytes(bytes(data))
    assert identity.weight_file_digest(path) != before
