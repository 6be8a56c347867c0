"""The expert cache is keyed on content: the same bytes anywhere (a copied cache, another venv) are reused, and
entries built under the earlier mtime-based keys are adopted instead of rebuilt."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergelab.training.experts import RECORD, cached_build, legacy_model_fingerprint, model_fingerprint


def model_dir(path: Path, seed: int = 0) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "hidden_size": 8}))
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(300, 300, generator=g)}, str(path / "model.safetensors"))  # > 1 MiB: sampled
    return path


def never(_: Path) -> dict:
    raise AssertionError("rebuilt although an equivalent entry was cached")


def test_a_copied_checkpoint_keeps_its_identity_and_a_changed_one_does_not(tmp_path: Path) -> None:
    a = model_dir(tmp_path / "a")
    time.sleep(0.01)
    b = tmp_path / "b"
    shutil.copytree(a, b, copy_function=shutil.copy)  # new mtimes, same bytes
    assert legacy_model_fingerprint(a) != legacy_model_fingerprint(b)  # the old key missed such a copy
    assert model_fingerprint(str(a)) == model_fingerprint(str(b))
    assert model_fingerprint(str(model_dir(tmp_path / "c", seed=1))) != model_fingerprint(str(a))
    assert model_fingerprint("org/some-model") == "org/some-model"  # a hub id is its own identity


def test_a_copied_cache_is_reused(tmp_path: Path) -> None:
    pretrained = model_dir(tmp_path / "pretrained")
    built = []

    def build(tmp: Path) -> dict:
        built.append(tmp)
        (tmp / "weights.txt").write_text("expert")
        return {"built": True}

    spec = {"pretrained": model_fingerprint(str(pretrained)), "task": "t"}
    first = cached_build(tmp_path / "cache", "t", spec, build)
    assert len(built) == 1 and (first / RECORD).is_file()
    # Another machine: the pretrained model installed elsewhere (new mtimes), the cache copied over.
    shutil.copytree(tmp_path / "cache", tmp_path / "cache2", copy_function=shutil.copy)
    elsewhere = tmp_path / "venv2" / "pretrained"
    shutil.copytree(pretrained, elsewhere, copy_function=shutil.copy)
    spec2 = {"pretrained": model_fingerprint(str(elsewhere)), "task": "t"}
    again = cached_build(tmp_path / "cache2", "t", spec2, never)
    assert (again / "weights.txt").read_text() == "expert"


def test_an_entry_built_under_the_mtime_key_is_adopted(tmp_path: Path) -> None:
    pretrained = model_dir(tmp_path / "pretrained")
    old_spec = {"pretrained": legacy_model_fingerprint(pretrained), "task": "t"}
    old = cached_build(tmp_path / "cache", "t", old_spec, lambda tmp: {"built": "before"})
    new_spec = {"pretrained": model_fingerprint(str(pretrained)), "task": "t"}
    adopted = cached_build(tmp_path / "cache", "t", new_spec, never)
    assert adopted != old and not old.exists()
    assert json.loads((adopted / RECORD).read_text()) == {"built": "before"}
    assert cached_build(tmp_path / "cache", "t", new_spec, never) == adopted


def test_unrelated_entries_are_not_adopted(tmp_path: Path) -> None:
    pretrained = model_dir(tmp_path / "pretrained")
    cached_build(
        tmp_path / "cache",
        "t",
        {"pretrained": legacy_model_fingerprint(pretrained), "task": "other"},
        lambda tmp: {"built": "other"},
    )
    built = []
    cached_build(
        tmp_path / "cache",
        "t",
        {"pretrained": model_fingerprint(str(pretrained)), "task": "t"},
        lambda tmp: built.append(tmp) or {"built": "new"},
    )
    assert len(built) == 1  # another task's entry under the old key is left alone


def test_an_adapters_config_is_part_of_its_identity(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"a.lora_A.weight": torch.ones(2, 4)}, str(adapter / "adapter_model.safetensors"))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4}))
    before = model_fingerprint(str(adapter))
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 8}))
    assert model_fingerprint(str(adapter)) != before  # another scaling: another expert
