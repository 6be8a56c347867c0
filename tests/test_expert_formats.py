"""Experts as people have them: PEFT LoRA adapters (in every pool, in memory and streamed) and PyTorch ``.bin``
checkpoints (single and sharded, read with ``weights_only``).

Adapters are made here by PEFT itself on tiny random models, their "training" a seeded draw of every LoRA factor and
saved head; each is checked against PEFT's own ``merge_and_unload()`` saved as a full checkpoint (its twin)."""

from __future__ import annotations

import gc
import json
import logging
import pathlib
import re
import shutil
import weakref
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    CLIPModel,
    CLIPVisionModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from mergelab.callbacks import MergeCallback
from mergelab.causal_lm.pool import CausalLMPool
from mergelab.causal_lm.suite import GenerativeSuite
from mergelab.engine.streaming import stream_merge
from mergelab.io import reader
from mergelab.io.adapters import ROW_TILE, AdapterCheckpoint
from mergelab.io.files import ALIGN, aligned_empty
from mergelab.io.reader import BinCheckpoint, LazyCheckpoint, open_checkpoint
from mergelab.methods import TIES, TaskArithmetic
from mergelab.pools.checkpoint import CheckpointPool
from mergelab.run import run
from mergelab.text.pool import ClassifierPool, load_model
from mergelab.text.suite import TextClassificationSuite
from tests.conftest import make_cfg
from tests.test_causal_lm import ECHO, write_suite
from tests.test_run_flow import byte_tokenizer
from tests.test_vision import TASKS, assets, make_pool  # noqa: F401  (assets: the tiny CLIP fixture)

TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}
EMBEDDED = Path(__file__).resolve().parents[1] / "data" / "embedded"

# ----------------------------------------------------------------------------------------------- helpers


def train(model: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    """Stand-in for fine-tuning: every LoRA factor and every module PEFT saves whole gets seeded random values
    (PEFT initialises B to zero, which would make every adapter a no-op)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def make_adapter(model: torch.nn.Module, config: LoraConfig, seed: int, adapter: Path, twin: Path) -> Any:
    """Save PEFT's adapter of ``model`` to ``adapter`` and its ``merge_and_unload()`` (the reference) to ``twin``."""
    peft = get_peft_model(model, config)
    train(peft, seed)
    peft.save_pretrained(adapter)
    merged = peft.merge_and_unload()
    merged.save_pretrained(twin)
    return merged


def llama_config(vocab: int = 64, hidden: int = 32) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


def all_tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = False) -> None:
    assert set(a) == set(b)
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


# Adapters of the tiny Llama: plain LoRA with a LoRA'd embedding (which PEFT also saves whole) and a head saved whole
# (modules_to_save); rsLoRA with per-module ranks and alphas.
LLAMA_ADAPTERS = {
    "plain": LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    ),
    "rslora": LoraConfig(
        r=4,
        lora_alpha=6,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"],
        rank_pattern={"layers.0.self_attn.q_proj": 2, "up_proj": 8},
        alpha_pattern={"o_proj": 3.0},
    ),
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny Llama (sharded safetensors, with a byte tokenizer) and LoRA adapters of it, each with its twin."""
    root = tmp_path_factory.mktemp("lora_llama")
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config(vocab=len(tokenizer)))
    base.save_pretrained(root / "base", max_shard_size="100KB")
    tokenizer.save_pretrained(root / "base")
    adapters, twins = {}, {}
    for i, (name, cfg) in enumerate(LLAMA_ADAPTERS.items()):
        adapters[name], twins[name] = root / f"{name}_adapter", root / f"{name}_twin"
        make_adapter(AutoModelForCausalLM.from_pretrained(root / "base"), cfg, i + 1, adapters[name], twins[name])
    return SimpleNamespace(root=root, base=root / "base", adapters=adapters, twins=twins, tokenizer=tokenizer)


# --------------------------------------------------------------------------------- LoRA adapters, streamed


def test_adapter_dirs_are_read_as_peft_writes_them(llama: SimpleNamespace) -> None:
    names = set(load_file(str(llama.adapters["plain"] / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert {"base_model.model.model.embed_tokens.lora_embedding_A", "base_model.model.lm_head.weight"} <= names
    assert "base_model.model.model.embed_tokens.base_layer.weight" in names  # PEFT saves a LoRA'd embedding whole
    assert not (llama.adapters["plain"] / "config.json").exists()


@pytest.mark.parametrize("name", list(LLAMA_ADAPTERS))
def test_a_streamed_adapter_expert_is_its_merged_and_unloaded_twin(llama: SimpleNamespace, name: str) -> None:
    base = LazyCheckpoint(llama.base, name="pretrained")
    expert = open_checkpoint(llama.adapters[name], name=name, base=base)
    twin = LazyCheckpoint(llama.twins[name])
    assert isinstance(expert, AdapterCheckpoint)
    changed = []
    for k in base:
        assert expert.dtype(k) == base.dtype(k) and expert.shape(k) == base.shape(k)
        torch.testing.assert_close(expert[k], twin[k], atol=1e-6, rtol=1e-5, msg=k)
        if not torch.equal(twin[k], base[k]):
            changed.append(k)
    # Every adapted module moved, and nothing else: the test compares experts that differ from the base.
    targets = LLAMA_ADAPTERS[name].target_modules | set(LLAMA_ADAPTERS[name].modules_to_save or ())
    assert changed == [k for k in base if any(f"{t}." in k for t in targets)]
    assert len(changed) >= 7
    expert.close()
    base.close()


def test_rslora_and_patterns_are_what_make_the_twin(llama: SimpleNamespace, tmp_path: Path) -> None:
    # The same factors read with plain scaling (no rsLoRA) or without the alpha pattern give another expert.
    base = LazyCheckpoint(llama.base, name="pretrained")
    twin = LazyCheckpoint(llama.twins["rslora"])
    key = "model.layers.0.self_attn.o_proj.weight"
    for change, want_scale in (
        ({"use_rslora": False}, 3.0 / 4),  # alpha_pattern's 3 over r=4
        ({"alpha_pattern": {}}, 6.0 / 2),  # lora_alpha 6 over sqrt(4)
    ):
        edited = tmp_path / f"edited-{next(iter(change))}"
        shutil.copytree(llama.adapters["rslora"], edited)
        cfg = json.loads((edited / "adapter_config.json").read_text())
        (edited / "adapter_config.json").write_text(json.dumps({**cfg, **change}))
        expert = open_checkpoint(edited, name="edited", base=base)
        assert isinstance(expert, AdapterCheckpoint)
        assert expert.deltas[key].scaling == pytest.approx(want_scale)
        assert not torch.allclose(expert[key], twin[key], atol=1e-4)
    right = open_checkpoint(llama.adapters["rslora"], name="rslora", base=base)
    assert isinstance(right, AdapterCheckpoint)
    assert right.deltas[key].scaling == pytest.approx(3.0 / 2)  # alpha 3 (pattern) / sqrt(4)
    assert right.deltas["model.layers.0.self_attn.q_proj.weight"].scaling == pytest.approx(6.0 / 2**0.5)  # r=2
    assert right.deltas["model.layers.1.mlp.up_proj.weight"].left.shape[1] == 8  # rank_pattern's rank
    # A config whose rank is not the factors' is refused, naming the tensor.
    edited = tmp_path / "no-rank-pattern"
    shutil.copytree(llama.adapters["rslora"], edited)
    cfg = json.loads((edited / "adapter_config.json").read_text())
    (edited / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {}}))
    with pytest.raises(
        ValueError, match=r"PEFT adapter .*no-rank-pattern: tensors '.*lora_A.weight' .*not have the rank 4"
    ):
        open_checkpoint(edited, name="edited", base=base)


def test_merging_adapter_experts_streamed_equals_merging_their_twins(llama: SimpleNamespace, tmp_path: Path) -> None:
    adapters = {k: str(v) for k, v in llama.adapters.items()}
    twins = {k: str(v) for k, v in llama.twins.items()}
    for method in (TaskArithmetic(scaling=0.7), TIES(k=30, scaling=0.5)):
        name = type(method).__name__
        got = CheckpointPool(str(llama.base), adapters).write_merged(method, tmp_path / f"adapters-{name}")
        want = CheckpointPool(str(llama.base), twins).write_merged(method, tmp_path / f"twins-{name}")
        merged, reference = all_tensors(got), all_tensors(want)
        assert_same_tensors(merged, reference)
        base = all_tensors(llama.base)
        assert not torch.allclose(
            merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"]
        )
        assert (got / "tokenizer.json").is_file() and (got / "config.json").is_file()


def test_a_merge_only_run_with_adapter_experts_writes_the_twins_merge(llama: SimpleNamespace, tmp_path: Path) -> None:
    spec = "{" + ",".join(f"{k}:'{v}'" for k, v in llama.adapters.items()) + "}"
    overrides = ["model=checkpoints", f"model.pretrained={llama.base}", f"model.experts={spec}", "eval=none"]
    run(make_cfg(tmp_path / "run", [*overrides, "logger=none", "method=task_arithmetic"], tiny=False))
    twins = {k: str(v) for k, v in llama.twins.items()}
    want = CheckpointPool(str(llama.base), twins).write_merged(TaskArithmetic(scaling=0.3), tmp_path / "twins")
    assert_same_tensors(all_tensors(tmp_path / "run" / "merged_model"), all_tensors(want))
    recipe = json.loads((tmp_path / "run" / "merged_model" / "mergelab_recipe.json").read_text())
    # MergeKit would read an adapter dir as a whole model: no MergeKit config, and the recipe says why.
    assert recipe["mergekit"]["file"] is None and "is a PEFT adapter" in recipe["mergekit"]["reason"]
    assert not (tmp_path / "run" / "merged_model" / "mergekit_config.yml").exists()


def test_row_blocks_of_an_adapter_expert_are_the_whole_tensor_bytes(llama: SimpleNamespace, tmp_path: Path) -> None:
    base = LazyCheckpoint(llama.base, name="pretrained")
    expert = open_checkpoint(llama.adapters["plain"], name="plain", base=base)
    for k in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        whole = expert.get_rows(k)
        rows = whole.shape[0]
        for step in (1, 5, ROW_TILE - 1, ROW_TILE + 3):
            blocks = [expert.get_rows(k, s, s + step) for s in range(0, rows, step)]
            assert torch.equal(torch.cat(blocks), whole), (k, step)
            s, e = min(7, rows - 1), min(7 + step, rows)
            buf = aligned_empty(expert.block_nbytes(k, s, e) + 2 * ALIGN)
            assert torch.equal(expert.read_rows_into(k, s, e, buf), whole[s:e]), (k, step)
    # Streamed in odd row blocks or whole tensors, the merge writes the same bytes.
    experts = [llama.adapters["plain"], llama.adapters["rslora"]]
    small = stream_merge(TaskArithmetic(scaling=0.4), llama.base, experts, tmp_path / "small", chunk_elems=48)
    whole_out = stream_merge(TaskArithmetic(scaling=0.4), llama.base, experts, tmp_path / "whole", chunk_elems=None)
    assert_same_tensors(all_tensors(small), all_tensors(whole_out), exact=True)


def test_adapter_naming_another_base_is_applied_to_the_pools_with_a_warning(
    llama: SimpleNamespace, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    named = {}
    for base_name in ("someone/other-model", "meta/base"):
        d = tmp_path / base_name.replace("/", "_")
        shutil.copytree(llama.adapters["plain"], d)
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base_name}))
        named[base_name] = d
    with caplog.at_level(logging.WARNING, logger="mergelab.io.adapters"):
        CheckpointPool(str(llama.base), {"other": str(named["someone/other-model"])}).setup(None, {})
        CheckpointPool(str(llama.base), {"same": str(named["meta/base"])}).setup(None, {})  # same model name
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1
    assert "'someone/other-model'" in warned[0] and str(llama.base) in warned[0] and "applied to" in warned[0]


def test_fan_in_fan_out_adapters_of_gpt2_conv1d_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    make_adapter(model, lora, 3, tmp_path / "adapter", tmp_path / "twin")
    base = LazyCheckpoint(tmp_path / "base", name="pretrained")
    expert = open_checkpoint(tmp_path / "adapter", name="gpt2", base=base)
    twin = LazyCheckpoint(tmp_path / "twin")
    key = "transformer.h.0.attn.c_attn.weight"
    assert base.shape(key) == (32, 96)  # Conv1D stores (in, out): the task vector is (B @ A)^T
    assert not torch.allclose(twin[key], base[key])
    for k in base:
        torch.testing.assert_close(expert[k], twin[k], atol=1e-6, rtol=1e-5, msg=k)


# ------------------------------------------------------------------------------ LoRA adapters, in memory


def test_causal_lm_pool_adapter_experts_match_their_twins_and_the_streamed_merge(
    llama: SimpleNamespace, tmp_path: Path
) -> None:
    rows = [{"text": "The cat sat on the", "answer": "x"}]
    suite_dir = write_suite(tmp_path / "suite", {"plain": ECHO, "rslora": ECHO}, {"plain": rows, "rslora": rows})
    suite = GenerativeSuite("s", str(suite_dir), ["plain", "rslora"], batch_size=2)

    def pool_of(experts: dict[str, Path]) -> CausalLMPool:
        pool = CausalLMPool(str(llama.base), experts={k: str(v) for k, v in experts.items()}, cache_dir=str(tmp_path))
        pool.setup(suite, TRAINER)
        return pool

    adapters, twins = pool_of(llama.adapters), pool_of(llama.twins)
    for mine, theirs in zip(adapters.expert_states(), twins.expert_states(), strict=True):
        assert_same_tensors(dict(mine), dict(theirs))
    # The same LoRA arithmetic in memory as streamed: the in-memory merge is the streamed one, byte for byte.
    method = TaskArithmetic(scaling=0.7)
    in_memory = MergeCallback(method, adapters).merged_state()
    streamed = all_tensors(
        CheckpointPool(str(llama.base), {k: str(v) for k, v in llama.adapters.items()}).write_merged(
            method, tmp_path / "streamed"
        )
    )
    assert_same_tensors(dict(in_memory), streamed, exact=True)
    # A malformed adapter gets the adapter's error in an in-memory pool too.
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(llama.adapters["plain"] / "adapter_config.json", broken)
    with pytest.raises(FileNotFoundError, match=r"expert 'plain'.*is a PEFT adapter \(adapter_config.json\) without"):
        pool_of({"plain": broken, "rslora": llama.adapters["rslora"]})


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A tiny BERT (a BertModel dir with a character tokenizer) and classifier LoRA experts of it for the embedded
    suite's 3-label tweet_sentiment: one saving its head (task_type SEQ_CLS), one without (no head)."""
    root = tmp_path_factory.mktemp("lora_bert")
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars)]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"))
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    BertModel(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    out = SimpleNamespace(root=root, base=root / "base")
    for name, task_type in (("headed", "SEQ_CLS"), ("headless", None)):
        model = AutoModelForSequenceClassification.from_pretrained(root / "base", num_labels=3)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type=task_type)
        make_adapter(model, lora, 7, root / f"{name}_adapter", root / f"{name}_twin")
        tokenizer.save_pretrained(root / f"{name}_twin")
        setattr(out, name, root / f"{name}_adapter")
        setattr(out, f"{name}_twin", root / f"{name}_twin")
    return out


def test_classifier_pool_lora_expert_with_its_saved_head_scores_as_its_twin(bert: SimpleNamespace) -> None:
    assert "base_model.model.classifier.weight" in load_file(str(bert.headed / "adapter_model.safetensors"))
    suite = TextClassificationSuite("embedded", str(EMBEDDED), ["tweet_sentiment"], batch_size=16, max_eval_examples=32)
    pools = {}
    for kind, path in (("adapter", bert.headed), ("twin", bert.headed_twin)):
        pools[kind] = ClassifierPool(str(bert.base), experts={"tweet_sentiment": str(path)}, cache_dir=str(bert.root))
        pools[kind].setup(suite, TRAINER)
    mine, theirs = pools["adapter"], pools["twin"]
    assert_same_tensors(dict(mine.expert_states()[0]), dict(theirs.expert_states()[0]))
    base = mine.pretrained_state()
    assert not torch.allclose(
        mine.expert_states()[0]["encoder.layer.0.attention.self.query.weight"],
        base["encoder.layer.0.attention.self.query.weight"],
    )
    head = mine.expert_model("tweet_sentiment").task_models["tweet_sentiment"]
    twin_head = theirs.expert_model("tweet_sentiment").task_models["tweet_sentiment"]
    assert head.config.num_labels == 3
    assert torch.equal(head.classifier.weight, twin_head.classifier.weight)
    batch = mine.task_batches("tweet_sentiment", "test", 32, 16, seed=0)[0]
    with torch.no_grad():
        logits = mine.task_logits(mine.expert_model("tweet_sentiment"), "tweet_sentiment", batch)
        want = theirs.task_logits(theirs.expert_model("tweet_sentiment"), "tweet_sentiment", batch)
    torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-4)
    scores = mine.evaluate(mine.expert_model("tweet_sentiment"), "test", TRAINER)
    assert scores == theirs.evaluate(theirs.expert_model("tweet_sentiment"), "test", TRAINER)


def test_classifier_lora_expert_without_its_head_is_refused(bert: SimpleNamespace) -> None:
    suite = TextClassificationSuite("embedded", str(EMBEDDED), ["tweet_sentiment"], max_eval_examples=8)
    pool = ClassifierPool(str(bert.base), experts={"tweet_sentiment": str(bert.headless)}, cache_dir=str(bert.root))
    with pytest.raises(ValueError, match=r"expert 'tweet_sentiment'.*headless_adapter has no classification head"):
        pool.setup(suite, TRAINER)


def test_clip_vision_pool_lora_experts_of_a_vision_model_and_of_a_whole_clip(
    assets: SimpleNamespace,  # noqa: F811
    tmp_path: Path,
) -> None:
    # mnist: an adapter of a CLIPVisionModel; svhn: of a whole CLIPModel, text tower LoRA'd too (which is ignored).
    vision = CLIPVisionModel(assets.clip.config.vision_config)
    vision.load_state_dict(assets.clip.vision_model.state_dict())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"])
    twin_mnist = make_adapter(vision, lora, 11, tmp_path / "mnist", tmp_path / "mnist_twin")
    clip = CLIPModel(assets.clip.config)
    clip.load_state_dict(assets.clip.state_dict())
    twin_svhn = make_adapter(
        clip,
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "fc2"]),
        12,
        tmp_path / "svhn",
        tmp_path / "svhn_twin",
    )
    assets.experts = {"mnist": str(tmp_path / "mnist"), "svhn": str(tmp_path / "svhn")}
    pool = make_pool(assets, tmp_path / "cache")
    want = [twin_mnist.state_dict(), twin_svhn.vision_model.state_dict()]
    for task, mine, theirs in zip(TASKS, pool.expert_states(), want, strict=True):
        assert_same_tensors(dict(mine), {k: v for k, v in theirs.items() if k in mine})
        key = "encoder.layers.0.self_attn.q_proj.weight"
        assert not torch.allclose(mine[key], pool.pretrained_state()[key]), task


# ----------------------------------------------------------------------------------------- .bin checkpoints


def to_bin(src: Path, dst: Path, shards: int, legacy_shard: int | None = None) -> Path:
    """``src``'s tensors as PyTorch pickles: ``pytorch_model.bin`` (one shard) or ``shards`` shards and an index;
    shard number ``legacy_shard`` in torch's pre-zip format (not memory-mappable)."""
    state = all_tensors(src)
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst)
    names = list(state)
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    weight_map = {}
    for i in range(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        part = {k: state[k] for k in names[i::shards]}
        torch.save(part, dst / fname, _use_new_zipfile_serialization=i != legacy_shard)
        weight_map.update(dict.fromkeys(part, fname))
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_bin_experts_stream_as_their_safetensors_twins(
    llama: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base_bin = to_bin(llama.base, tmp_path / "base_bin", shards=3, legacy_shard=1)
    shutil.copy(llama.base / "tokenizer.json", base_bin)
    experts_bin = {
        "plain": str(to_bin(llama.twins["plain"], tmp_path / "plain_bin", shards=3)),
        "rslora": str(to_bin(llama.twins["rslora"], tmp_path / "rslora_bin", shards=1)),
    }
    # One shard of a .bin checkpoint in memory at a time: a shard is loaded only once the previous one is dropped.
    live: dict[Path, list[Any]] = {}
    worst = []
    load = reader.load_bin

    class Shard(dict):  # weak-referenceable, to see when a shard is freed
        pass

    def tracked(path: Path, name: str | None = None) -> dict[str, torch.Tensor]:
        refs = live.setdefault(path.parent, [])
        refs[:] = [r for r in refs if r() is not None]
        worst.append(len(refs))
        shard = Shard(load(path, name))
        refs.append(weakref.ref(shard))
        return shard

    monkeypatch.setattr(reader, "load_bin", tracked)
    for method in (TaskArithmetic(scaling=0.7), TIES(k=30, scaling=0.5)):
        name = type(method).__name__
        got = CheckpointPool(str(base_bin), experts_bin).write_merged(method, tmp_path / f"bin-{name}")
        twins = {k: str(v) for k, v in llama.twins.items()}
        want = CheckpointPool(str(llama.base), twins).write_merged(method, tmp_path / f"st-{name}")
        assert_same_tensors(all_tensors(got), all_tensors(want), exact=True)
        assert (got / "tokenizer.json").is_file()
    assert len(worst) > 6 and max(worst) == 0  # shards were loaded, each with no other shard of its checkpoint alive
    gc.collect()


def test_bin_reader_checks_its_index_and_serves_rows(llama: SimpleNamespace, tmp_path: Path) -> None:
    ck = BinCheckpoint(to_bin(llama.base, tmp_path / "bin", shards=2), name="b")
    ref = LazyCheckpoint(llama.base)
    assert sorted(ck) == sorted(ref)
    k = "model.embed_tokens.weight"
    assert ck.dtype(k) == torch.float32 and ck.shape(k) == ref.shape(k)
    assert torch.equal(ck.get_rows(k, 3, 9), ref.get_rows(k, 3, 9))
    assert ck.block_nbytes(k, 3, 9) == ref.block_nbytes(k, 3, 9)
    index = tmp_path / "bin" / "pytorch_model.bin.index.json"
    data = json.loads(index.read_text())
    moved = next(iter(data["weight_map"]))
    data["weight_map"][moved] = (
        "pytorch_model-00002-of-00002.bin"
        if data["weight_map"][moved].startswith("pytorch_model-00001")
        else "pytorch_model-00001-of-00002.bin"
    )
    index.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=rf"tensor '{moved}' is in shard .*, but .*index.json maps it to"):
        BinCheckpoint(tmp_path / "bin", name="b")


class Evil:
    """A pickle that would create ``marker`` when loaded by a plain unpickler."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (pathlib.Path.touch, (self.marker,))


def test_a_bin_holding_a_non_tensor_object_is_refused_everywhere(llama: SimpleNamespace, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(llama.twins["plain"] / "config.json", evil)
    state = all_tensors(llama.twins["plain"])
    torch.save({**state, "model.norm.weight": Evil(marker)}, evil / "pytorch_model.bin")
    # Streamed: refused naming the file, nothing run.
    with pytest.raises(ValueError, match=rf"{evil / 'pytorch_model.bin'} is refused: .*getattr.*it was not run"):
        CheckpointPool(str(llama.base), {"evil": str(evil)}).setup(None, {})
    # In memory (transformers' loader, with weights_only): refused too; the same file without the object loads.
    with pytest.raises(OSError, match=r"cannot load expert 'evil' .*Weights only load failed"):
        load_model(AutoModelForCausalLM, "expert 'evil'", str(evil), False)
    assert not marker.exists()
    torch.save(state, evil / "pytorch_model.bin")
    model = load_model(AutoModelForCausalLM, "expert 'evil'", str(evil), False)
    assert torch.equal(model.state_dict()["model.norm.weight"], state["model.norm.weight"])


# ---------------------------------------------------------------------------------- malformed adapter dirs


def edit_adapter(
    src: Path,
    dst: Path,
    config: dict[str, Any] | None = None,
    rename: tuple[str, str] | None = None,
    drop: str | None = None,
) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        (dst / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if rename or drop:
        weights = load_file(str(dst / "adapter_model.safetensors"))
        if rename:
            weights = {k.replace(*rename): v for k, v in weights.items()}
        if drop:
            weights = {k: v for k, v in weights.items() if drop not in k}
        save_file(weights, str(dst / "adapter_model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def wide_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of a wider Llama (hidden 48): same names as the pool's, other shapes."""
    root = tmp_path_factory.mktemp("wide")
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(hidden=48))
    make_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]), 5, root / "adapter", root / "twin")
    return root / "adapter"


def bad_adapters(src: Path, root: Path, wide: Path) -> dict[str, tuple[Path, str]]:
    """name -> (adapter dir, the error it must get)."""
    only_config = root / "only_config"
    only_config.mkdir()
    shutil.copy(src / "adapter_config.json", only_config)
    only_weights = root / "only_weights"
    only_weights.mkdir()
    shutil.copy(src / "adapter_model.safetensors", only_weights)
    both = edit_adapter(src, root / "both")
    shutil.copy(src / "adapter_model.safetensors", both / "model.safetensors")
    return {
        "config only": (
            only_config,
            r"only_config is a PEFT adapter \(adapter_config.json\) without its weights: no "
            r"adapter_model.safetensors or adapter_model.bin",
        ),
        "weights only": (
            only_weights,
            r"only_weights is a PEFT adapter that holds adapter_model.safetensors but has no adapter_config.json",
        ),
        "DoRA": (edit_adapter(src, root / "dora", {"use_dora": True}), r"adapter_config.json: use_dora: True is not"),
        "IA3": (edit_adapter(src, root / "ia3", {"peft_type": "IA3"}), r"peft_type 'IA3' is not LoRA"),
        "no rank": (edit_adapter(src, root / "norank", {"r": 0}), r"adapter_config.json: r must be a positive"),
        "modules_to_save only": (
            edit_adapter(src, root / "saved_only", drop="lora_"),
            r"saved_only: holds no LoRA weights .*'base_model.model.lm_head.weight'.*modules_to_save-only",
        ),
        "unknown module": (
            edit_adapter(src, root / "renamed", rename=("layers.1.self_attn.q_proj", "layers.1.self_attn.qq_proj")),
            r"renamed: tensor 'base_model.model.model.layers.1.self_attn.qq_proj.lora_A.weight' .*matches no tensor",
        ),
        "other shapes": (
            wide,
            r"tensor '.*q_proj.lora_A.weight' gives a task vector of shape \(48, 48\) .* \(32, 32\)",
        ),
        "adapter and model": (both, r"both holds both a full checkpoint \(safetensors\) and a PEFT adapter"),
    }


def test_malformed_adapter_dirs_get_the_adapters_own_error(
    llama: SimpleNamespace, wide_adapter: Path, tmp_path: Path
) -> None:
    for what, (path, match) in bad_adapters(llama.adapters["plain"], tmp_path, wide_adapter).items():
        with pytest.raises((ValueError, FileNotFoundError)) as info:
            CheckpointPool(str(llama.base), {"x": str(path)}).setup(None, {})
        message = str(info.value)
        assert "\n" not in message, what
        assert "PEFT adapter" in message and "no model.safetensors" not in message, (what, message)
        assert re.search(match, message), (what, message)
