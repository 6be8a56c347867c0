"""The conformance matrix: every ``conf/method/*.yaml`` is run through every behaviour test, as configured.

A method is covered by adding its YAML (the PEFT test-table pattern): it must merge the same bytes in memory and
streamed from disk, whatever the chunk size, on the threaded and the sequential executor, compose inside DARE and
AWD exactly as DARE / AWD are defined, and refuse bad option values before any work. A method that merges exactly
one expert (:data:`ONE_EXPERT`) runs every check on the pool's first expert alone.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from mergelab import task_vectors as tv
from mergelab.engine import pipeline, streaming
from mergelab.engine.passes import merge_in_memory
from mergelab.engine.streaming import stream_merge
from mergelab.io.reader import LazyCheckpoint
from mergelab.io.writer import write_checkpoint
from mergelab.methods import AWD, DARE
from mergelab.methods.base import NOT_METHOD_OPTIONS
from mergelab.methods.registry import method_classes
from mergelab.run import method_candidates
from tests.conftest import CONFIG_DIR, TaskDataPool, make_cfg

# Options that change what a method computes, run through the whole matrix as rows of their own:
# "<yaml>+<variant>" -> overrides of that YAML.
VARIANTS = {
    "task_arithmetic+weights": ["method.weights=[-1.0, 0.5, 2.0]"],  # task negation among them
    "weight_averaging+weights": ["method.weights=[1.0, 0.0, 3.0]"],
    "ties+weights": ["method.weights=[0.5, -1.0, 2.0]"],  # negative: subtracted after the election
    "ties+weights-mean": ["method.weights=[0.5, 0.25, 2.0]", "method.disjoint=mean", "method.prune=per_tensor"],
    "slerp+gradient": ["method.t=[{filter: mlp, value: 0.8}, {value: [0.2, 0.6]}]"],  # MergeKit's filter + gradient
    "karcher+pretrained": ["method.include_pretrained=true"],
    # Per-expert densities (MergeKit's per-model density): each task vector ranked or dropped at its own rate.
    "ties+density": ["method.k=[10.0, 30.0, 60.0]"],
    "dare+density": ["method.p=[0.1, 0.5, 0.8]"],
    "breadcrumbs+density": ["method.density=[0.5, 0.8, 1.0]", "method.gamma=[0.05, 0.0, 0.1]"],
    "della+density": ["method.density=[0.5, 1.0, 0.7]", "method.epsilon=[0.2, 0.1, 0.25]"],
}
# Methods defined on the pretrained model and exactly one expert (their class's expert_count: SLERP): their rows use
# a pool of the first expert.
ONE_EXPERT = {name for name, cls in method_classes().items() if getattr(cls, "expert_count", None) == 1}
METHOD_YAMLS = sorted([*(p.stem for p in (CONFIG_DIR / "method").glob("*.yaml")), *VARIANTS])
CPU = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}

# Odd sizes, so row blocks of every chunk size cut tensors unevenly; names that AWD's default include matches.
# They are those of :class:`TinyNet`, so that the methods that learn from data run the experts on examples.
SHAPES = {
    "model.embed.weight": (41, 13),
    "model.layers.0.mlp.weight": (37, 13),
    "model.layers.0.mlp.bias": (37,),
    "model.layers.1.attn.weight": (29, 37),
    "model.norm.weight": (29,),
}


class TinyNet(torch.nn.Module):
    """Token ids [N, L] -> features [N, 29], with the parameters of ``SHAPES``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed = torch.nn.Embedding(41, 13)
        block0, block1 = torch.nn.Module(), torch.nn.Module()
        block0.mlp = torch.nn.Linear(13, 37)
        block1.attn = torch.nn.Linear(37, 29, bias=False)
        self.model.layers = torch.nn.ModuleList([block0, block1])
        self.model.norm = torch.nn.LayerNorm(29, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.gelu(self.model.layers[0].mlp(self.model.embed(ids)))
        return self.model.norm(self.model.layers[1].attn(h)).mean(1)


def method_config(name: str) -> dict[str, Any]:
    """``conf/method/<name>.yaml`` composed as the app composes it (nested defaults, ``${seed}`` resolved)."""
    cfg = make_cfg(Path("/unused"), [f"method={name.split('+')[0]}", *VARIANTS.get(name, [])], tiny=False)
    return OmegaConf.to_container(cfg.method, resolve=True)  # type: ignore[return-value]


def build(name: str) -> Any:
    """The method as configured, built by the app's own path (its candidates without tuning)."""
    ((_, method),) = method_candidates(OmegaConf.create(method_config(name)), False)
    return method


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A bf16 pretrained checkpoint and three experts on disk (several shards), their state dicts, and a delta."""
    root = tmp_path_factory.mktemp("conformance")
    g = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=g).to(torch.bfloat16) for k, s in SHAPES.items()}
    experts = []
    for i in range(3):
        # Task vectors with shared and task-specific parts, some sign conflicts and exact zeros.
        state = {}
        for k, v in base.items():
            tau = 0.05 * torch.randn(v.shape, generator=g) + 0.02 * (i - 1)
            tau[torch.rand(v.shape, generator=g) < 0.1] = 0.0
            state[k] = (v.float() + tau).to(torch.bfloat16)
        experts.append(state)
    base_dir = write_checkpoint(base, root / "base", max_shard_bytes=1500)
    expert_dirs = [write_checkpoint(e, root / f"e{i}", max_shard_bytes=1500) for i, e in enumerate(experts)]
    delta = {k: 0.01 * torch.randn(s, generator=g) for k, s in SHAPES.items() if len(s) == 2 and ".layers." in k}
    save_file(delta, str(root / "delta.safetensors"))
    torch.manual_seed(0)
    heads = {f"task{i}": torch.nn.Linear(29, 3) for i in range(3)}
    data = {}
    for t in heads:
        mask = torch.ones(24, 5, dtype=torch.long)
        mask[::3, 3:] = 0  # some padded examples
        data[t] = (torch.randint(0, 41, (24, 5), generator=g), torch.randint(0, 3, (24,), generator=g), mask)
    full = {
        "base": base,
        "experts": experts,
        "base_dir": base_dir,
        "expert_dirs": expert_dirs,
        "delta": delta,
        "delta_path": str(root / "delta.safetensors"),
        "list_pool": TaskDataPool(base, experts, TinyNet(), heads, data),
    }
    one = {"task0": heads["task0"]}
    full["one_expert"] = {
        **full,
        "experts": experts[:1],
        "expert_dirs": expert_dirs[:1],
        "list_pool": TaskDataPool(base, experts[:1], TinyNet(), one, {"task0": data["task0"]}),
    }
    return full


def pool_for(name: str, pool: dict[str, Any]) -> dict[str, Any]:
    """The pool ``name``'s row runs on: the first expert alone for :data:`ONE_EXPERT` methods, else all three."""
    return pool["one_expert"] if name.split("+")[0] in ONE_EXPERT else pool


_PREPARED: dict[tuple[int, str], Any] = {}


def prepared(name: str, pool: dict[str, Any]) -> Any:
    """The method of ``name``, with whatever it learns (AWD's delta, Fisher diagonals, AdaMerging's coefficients)
    fitted on the pool (:func:`pool_for`), in memory; fitted once per pool (merging does not change a prepared
    method)."""
    pool = pool_for(name, pool)
    key = (id(pool["list_pool"]), name)
    if key not in _PREPARED:
        method = build(name)
        method.prepare(pool["list_pool"], CPU)
        _PREPARED[key] = method
    return _PREPARED[key]


def stream(method: Any, pool: dict[str, Any], out: Path, chunk_elems: int = 100) -> dict[str, torch.Tensor]:
    path = stream_merge(method, pool["base_dir"], pool["expert_dirs"], out, chunk_elems=chunk_elems, progress=False)
    ck = LazyCheckpoint(path)
    try:
        return {k: ck.get(k) for k in ck}
    finally:
        ck.close()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_streamed_equals_in_memory(name: str, pool: dict[str, Any], tmp_path: Path) -> None:
    method, pool = prepared(name, pool), pool_for(name, pool)
    in_memory = method.merge(pool["base"], pool["experts"])
    assert_same(stream(method, pool, tmp_path / "out"), in_memory)
    moved = [k for k in in_memory if not torch.equal(in_memory[k], pool["base"][k])]
    assert moved, "the merge left every tensor at the pretrained weights"


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_chunk_size_does_not_change_the_bytes(name: str, pool: dict[str, Any], tmp_path: Path) -> None:
    method, pool = prepared(name, pool), pool_for(name, pool)
    reference = stream(method, pool, tmp_path / "big", chunk_elems=1 << 20)  # every tensor whole
    for chunk in (7, 64):  # a few rows per block; one row per block for the widest tensors
        assert_same(stream(method, pool, tmp_path / f"c{chunk}", chunk_elems=chunk), reference)


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_threaded_equals_sequential(
    name: str, pool: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    method, pool = prepared(name, pool), pool_for(name, pool)
    monkeypatch.setattr(pipeline, "default_workers", lambda: 4)
    threaded = stream(method, pool, tmp_path / "threaded", chunk_elems=64)
    monkeypatch.setattr(pipeline, "default_workers", lambda: 1)
    assert_same(stream(method, pool, tmp_path / "one_worker", chunk_elems=64), threaded)
    monkeypatch.setattr(streaming, "PIPELINE", False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # and torch's own intra-op threads: one, then two
    try:
        one_thread = stream(method, pool, tmp_path / "one_thread", chunk_elems=64)
        torch.set_num_threads(2)
        sequential = stream(method, pool, tmp_path / "sequential", chunk_elems=64)
    finally:
        torch.set_num_threads(threads)
    assert_same(one_thread, sequential)
    assert_same(threaded, sequential)
    for shard in (tmp_path / "threaded").glob("*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "sequential" / shard.name).read_bytes(), shard.name


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_composes_inside_dare_and_awd(name: str, pool: dict[str, Any]) -> None:
    method, pool = prepared(name, pool), pool_for(name, pool)
    vectors = tv.task_vectors(pool["base"], pool["experts"])
    # A method on the models' weights (SLERP, Karcher) composes too: M on theta_0 + the transformed tau_t, so it is
    # handed the pretrained weights the vectors were formed against.
    base = pool["base"] if method.needs_base else None

    # DARE(merge=M) is M on the dropped-and-rescaled task vectors (DARE's own masks).
    dare = DARE(p=0.3, seed=1, merge=method)
    expected = method.combine(dare.drop(vectors), base=base)
    assert_same(dare.combine(vectors, base=base), expected)

    # AWD(merge=M) is M on tau_t - delta (delta given, so nothing is fitted).
    awd = AWD(merge=method, delta_path=pool["delta_path"])
    hats = [{k: v - pool["delta"][k] if k in pool["delta"] else v for k, v in t.items()} for t in vectors]
    assert_same(awd.combine(vectors, base=base), method.combine(hats, base=base))


def bad_values(node: dict[str, Any]) -> list[tuple[str, Any]]:
    """For each scalar option of a method config: values no option of that type accepts (for a number also a word,
    as a mistyped command-line override gives one)."""
    out = []
    for key, value in node.items():
        if key in NOT_METHOD_OPTIONS or key.startswith("_") or isinstance(value, bool):
            continue
        if isinstance(value, int | float):
            out.append((key, "abc"))
        if isinstance(value, float):
            out.append((key, math.nan))
        elif isinstance(value, str) and not value.startswith("/"):
            out.append((key, "no-such-choice"))
    return out


@pytest.mark.parametrize("name", METHOD_YAMLS)
def test_bad_options_are_refused_naming_the_option(name: str) -> None:
    node = method_config(name)
    cases = bad_values(node)
    for key, value in node.items():  # and inside the method it wraps, if any
        if isinstance(value, dict) and "_target_" in value:
            cases += [(f"{key}.{k}", v) for k, v in bad_values(value)]
    for key, value in cases:
        bad = copy.deepcopy(node)
        *path, leaf = key.split(".")
        target = bad
        for part in path:
            target = target[part]
        target[leaf] = value
        with pytest.raises(ValueError, match=leaf):
            method_candidates(OmegaConf.create(bad), False)


def test_the_matrix_covers_every_method_yaml() -> None:
    assert {"task_arithmetic", "ties", "dare", "metagpt", "awd", "consensus", "magnitude_pruned_ta"} <= set(
        METHOD_YAMLS
    )


@pytest.mark.parametrize(
    ("name", "key", "value", "message"),
    [
        ("awd", "steps", 2.5, "option 'steps' must be a whole number, got 2.5"),
        ("awd", "merge.scaling", "abc", "option 'merge.scaling' must be a number, got 'abc'"),
        ("dare", "seed", None, "option 'seed' must be a number, got None"),
        ("ties", "scaling", True, "option 'scaling' must be a number, got True"),
    ],
)
def test_option_types_follow_the_constructor(name: str, key: str, value: Any, message: str) -> None:
    """The types come from each method's ``__init__`` annotations, nested methods included (``merge.*``)."""
    node = method_config(name)
    *path, leaf = key.split(".")
    target = node
    for part in path:
        target = target[part]
    target[leaf] = value
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        method_candidates(OmegaConf.create(node), False)


# Rows whose options are per expert (one value per expert of the three-expert pool).
PER_EXPERT_ROWS = sorted(n for n in VARIANTS if n not in {"slerp+gradient", "karcher+pretrained"})


@pytest.mark.parametrize("name", sorted(n for n in METHOD_YAMLS if n.split("+")[0] in ONE_EXPERT) + PER_EXPERT_ROWS)
def test_a_pool_the_method_cannot_merge_is_refused_on_every_way_in(
    name: str, pool: dict[str, Any], tmp_path: Path
) -> None:
    """Direct calls of the engine (not only the run and the CLI) refuse the pool before any pass, writing nothing:
    a one-expert method given three experts, per-expert options given a pool of two."""
    one = name.split("+")[0] in ONE_EXPERT
    n = 3 if one else 2
    count, option = r"exactly one expert .* the pool has 3 experts", r"method option '\w+' has 3 values for 2 experts"
    message = count if one else option
    method = build(name)
    with pytest.raises(ValueError, match=message):
        merge_in_memory(method, pool["base"], pool["experts"][:n])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        stream_merge(method, pool["base_dir"], pool["expert_dirs"][:n], out, progress=False)
    assert not out.exists() and not list(tmp_path.iterdir())
