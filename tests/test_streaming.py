"""The streaming engine's files: sharded output that transformers loads, vocab policy, reads, writes and errors.

That every method streams exactly as it merges in memory is tests/test_conformance.py's matrix."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from mergelab import task_vectors as tv
from mergelab.engine.passes import combine_in_memory
from mergelab.engine.streaming import stream_merge
from mergelab.io.reader import LazyCheckpoint
from mergelab.io.writer import write_checkpoint
from mergelab.methods import TIES, MetaGPT, TaskArithmetic, WeightAveraging, ties_ops
from mergelab.methods.magnitude_select import kth_largest, radix_kth_largest

VOCAB = 64


def sq_norm(vector: dict) -> float:
    """||v||^2 in float64, computed here independently of the library."""
    return float(sum(np.sum(t.double().numpy() ** 2) for t in vector.values()))


def llama(seed: int, vocab: int = VOCAB) -> LlamaForCausalLM:
    """A tiny random-weight Llama: plumbing only (file formats, shapes, sharding)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(cfg)


def save_expert(base: LlamaForCausalLM, path: Path, seed: int, extra_rows: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    model = llama(0, VOCAB + extra_rows)
    state = {}
    for k, v in base.state_dict().items():
        t = v + 0.02 * torch.randn(v.shape, generator=g)
        if extra_rows and k in ("model.embed_tokens.weight", "lm_head.weight"):
            t = torch.cat([t, torch.randn(extra_rows, v.shape[1], generator=g)])
        state[k] = t
    model.load_state_dict(state)
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="40KB")


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("llama_pool")
    base = llama(0)
    base.to(torch.bfloat16).save_pretrained(root / "base", max_shard_size="40KB")
    experts = []
    for i in range(3):
        save_expert(base.float(), root / f"expert{i}", seed=10 + i)
        experts.append(root / f"expert{i}")
    return root / "base", experts


def load_all(path: Path) -> dict[str, torch.Tensor]:
    ck = LazyCheckpoint(path)
    return {k: ck.get(k) for k in ck}


def test_sharded_output_loads_in_transformers(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, expert_dirs = pool
    out = stream_merge(TaskArithmetic(0.3), base_dir, expert_dirs, tmp_path / "m", max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    assert all((out / s).stat().st_size <= 20_000 + 4096 for s in shards)  # data within the limit, plus header
    model = AutoModelForCausalLM.from_pretrained(out)
    merged = load_all(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, merged[k]), k
    assert not list(tmp_path.glob(".tmp-*"))


def test_existing_output_is_not_overwritten(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, expert_dirs = pool
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists"):
        stream_merge(WeightAveraging(), base_dir, expert_dirs, out)
    assert (out / "keep.txt").read_text() == "mine"
    stream_merge(WeightAveraging(), base_dir, expert_dirs, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors.index.json").is_file()


def test_nan_in_an_expert_names_it_and_writes_nothing(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, expert_dirs = pool
    bad = tmp_path / "bad"
    state = load_all(expert_dirs[1])
    state["model.layers.1.mlp.up_proj.weight"][3, 4] = float("nan")
    model = llama(0)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    model.to(torch.bfloat16).save_pretrained(bad)
    with pytest.raises(ValueError, match=r"'.*bad'.*'model.layers.1.mlp.up_proj.weight' contains NaN/inf"):
        stream_merge(TaskArithmetic(0.3), base_dir, [expert_dirs[0], bad], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.fixture(scope="module")
def extended_expert(pool: tuple[Path, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    base_dir, _ = pool
    path = tmp_path_factory.mktemp("ext") / "expert_plus2"
    base = AutoModelForCausalLM.from_pretrained(base_dir).float()
    save_expert(base, path, seed=99, extra_rows=2)
    return path


def test_vocab_extension_policy(pool: tuple[Path, list[Path]], extended_expert: Path, tmp_path: Path) -> None:
    base_dir, expert_dirs = pool
    experts = [expert_dirs[0], extended_expert, expert_dirs[1]]
    out = stream_merge(TaskArithmetic(0.5), base_dir, experts, tmp_path / "ext", vocab="extend")
    merged = load_all(out)
    base = load_all(base_dir)
    ext = load_all(extended_expert)
    shared = [load_all(expert_dirs[0]), {k: v[:VOCAB] if v.shape[0] > VOCAB else v for k, v in ext.items()}]
    shared.append(load_all(expert_dirs[1]))
    expected = tv.apply_task_vector(base, combine_in_memory(TaskArithmetic(0.5), tv.task_vectors(base, shared)))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert merged[k].shape == (VOCAB + 2, 32)
        assert torch.equal(merged[k][:VOCAB], expected[k])  # shared rows: merged as usual
        assert torch.equal(merged[k][VOCAB:], ext[k][VOCAB:])  # extra rows: from the only expert that has them
    assert json.loads((out / "config.json").read_text())["vocab_size"] == VOCAB + 2
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == VOCAB + 2

    kept = load_all(stream_merge(TaskArithmetic(0.5), base_dir, experts, tmp_path / "base", vocab="base"))
    assert torch.equal(kept["lm_head.weight"], expected["lm_head.weight"])
    with pytest.raises(ValueError, match=r"'model.embed_tokens.weight' has 66 rows, pretrained 64; set vocab="):
        stream_merge(TaskArithmetic(0.5), base_dir, experts, tmp_path / "err", vocab="error")
    assert not (tmp_path / "err").exists()


def test_vocab_mismatch_that_is_not_a_row_extension(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, expert_dirs = pool
    ck = load_all(expert_dirs[0])
    ck["model.layers.0.mlp.up_proj.weight"] = ck["model.layers.0.mlp.up_proj.weight"][:, :16]
    odd = write_checkpoint(ck, tmp_path / "odd")
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.up_proj.weight' has shape \(64, 16\).*only extra rows"):
        stream_merge(TaskArithmetic(0.5), base_dir, [expert_dirs[1], odd], tmp_path / "out")


def test_metagpt_lambdas_from_the_streamed_pass(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base_dir, expert_dirs = pool
    method = MetaGPT()
    stream_merge(method, base_dir, expert_dirs, tmp_path / "m", task_names=["a", "b", "c"], progress=False)
    base = load_all(base_dir)
    norms = [sq_norm(v) for v in tv.task_vectors(base, [load_all(e) for e in expert_dirs])]
    report = method.report()
    for name, n in zip("abc", norms, strict=True):
        assert report[f"lambda/{name}"] == pytest.approx(n / sum(norms), rel=1e-6)


def test_cli_streams_a_checkpoint_pool(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from mergelab.run import run
    from tests.conftest import make_cfg

    base_dir, expert_dirs = pool
    experts = "{" + ",".join(f"e{i}:'{p}'" for i, p in enumerate(expert_dirs)) + "}"
    overrides = ["model=checkpoints", f"model.pretrained={base_dir}", f"model.experts={experts}", "logger=none"]
    cfg = make_cfg(tmp_path / "run", [*overrides, "method=metagpt", "eval=none"], tiny=False)
    run(cfg)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    lambdas = metrics["method_report"]
    assert set(lambdas) == {"lambda/e0", "lambda/e1", "lambda/e2"}
    assert sum(lambdas.values()) == pytest.approx(1.0)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged_model")
    base = load_all(base_dir)
    vecs = tv.task_vectors(base, [load_all(e) for e in expert_dirs])
    expected = tv.apply_task_vector(base, combine_in_memory(MetaGPT(), vecs))
    state = model.state_dict()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    with pytest.raises(ValueError, match="set eval=none"):
        run(make_cfg(tmp_path / "run2", [*overrides, "method=metagpt"], tiny=False))
    assert not (tmp_path / "run2").exists()


def test_paper_pools_compose_with_the_table_8_hub_ids() -> None:
    from hydra import compose, initialize_config_dir

    from tests.conftest import CONFIG_DIR, make_cfg

    cfg = make_cfg(Path("/unused"), ["experiment=metagpt_llama2_7b"], tiny=False)
    assert cfg.model.pretrained == "meta-llama/Llama-2-7b-hf"
    assert dict(cfg.model.experts) == {
        "general": "meta-llama/Llama-2-7b-chat-hf",
        "math": "TIGER-Lab/MAmmoTH-7B",
        "code": "mrm8488/llama-2-coder-7b",
    }
    # The paper's table: scored by lm-eval on the six benchmarks, a sweep over the five methods.
    assert cfg.method.name == "metagpt" and cfg.eval.name == "lm_harness" and cfg.eval.dtype == "bfloat16"
    assert list(cfg.eval.tasks) == ["winogrande", "agieval", "gsm8k", "minerva_math", "mbpp", "humaneval"]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        hydra_cfg = compose("config", overrides=["experiment=metagpt_llama2_7b"], return_hydra_config=True)
    assert hydra_cfg.hydra.sweeper.params.method.split(",") == [
        "weight_averaging",
        "task_arithmetic",
        "ties",
        "dare",
        "metagpt",
    ]
    assert make_cfg(Path("/unused"), ["experiment=metagpt_mistral_7b"], tiny=False).model.experts.math == (
        "TIGER-Lab/MAmmoTH2-7B"
    )
    assert make_cfg(Path("/unused"), ["experiment=metagpt_llama2_13b"], tiny=False).model.pretrained == (
        "meta-llama/Llama-2-13b-hf"
    )


# ------------------------------------------------------------------------------------------ the fast engine


def same_files(a: Path, b: Path) -> None:
    """Two merged checkpoint dirs hold byte-identical safetensors shards and index."""
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors")) and names
    for name in [*names, "model.safetensors.index.json"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_direct_and_buffered_reads_agree(pool: tuple[Path, list[Path]]) -> None:
    from mergelab.io.files import ALIGN, aligned_empty

    base_dir, _ = pool
    cached, direct, buffered = (LazyCheckpoint(base_dir, direct=d) for d in (None, True, False))
    for name in cached:
        whole = cached.get(name)
        rows = whole.shape[0] if whole.dim() else 1
        for start, stop in [(None, None), (0, 1), (rows // 3, rows)]:
            expected = cached.get_rows(name, start, stop)
            for ck in (cached, direct, buffered):
                buf = aligned_empty(ck.block_nbytes(name, start, stop) + 2 * ALIGN)
                assert torch.equal(ck.read_rows_into(name, start, stop, buf), expected), (name, start, stop)


def test_writer_direct_and_buffered_agree_with_odd_layouts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Odd-sized and mixed-dtype tensors (unaligned offsets), blocks larger than a staging buffer, empty tensors."""
    from mergelab.io.writer import ShardedWriter

    monkeypatch.setattr(ShardedWriter, "STAGING_BYTES", 3 * 4096)  # force many flushes and split blocks
    g = torch.Generator().manual_seed(0)
    tensors = {
        "odd": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "f32_after_odd": torch.randn(5, 1001, generator=g),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "ints": torch.arange(33, dtype=torch.int16),
        "big": torch.randn(40, 1000, generator=g).to(torch.bfloat16),
    }
    outs = []
    for direct in (True, False):
        layout = [(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
        writer = ShardedWriter(tmp_path / f"d{direct}", layout, max_shard_bytes=50_000, direct=direct)
        for k, v in tensors.items():
            blocks = list(v.float().split(7)) if k == "big" else [v]  # converted back to bf16 on the way
            writer.add_blocks(k, blocks)
        writer.patch("big", torch.tensor([0, 5, 39_999]), torch.tensor([1.0, -2.0, 3.0]))
        outs.append(writer.close())
    same_files(*outs)
    back = load_all(outs[0])
    for k, v in tensors.items():
        expected = v.clone()
        if k == "big":
            expected.view(-1)[torch.tensor([0, 5, 39_999])] = torch.tensor([1.0, -2.0, 3.0], dtype=v.dtype)
        assert back[k].dtype == v.dtype and torch.equal(back[k], expected), k
    assert not list(tmp_path.glob(".tmp-*"))


def test_ties_kernels_match_the_reference_bit_for_bit() -> None:
    """The fast trim / elect / disjoint-merge equals trim, elect_sign and disjoint_merge, signed zeros included,
    on integer-valued vectors full of exact ties, zeros and -0.0; the folded variant's corrections turn its
    provisional result into the reference's for the other majority."""
    g = torch.Generator().manual_seed(0)
    for trial in range(400):
        n_tasks, n = int(torch.randint(1, 7, (1,), generator=g)), int(torch.randint(1, 200, (1,), generator=g))
        x = torch.randint(-3, 4, (n_tasks, n), generator=g).float()
        x[torch.rand(n_tasks, n, generator=g) < 0.2] = -0.0
        if trial % 3 == 0:
            x = x * torch.logspace(-4, 8, n_tasks).view(-1, 1)
        if trial % 7 == 0:
            x = x.double()
        th = [0.0] * n_tasks if trial % 4 == 0 else [float(t) for t in torch.randint(0, 4, (n_tasks,), generator=g)]
        for reduce in ("sum", "mean"):
            for majority in (1.0, -1.0, None):
                trimmed = ties_ops.trim(list(x), th)
                maj = ties_ops.majority_sign(ties_ops.sign_total(trimmed)) if majority is None else majority
                ref = ties_ops.disjoint_merge(trimmed, ties_ops.elect_sign(trimmed, maj), reduce)
                fast = ties_ops.ties_merge_(x.clone(), th, majority, reduce)
                assert torch.equal(fast, ref) and torch.equal(fast.signbit(), ref.signbit()), (trial, reduce)
                if majority is None or n_tasks > ties_ops.SEQUENTIAL_SUM_ROWS:
                    continue
                merged, total, alt = ties_ops.ties_merge_folded_(x.clone(), th, 1.0, reduce)
                assert total == ties_ops.sign_total(trimmed)
                if majority < 0 and alt is not None:
                    merged.view(-1)[alt[0]] = alt[1]
                assert torch.equal(merged, ref) and torch.equal(merged.signbit(), ref.signbit()), (trial, reduce)
            assert ties_ops.sign_total_(x.clone(), th) == ties_ops.sign_total(ties_ops.trim(list(x), th))
        mags = x.float().abs().flatten()
        rank = int(torch.randint(1, mags.numel() + 1, (1,), generator=g))
        assert radix_kth_largest([mags], rank) == kth_largest([mags], rank)


def tie_pool(root: Path, sign: float) -> tuple[Path, list[Path]]:
    """Three experts whose task vectors are small integers (in units of 2^-7): many exact sign ties, and
    sign totals that lean to ``sign``, so global TIES's majority is known in advance."""
    g = torch.Generator().manual_seed(3)
    shapes = {"a.weight": (300, 20), "b.weight": (77,), "c.weight": (40, 30)}
    base = {k: (torch.randint(-40, 40, s, generator=g) / 64.0).to(torch.bfloat16) for k, s in shapes.items()}
    write_checkpoint(base, root / "base")
    experts = []
    for i in range(3):
        state = {}
        for k, v in base.items():
            tau = torch.randint(-2, 3, v.shape, generator=g).float()
            tau = torch.where(torch.rand(v.shape, generator=g) < 0.3, sign * tau.abs(), tau)  # the majority
            state[k] = (v.float() + tau / 128).to(torch.bfloat16)
        experts.append(write_checkpoint(state, root / f"e{i}"))
    return root / "base", experts


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("budget", [None, 3])
@pytest.mark.parametrize("prune", ["global", "per_tensor"])
def test_folded_ties_sign_pass_is_exact(
    sign: float, budget: int | None, prune: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Streaming TIES skips the sign pass and corrects the exact ties afterwards (the majority -1 case, of the
    model or of each tensor), or merges again when there are more corrections than its budget: always the
    in-memory result."""
    from mergelab.engine import passes as engine

    if budget is not None:
        monkeypatch.setattr(engine.DeferredValues.__init__, "__defaults__", (budget,))
    base_dir, expert_dirs = tie_pool(tmp_path, sign)
    method = TIES(k=60, prune=prune, disjoint="mean", scaling=0.7)
    out = stream_merge(method, base_dir, expert_dirs, tmp_path / "out", chunk_elems=500, progress=False)
    base = load_all(base_dir)
    assert method._majority == ({"": sign} if prune == "global" else dict.fromkeys(base, sign))
    vecs = tv.task_vectors(base, [load_all(e) for e in expert_dirs])
    groups = [list(base)] if prune == "global" else [[k] for k in base]
    for names in groups:
        trimmed = ties_ops.trim(
            [torch.cat([v[k].flatten() for k in names]) for v in vecs],
            method._thresholds["" if len(groups) == 1 else names[0]],
        )
        assert int((trimmed.sum(0) == 0).logical_and(trimmed.ne(0).any(0)).sum()) > 0  # there are ties to correct
    expected = tv.apply_task_vector(
        base, combine_in_memory(TIES(k=60, prune=prune, disjoint="mean", scaling=0.7), vecs, 500)
    )
    streamed = load_all(out)
    for k, v in expected.items():
        assert torch.equal(streamed[k], v), k


@pytest.mark.parametrize("where", ["merge", "statistics", "write", "read"])
def test_errors_in_the_pipeline_threads_propagate_and_leave_no_output(
    where: str, pool: tuple[Path, list[Path]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from mergelab.io import reader, writer

    base_dir, expert_dirs = pool
    method = TIES(k=30, prune="global") if where == "statistics" else TaskArithmetic(0.3)
    calls = {"n": 0}

    def fail_later(original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 5:
                raise RuntimeError(f"injected failure in {where}")
            return original(*args, **kwargs)

        return wrapped

    if where == "merge":
        monkeypatch.setattr(method, "merge_chunk", fail_later(method.merge_chunk))
    elif where == "statistics":
        monkeypatch.setattr(method, "chunk_statistics", fail_later(method.chunk_statistics))
    elif where == "write":
        monkeypatch.setattr(writer, "_pwrite_all", fail_later(writer._pwrite_all))
        monkeypatch.setattr(writer.ShardedWriter, "STAGING_BYTES", 8192)  # many writes
    else:
        monkeypatch.setattr(reader.LazyCheckpoint, "read_rows_into", fail_later(reader.LazyCheckpoint.read_rows_into))
    threads_before = threading.active_count()
    with pytest.raises(RuntimeError, match=f"injected failure in {where}"):
        stream_merge(method, base_dir, expert_dirs, tmp_path / "out", chunk_elems=256, progress=False)
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".tmp-*"))
    assert threading.active_count() == threads_before  # every reader, worker and writer thread stopped


def test_truncated_shard_is_reported(pool: tuple[Path, list[Path]], tmp_path: Path) -> None:
    import shutil

    base_dir, expert_dirs = pool
    bad = tmp_path / "bad"
    shutil.copytree(expert_dirs[0], bad)
    shard = sorted(bad.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match="is truncated in"):
        stream_merge(TaskArithmetic(0.3), base_dir, [bad, expert_dirs[1]], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-*"))
