"""Scaling out: a 2-process DDP run on CPU equals one process; trainer and SLURM launcher configs compose."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.distributed.fsdp.wrap import ModuleWrapPolicy
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy
from transformers.models.bert.modeling_bert import BertLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from mergelab.cli import CONFIG_DIR
from mergelab.run import run
from mergelab.text.model import MultiTaskClassifier
from mergelab.training import distributed, experts
from tests.conftest import TINY, make_cfg

# AWD with a few steps and a batch size that splits each task's 48 examples into 3 batches (20, 20, 8): rank 0
# scores two of them and rank 1 one, so a score is right only if the metric states are summed across ranks.
RUN = ["method=awd", "method.steps=4", "eval.batch_size=20"]


def test_two_process_ddp_run_equals_one_process(tmp_path: Path, cache_dir: Path) -> None:
    one = tmp_path / "one"
    run(make_cfg(one, RUN))  # also builds (or reuses) the session's tiny experts
    # The DDP run reuses those experts but scores everything itself (pretrained and experts included).
    ddp_cache = tmp_path / "cache"
    ddp_cache.mkdir()
    (ddp_cache / "experts").symlink_to(cache_dir / "experts")
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "mergelab.cli", *TINY, *RUN, "trainer=ddp_cpu", f"hydra.run.dir={two}"]
    env = {**os.environ, "MERGELAB_CACHE": str(ddp_cache), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stderr  # two processes did run

    a = json.loads((one / "metrics.json").read_text())
    b = json.loads((two / "metrics.json").read_text())
    assert list(b["rows"]) == ["pretrained", "experts", "awd", "awd (single-task)"]
    for name, row in a["rows"].items():
        assert b["rows"][name]["scores"] == row["scores"], name
    assert b["objective"] == a["objective"]
    assert b["rows"]["awd"]["method_report"] == a["rows"]["awd"]["method_report"]
    delta_one = load_file(str(one / "artifacts" / "awd" / "delta.safetensors"))
    delta_two = load_file(str(two / "artifacts" / "awd" / "delta.safetensors"))
    assert delta_one.keys() == delta_two.keys()
    for k, v in delta_one.items():
        assert torch.equal(v, delta_two[k]), k
    assert any(float(v.abs().max()) > 0 for v in delta_two.values())  # a real fit, not the zero init

    # Only rank 0 wrote: one copy of each result, no temporary leftovers; rank 1 only has Hydra's log.
    results = [
        ".mergelab-results",
        "artifacts",
        "config.yaml",
        "mergelab.log",
        "metrics.json",
        "results.csv",
        "results.md",
    ]
    assert sorted(p.name for p in two.iterdir()) == sorted([*results, "train_ddp_process_1.log"])
    scores = sorted((ddp_cache / "scores").iterdir())
    assert len(scores) == 3 and all(p.suffix == ".json" for p in scores)  # pretrained + two experts


def test_rank_batches_partition_without_repeats(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"x": [i], "labels": i % 2} for i in range(7)]
    loader = DataLoader(rows, batch_size=3, collate_fn=lambda b: {"x": torch.tensor([r["x"] for r in b])})  # type: ignore[arg-type]
    single = [b["x"].flatten().tolist() for b in distributed.shard_eval_loader(loader)]
    assert single == [[0, 1, 2], [3, 4, 5], [6]]  # one process: the same batches, none marked
    assert not any(distributed.is_filler(b) for b in distributed.shard_eval_loader(loader))

    seen = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 2))
        sharded = distributed.shard_eval_loader(loader)
        batches = list(sharded)
        assert len(sharded) == len(batches)
        seen += [b["x"].flatten().tolist() for b in batches if not distributed.is_filler(b)]
    assert sorted(seen) == sorted(single)  # each batch exactly once, intact

    # A rank left without a batch (4 ranks, 3 batches) gets one filler so it still runs the test loop.
    monkeypatch.setattr(distributed, "world", lambda: (3, 4))
    batches = list(distributed.shard_eval_loader(loader))
    assert len(batches) == 1 and distributed.is_filler(batches[0])


def test_filler_batches_are_not_scored() -> None:
    clf = MultiTaskClassifier(torch.nn.Identity(), {})
    clf.eval_tasks = ["t"]
    clf.metrics = torch.nn.ModuleDict({"t": torch.nn.ModuleDict({"acc": MulticlassAccuracy(2, average="micro")})})
    clf.forward = lambda task, batch: torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # type: ignore[method-assign]
    clf.test_step({distributed.FILLER: True, "labels": torch.tensor([1, 0])}, 0)  # would score 0/2
    clf.test_step({"labels": torch.tensor([0, 1])}, 0)
    assert float(clf.metrics["t"]["acc"].compute()) == 1.0


def test_rank_zero_from_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert distributed.is_global_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not distributed.is_global_zero()
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("NODE_RANK", "1")
    assert not distributed.is_global_zero()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert distributed.is_global_zero()
    monkeypatch.setenv("RANK", "3")
    assert not distributed.is_global_zero()


def test_multi_process_trainer_refused_in_a_local_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for devices, multi in ((1, False), (2, True), (-1, True), ([3], False), ([0, 1], True), ("0,1", True), ("2", True)):
        assert distributed.multi_process({"devices": devices}) is multi, devices
    assert distributed.multi_process({"devices": 1, "num_nodes": 2})
    with pytest.raises(ValueError, match=r"devices=2 .*hydra/launcher=submitit_slurm"):
        distributed.check_launch({"devices": 2}, multirun=True)
    distributed.check_launch({"devices": 2}, multirun=False)  # a single run: Lightning starts the ranks
    distributed.check_launch({"devices": 1}, multirun=True)
    monkeypatch.setenv("SLURM_PROCID", "0")  # a SLURM job of the sweep: the ranks are SLURM's tasks
    distributed.check_launch({"devices": 2}, multirun=True)


def test_checkpoint_pools_merge_in_one_process(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, ["experiment=metagpt_llama2_7b", "trainer=ddp_cpu"], tiny=False)
    with pytest.raises(ValueError, match=r"devices=2 .*checkpoint pool merges in one process"):
        run(cfg)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())


def test_cached_build_is_written_by_rank_zero_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    waits = []
    monkeypatch.setattr(distributed, "initialized", lambda: True)
    monkeypatch.setattr(distributed, "barrier", lambda: waits.append(1))

    def build(tmp: Path) -> dict[str, int]:
        (tmp / "weights.bin").write_text("w")
        return {"n": 1}

    monkeypatch.setattr(distributed, "is_global_zero", lambda: False)
    final = experts.cached_build(tmp_path, "expert", {"a": 1}, build)
    assert not final.exists() and list(tmp_path.iterdir()) == []  # built (its Trainer needs it), not kept
    assert waits == [1]  # ...and waited for rank 0
    monkeypatch.setattr(distributed, "is_global_zero", lambda: True)
    assert experts.cached_build(tmp_path, "expert", {"a": 1}, build) == final
    assert (final / "weights.bin").is_file() and (final / experts.RECORD).is_file()
    assert waits == [1, 1]
    assert [p.name for p in tmp_path.iterdir()] == [final.name]


def compose_trainer(*overrides: str) -> dict:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = GlobalHydra.instance().hydra.compose_config("config", list(overrides), run_mode=RunMode.RUN)
    return OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[return-value]


def test_ddp_trainer_configs_instantiate_on_cpu() -> None:
    args = distributed.trainer_arguments(compose_trainer("trainer=ddp_cpu"))
    trainer = L.Trainer(**args, logger=False)
    assert isinstance(trainer.strategy, DDPStrategy)
    assert trainer.num_devices == 2 and trainer.num_nodes == 1
    assert trainer.strategy._process_group_backend == "gloo"
    assert trainer.strategy._ddp_kwargs == {"forward_sync_buffers": False, "find_unused_parameters": False}
    # The GPU config, on CPU devices: the same strategy settings; each Trainer gets its own strategy object.
    raw = compose_trainer("trainer=ddp", "trainer.accelerator=cpu", "trainer.precision=32-true")
    assert raw["devices"] == 8 and raw["sync_batchnorm"] is False
    a, b = distributed.trainer_arguments(raw), distributed.trainer_arguments(raw)
    assert isinstance(a["strategy"], DDPStrategy) and a["strategy"] is not b["strategy"]
    assert a["strategy"]._timeout.total_seconds() == 30 * 60
    trainer = L.Trainer(**{**a, "devices": 2}, logger=False)
    assert trainer.num_devices == 2 and trainer.strategy._get_process_group_backend() == "gloo"  # auto on CPU


def test_fsdp_trainer_config_wraps_transformer_blocks() -> None:
    raw = compose_trainer("trainer=fsdp")
    assert raw["precision"] == "bf16-mixed" and raw["accelerator"] == "gpu"
    strategy = distributed.trainer_arguments(raw)["strategy"]
    assert isinstance(strategy, FSDPStrategy)
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy)
    assert {LlamaDecoderLayer, BertLayer} <= set(policy._module_classes)
    assert str(strategy.sharding_strategy) == "ShardingStrategy.FULL_SHARD"


def test_submitit_slurm_launcher_composes_for_a_sweep() -> None:
    from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    overrides = [
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.tasks_per_node=4",
        "trainer=ddp",
        "trainer.devices=4",
        "method=task_arithmetic",
        "method.scaling=0.1,0.3,0.5",
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = GlobalHydra.instance().hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN)
    launcher = cfg.hydra.launcher
    fields = {f.name for f in dataclasses.fields(SlurmQueueConf)}
    assert set(launcher) <= fields  # our file replaces the plugin's: every key is one the plugin knows
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.partition, launcher.gpus_per_node, launcher.tasks_per_node) == ("gpu", 4, 4)
    assert (launcher.timeout_min, launcher.mem_gb, launcher.cpus_per_task, launcher.nodes) == (240, 64, 8, 1)
    assert launcher.submitit_folder == f"{cfg.hydra.sweep.dir}/.submitit/%j"
    built = instantiate(launcher)  # the launcher object, nothing submitted
    assert isinstance(built, SlurmLauncher) and built.params["partition"] == "gpu"
    # The sweep the launcher would get: one job per value, each with the DDP trainer.
    parsed = OverridesParser.create().parse_overrides(list(cfg.hydra.overrides.task))
    jobs = BasicSweeper.split_arguments(parsed, None)[0]
    assert [j[-1] for j in jobs] == [f"method.scaling={v}" for v in ("0.1", "0.3", "0.5")]
    assert all("trainer=ddp" in j and "trainer.devices=4" in j for j in jobs)
