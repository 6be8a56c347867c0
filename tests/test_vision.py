"""CLIP vision pools and the zero-shot image suite, offline: a tiny random CLIP built here, generated digit images.

Checked against independent computations: the heads (text features one prompt at a time), the accuracy (images read
from the parquet files and classified one at a time), the merged weights (task arithmetic from the saved files); plus
the heads' cache, what is merged, bad input, and the real CLI end to end (one method, then the AWD table preset with
the paper report).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import datasets
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionModel,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

from mergelab.callbacks import MergeCallback
from mergelab.methods import TaskArithmetic
from mergelab.reports.paper.cli import main as report_main
from mergelab.reports.paper.schema import load_table
from mergelab.run import build, run
from mergelab.vision import pool as vision
from mergelab.vision.pool import CLIPVisionPool
from mergelab.vision.suite import ZeroShotImageSuite
from tests.conftest import make_cfg

TRAINER = {"accelerator": "cpu", "enable_progress_bar": False}
TASKS = ["mnist", "svhn"]  # named as the AWD table's columns, so the paper report can place them
CLASSES = ["0", "1", "2"]  # the datasets' ClassLabel names
# mnist's tasks.yaml entry overrides its class names; svhn uses the ClassLabel names.
CLASSNAMES = {"mnist": ["zero", "one", "two"], "svhn": CLASSES}
TEMPLATES = {
    "mnist": ['a photo of the number: "{classname}".', "a drawing of a {classname}."],
    "svhn": ["house number {classname}", "a photo of the digit {classname}.", "the number {classname}!"],
}


# ------------------------------------------------------------------------------------------ fixtures


def tiny_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer without merges: every character is a token (enough for plumbing)."""
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    return CLIPTokenizer(vocab=vocab, merges=[])


def tiny_clip(tokenizer: CLIPTokenizer) -> CLIPModel:
    torch.manual_seed(0)
    eos = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "bos_token_id": tokenizer.convert_tokens_to_ids("<|startoftext|>"),
            "eos_token_id": eos,
            "pad_token_id": eos,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    clip = CLIPModel(config).eval()
    with torch.no_grad():  # larger vision weights: a random tower's predictions then depend on the image
        for p in clip.vision_model.parameters():
            if p.dim() == 2:
                p.mul_(5.0)
    return clip


def perturbed(state: dict[str, torch.Tensor], seed: int, std: float = 0.05) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + std * torch.randn(v.shape, generator=gen) for k, v in state.items()}


def digit_image(digit: str, style: str, rng: np.random.Generator) -> Image.Image:
    """A digit drawn at a random place: white on black (mnist) or dark on a random colour (svhn)."""
    size = 40
    if style == "mnist":
        img = Image.new("L", (size, size), 0)
        ink: Any = 255
    else:
        img = Image.new("RGB", (size, size), tuple(int(x) for x in rng.integers(80, 256, 3)))
        ink = tuple(int(x) for x in rng.integers(0, 60, 3))
    draw = ImageDraw.Draw(img)
    x, y = (int(v) for v in rng.integers(4, 24, 2))
    draw.text((x, y), digit, fill=ink)
    draw.rectangle((x - 2, y - 2, x + 10, y + 14), outline=ink)  # a frame so the shapes differ more than the glyph
    return img


def write_dataset(root: Path, style: str, seed: int, per_class: int = 4) -> Path:
    """A local ``datasets`` dir: {train,validation,test}.parquet with an Image column, a ClassLabel label and an id."""
    rng = np.random.default_rng(seed)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES), "id": datasets.Value("int64")}
    )
    root.mkdir(parents=True)
    for split in ("train", "validation", "test"):
        rows = [(digit_image(c, style, rng), i) for i, c in enumerate(CLASSES) for _ in range(per_class)]
        ds = datasets.Dataset.from_dict(
            {"image": [r[0] for r in rows], "label": [r[1] for r in rows], "id": list(range(len(rows)))},
            features=features,
        )
        ds.to_parquet(str(root / f"{split}.parquet"))
    return root


def write_suite(root: Path, data: dict[str, Path], **changes: dict[str, Any]) -> Path:
    """A suite dir whose tasks.yaml points at the local datasets (``changes``: per-task entry overrides)."""
    tasks = {
        t: {
            "dataset": str(data[t]),
            "splits": {"validation": "validation", "test": "test"},
            "image_column": "image",
            "label_column": "label",
            "templates": TEMPLATES[t],
            **({"classnames": CLASSNAMES[t]} if CLASSNAMES[t] != CLASSES else {}),
            **changes.get(t, {}),
        }
        for t in TASKS
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / "tasks.yaml").write_text(yaml.safe_dump({"tasks": tasks}, sort_keys=False))
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A pretrained CLIP dir, two experts (a CLIPVisionModel dir; a whole CLIPModel dir whose text tower also moved)
    and a two-task suite of generated digits."""
    root = tmp_path_factory.mktemp("clip")
    tokenizer = tiny_tokenizer()
    clip = tiny_clip(tokenizer)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pre = root / "clip"
    clip.save_pretrained(pre)
    tokenizer.save_pretrained(pre)
    processor.save_pretrained(pre)
    base = {k: v.clone() for k, v in clip.vision_model.state_dict().items()}

    mnist = CLIPVisionModel(clip.config.vision_config).eval()
    mnist.load_state_dict(perturbed(base, 1))
    mnist.save_pretrained(root / "expert_mnist")
    svhn = tiny_clip(tokenizer)
    svhn.load_state_dict(clip.state_dict())
    svhn.vision_model.load_state_dict(perturbed(base, 2))
    svhn.text_model.load_state_dict(perturbed(dict(clip.text_model.state_dict()), 3))  # must be ignored
    svhn.save_pretrained(root / "expert_svhn")

    data = {
        "mnist": write_dataset(root / "data_mnist", "mnist", 0),
        "svhn": write_dataset(root / "data_svhn", "svhn", 1),
    }
    return SimpleNamespace(
        root=root,
        pretrained=pre,
        experts={"mnist": str(root / "expert_mnist"), "svhn": str(root / "expert_svhn")},
        data=data,
        suite=write_suite(root / "suite", data),
        clip=clip,
        tokenizer=AutoTokenizer.from_pretrained(pre),
        processor=AutoImageProcessor.from_pretrained(pre),
    )


def make_pool(assets: SimpleNamespace, cache: Path, suite_dir: Path | None = None) -> CLIPVisionPool:
    suite = ZeroShotImageSuite("local", str(suite_dir or assets.suite), TASKS, batch_size=5)
    pool = CLIPVisionPool(str(assets.pretrained), experts=assets.experts, cache_dir=str(cache))
    pool.setup(suite, TRAINER)
    return pool


@pytest.fixture(scope="module")
def pool(assets: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> CLIPVisionPool:
    return make_pool(assets, tmp_path_factory.mktemp("clip-cache"))


# ------------------------------------------------------------------------------------------ by hand


@torch.inference_mode()
def head_by_hand(clip: CLIPModel, tokenizer: Any, task: str, templates: list[str] | None = None) -> torch.Tensor:
    """Each prompt alone (no padding): text tower, projection, normalise; mean over templates, normalise, scale."""
    rows = []
    for c in CLASSNAMES[task]:
        embs = []
        for t in templates or TEMPLATES[task]:
            ids = torch.tensor([tokenizer(t.replace("{classname}", c))["input_ids"]])
            e = clip.text_projection(clip.text_model(input_ids=ids).pooler_output)[0]
            embs.append(e / e.norm())
        m = torch.stack(embs).mean(0)
        rows.append(m / m.norm())
    return torch.stack(rows) * clip.logit_scale.exp()


def read_images(path: Path) -> tuple[list[Image.Image], list[int]]:
    """The images and labels of a parquet split, read with pyarrow and PIL (not through ``datasets``)."""
    table = pq.read_table(path).to_pylist()
    return [Image.open(io.BytesIO(r["image"]["bytes"])).convert("RGB") for r in table], [r["label"] for r in table]


@torch.inference_mode()
def logits_by_hand(
    assets: SimpleNamespace, state: dict[str, torch.Tensor], head: torch.Tensor, task: str
) -> tuple[torch.Tensor, list[int]]:
    """One image at a time: preprocess, vision tower with ``state``, projection, normalise, times the head."""
    tower = CLIPVisionModel(assets.clip.config.vision_config).eval()
    tower.load_state_dict(state)
    images, labels = read_images(assets.data[task] / "test.parquet")
    rows = []
    for img in images:
        px = assets.processor(images=[img], return_tensors="pt")["pixel_values"]
        f = assets.clip.visual_projection(tower(pixel_values=px).pooler_output)[0]
        rows.append(head @ (f / f.norm()))
    return torch.stack(rows), labels


def accuracy(logits: torch.Tensor, labels: list[int]) -> float:
    return sum(int(p) == y for p, y in zip(logits.argmax(-1), labels, strict=True)) / len(labels)


@torch.inference_mode()
def module_logits(pool: CLIPVisionPool, model: Any, task: str) -> torch.Tensor:
    """The scoring module's logits over the suite's test batches of ``task``."""
    loader = pool.suite.eval_loader(task, "test", pool.processor)
    return torch.cat([model(task, batch["pixel_values"]) for batch in loader])


def vision_state(path: str) -> dict[str, torch.Tensor]:
    """An expert's vision tower from its safetensors file, keys as CLIPVisionModel names them.

    A CLIPModel file prefixes them with ``vision_model.`` (as older CLIPVisionModel files do); a CLIPVisionModel
    saved by this transformers does not.
    """
    raw = load_file(str(Path(path) / "model.safetensors"))
    prefix = "vision_model."
    if any(k.startswith(prefix) for k in raw):
        return {k[len(prefix) :]: v for k, v in raw.items() if k.startswith(prefix)}
    return raw


# ------------------------------------------------------------------------------------------ heads


def test_heads_equal_an_independent_computation(assets: SimpleNamespace, pool: CLIPVisionPool) -> None:
    for task in TASKS:
        want = head_by_hand(assets.clip, assets.tokenizer, task)
        assert pool.heads[task].shape == (len(CLASSES), 16)
        torch.testing.assert_close(pool.heads[task], want, atol=1e-5, rtol=1e-5)
    # The svhn expert's moved text tower is not used: its heads differ from the pretrained ones.
    expert = CLIPModel.from_pretrained(assets.experts["svhn"]).eval()
    assert not torch.allclose(head_by_hand(expert, assets.tokenizer, "svhn"), pool.heads["svhn"], atol=1e-3)


def test_heads_are_computed_once_and_cached(
    assets: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[list[str]] = []
    real = vision.zero_shot_head

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(list(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(vision, "zero_shot_head", counting)
    first = make_pool(assets, tmp_path)
    assert len(calls) == 2
    files = {t: first.head_dirs[t] / vision.HEADS_FILE for t in TASKS}
    mtimes = {t: f.stat().st_mtime_ns for t, f in files.items()}
    second = make_pool(assets, tmp_path)
    assert len(calls) == 2  # nothing recomputed
    assert {t: f.stat().st_mtime_ns for t, f in files.items()} == mtimes
    for t in TASKS:
        assert torch.equal(second.heads[t], first.heads[t])
    # Other templates for one task: only that head is computed again.
    other = write_suite(tmp_path / "suite2", assets.data, svhn={"templates": ["digit {classname}"]})
    third = make_pool(assets, tmp_path, other)
    assert calls[2:] == [["digit {classname}"]]
    assert third.head_dirs["mnist"] == first.head_dirs["mnist"] and third.head_dirs["svhn"] != first.head_dirs["svhn"]


# ------------------------------------------------------------------------------------------ scoring and merging


def test_only_the_vision_tower_is_merged(assets: SimpleNamespace, pool: CLIPVisionPool) -> None:
    vision_keys = set(CLIPVisionModel(assets.clip.config.vision_config).state_dict())
    merged = pool.mergeable(pool.pretrained_state())
    assert set(merged) == vision_keys
    assert not any("text" in k or "projection" in k or "logit_scale" in k for k in merged)
    for task, expert in zip(TASKS, pool.expert_states(), strict=True):
        assert set(expert) == vision_keys
        for k, v in vision_state(assets.experts[task]).items():
            assert torch.equal(expert[k], v), (task, k)
    excluding = CLIPVisionPool(str(assets.pretrained), assets.experts, exclude=[r"^embeddings\."])
    kept = set(excluding.mergeable(pool.pretrained_state()))
    assert kept == {k for k in vision_keys if not k.startswith("embeddings.")} and kept != vision_keys


def test_accuracy_equals_one_by_one_argmax(assets: SimpleNamespace, pool: CLIPVisionPool) -> None:
    base = {k: v.clone() for k, v in assets.clip.vision_model.state_dict().items()}
    pre_model = pool.model()
    pre = pool.evaluate(pre_model, "test", TRAINER)
    for task in TASKS:
        logits, labels = logits_by_hand(assets, vision_state(assets.experts[task]), pool.heads[task], task)
        expert = pool.expert_model(task)
        assert pool.evaluate(expert, "test", TRAINER) == {task: {"acc": pytest.approx(accuracy(logits, labels))}}
        # Logits, not only the accuracy: the batches hold the same images, preprocessed the same, in order.
        torch.testing.assert_close(module_logits(pool, expert, task), logits, atol=1e-4, rtol=1e-4)
        logits, labels = logits_by_hand(assets, base, pool.heads[task], task)
        assert pre[task]["acc"] == pytest.approx(accuracy(logits, labels))
        torch.testing.assert_close(module_logits(pool, pre_model, task), logits, atol=1e-4, rtol=1e-4)


def test_merge_callback_loads_task_arithmetic_into_the_backbone(assets: SimpleNamespace, pool: CLIPVisionPool) -> None:
    base = {k: v.clone() for k, v in assets.clip.vision_model.state_dict().items()}
    experts = [vision_state(assets.experts[t]) for t in TASKS]
    want = {k: v + 0.3 * sum(e[k] - v for e in experts) for k, v in base.items()}
    merge = MergeCallback(TaskArithmetic(scaling=0.3), pool)
    model = pool.model()
    scores = pool.evaluate(model, "test", TRAINER, callbacks=[merge])
    for k, v in want.items():
        torch.testing.assert_close(model.backbone.state_dict()[k], v, atol=1e-6, rtol=1e-5)
    for task in TASKS:
        logits, labels = logits_by_hand(assets, want, pool.heads[task], task)
        assert scores[task]["acc"] == pytest.approx(accuracy(logits, labels))
        torch.testing.assert_close(module_logits(pool, model, task), logits, atol=1e-4, rtol=1e-4)


def test_experts_in_half_precision_over_an_fp32_base(
    assets: SimpleNamespace, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # fp16 and bf16 copies of the experts: merged in the base's dtype, every model the pool builds computes in fp32
    experts = {}
    for (task, path), dtype in zip(assets.experts.items(), (torch.float16, torch.bfloat16), strict=True):
        experts[task] = str(tmp_path / f"{task}-{dtype}")
        CLIPVisionModel.from_pretrained(path).to(dtype).save_pretrained(experts[task])
    suite = ZeroShotImageSuite("local", str(assets.suite), TASKS, batch_size=5)
    pool = CLIPVisionPool(str(assets.pretrained), experts=experts, cache_dir=str(tmp_path_factory.mktemp("half")))
    pool.setup(suite, TRAINER)
    base = {k: v.clone() for k, v in assets.clip.vision_model.state_dict().items()}
    halves = [{k: v.float() for k, v in vision_state(experts[t]).items()} for t in TASKS]
    want = {k: v + 0.3 * sum(e[k] - v for e in halves) for k, v in base.items()}
    merge = MergeCallback(TaskArithmetic(scaling=0.3), pool)
    model = pool.model()
    scores = pool.evaluate(model, "test", TRAINER, callbacks=[merge])
    for k, v in want.items():
        assert model.backbone.state_dict()[k].dtype == torch.float32
        torch.testing.assert_close(model.backbone.state_dict()[k], v, atol=1e-6, rtol=1e-5)
    for task, half in zip(TASKS, halves, strict=True):
        logits, labels = logits_by_hand(assets, want, pool.heads[task], task)
        assert scores[task]["acc"] == pytest.approx(accuracy(logits, labels))
        expert_logits, expert_labels = logits_by_hand(assets, half, pool.heads[task], task)
        own = pool.evaluate(pool.expert_model(task), "test", TRAINER, [task])
        assert own[task]["acc"] == pytest.approx(accuracy(expert_logits, expert_labels))


# ------------------------------------------------------------------------------------------ bad input


def cli(assets: SimpleNamespace, suite: Path, experts: dict[str, str] | None = None, *extra: str) -> list[str]:
    experts = experts or assets.experts
    mapping = ", ".join(f"{t}: '{p}'" for t, p in experts.items())
    return [
        "model=clip_local",
        f"model.pretrained={assets.pretrained}",
        f"model.experts={{{mapping}}}",
        "eval=clip8",
        f"eval.data_dir={suite}",
        f"eval.tasks=[{','.join(TASKS)}]",
        "eval.batch_size=5",
        "eval.num_workers=0",
        "logger=none",
        "plot=false",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        *extra,
    ]


def bert_dir(root: Path) -> str:
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(root / "bert")
    return str(root / "bert")


@pytest.mark.parametrize(
    ("case", "match"),
    [
        (
            "column",
            r"task 'svhn' \(.*data_svhn.*tasks\.yaml\): image_column 'img' is not a column .* columns: \['image'",
        ),
        ("not_images", r"task 'mnist' .*: image_column 'id' holds Value.*int64.*not images"),
        ("classnames", r"task 'mnist' .*: classnames has 2 names but label_column 'label' has 3 classes"),
        ("label_type", r"task 'svhn' .*: label_column 'image' holds Image.*not integer class ids"),
        ("no_names", r"task 'svhn' .*: label_column 'id' is Value.*not a ClassLabel with names: set 'classnames'"),
        ("template", r"tasks\.yaml: task 'svhn': each template must use '\{classname\}' once .*'photo of \{name\}'"),
        ("split", r"task 'mnist' has no split for eval\.tune_split 'validation'"),
        ("bert", r"expert 'svhn' \(.*bert\): architecture 'bert' is not a CLIP vision tower"),
        ("vision_pretrained", r"pretrained model '.*expert_mnist' is a 'clip_vision_model' checkpoint"),
        ("text_suite", r"CLIPVisionPool scores zero-shot image suites .* 'embedded' is a TextClassificationSuite"),
        ("missing_expert", r"model pool has no expert for suite task\(s\) \['svhn'\]"),
    ],
)
def test_bad_input_names_the_key_and_file(assets: SimpleNamespace, tmp_path: Path, case: str, match: str) -> None:
    suite, experts, extra = assets.suite, dict(assets.experts), []
    changes = {
        "column": {"svhn": {"image_column": "img"}},
        "not_images": {"mnist": {"image_column": "id"}},
        "classnames": {"mnist": {"classnames": ["zero", "one"]}},
        "label_type": {"svhn": {"label_column": "image"}},
        "no_names": {"svhn": {"label_column": "id"}},
        "template": {"svhn": {"templates": ["photo of {name}"]}},
        "split": {"mnist": {"splits": {"test": "test"}}},
    }
    if case in changes:
        suite = write_suite(tmp_path / "suite", assets.data, **changes[case])
    elif case == "bert":
        experts["svhn"] = bert_dir(tmp_path)
    elif case == "missing_expert":
        experts.pop("svhn")
    overrides = cli(assets, suite, experts)
    if case == "vision_pretrained":
        overrides.append(f"model.pretrained={assets.experts['mnist']}")
    if case == "text_suite":
        overrides = [o for o in overrides if not o.startswith(("eval", "eval."))] + ["eval=embedded"]
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError, OSError), match=match):
        run(make_cfg(out, [*overrides, *extra], tiny=False))
    assert not (out / "metrics.json").exists()


# ------------------------------------------------------------------------------------------ the CLI end to end


def test_cli_task_arithmetic_end_to_end(assets: SimpleNamespace, tmp_path: Path) -> None:
    out = tmp_path / "run"
    objective = run(
        make_cfg(out, cli(assets, assets.suite, None, "method=task_arithmetic", "save_merged=true"), tiny=False)
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tasks"] == TASKS and metrics["suite"] == "clip8"
    assert list(metrics["rows"]) == ["pretrained", "experts", "task_arithmetic"]
    for name, row in metrics["rows"].items():
        assert set(row["scores"]) == set(TASKS), name
    assert objective == pytest.approx(metrics["rows"]["task_arithmetic"]["validation_avg_acc"])
    table = (out / "results.md").read_text()
    assert "mnist" in table and "svhn" in table and "| task_arithmetic |" in table
    # The saved merged model is a CLIPModel: vision tower = theta_0 + 0.3 sum tau, the rest pretrained.
    merged = CLIPModel.from_pretrained(out / "merged_model").eval()
    base = assets.clip.vision_model.state_dict()
    experts = [vision_state(assets.experts[t]) for t in TASKS]
    for k, v in merged.vision_model.state_dict().items():
        torch.testing.assert_close(v, base[k] + 0.3 * sum(e[k] - base[k] for e in experts), atol=1e-6, rtol=1e-5)
    for k, v in merged.text_model.state_dict().items():
        assert torch.equal(v, assets.clip.text_model.state_dict()[k]), k
    heads = load_file(str(out / "merged_model" / vision.MERGED_HEADS_FILE))
    for t in TASKS:
        torch.testing.assert_close(heads[t], head_by_hand(assets.clip, assets.tokenizer, t), atol=1e-5, rtol=1e-5)
    # The expert row is each expert with its own task's head, as scored by hand.
    for t in TASKS:
        logits, labels = logits_by_hand(assets, experts[TASKS.index(t)], heads[t], t)
        assert metrics["rows"]["experts"]["scores"][t]["acc"] == pytest.approx(accuracy(logits, labels))


def test_awd_table_preset_runs_and_reports_next_to_the_paper(assets: SimpleNamespace, tmp_path: Path) -> None:
    """The AWD ViT-B/32 preset on the local pool (no tuning, few AWD steps), then mergelab-report against the paper."""
    out = tmp_path / "table"
    overrides = cli(
        assets,
        assets.suite,
        None,
        "experiment=awd_vit_b32",
        "tune=false",
        "logger=none",
        "table.methods.awd_ta.steps=3",
        "table.methods.awd_ties.steps=3",
        "table.methods.awd_ta.lr=0.1",
        "table.methods.awd_ties.lr=0.1",
        # The data-using rows on a few examples (the local suite has no train split: its validation stands in).
        "table.methods.fisher.num_examples=4",
        "table.methods.fisher.split=validation",
        "table.methods.regmean.num_examples=4",
        "table.methods.regmean.split=validation",
        "table.methods.adamerging.steps=2",
        "table.methods.adamerging.max_examples=4",
        "table.methods.awd_adamerging.merge.steps=2",
        "table.methods.awd_adamerging.merge.max_examples=4",
    )
    run(make_cfg(out, overrides, tiny=False))
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert list(rows) == [
        "pretrained",
        "experts",
        "weight_averaging",
        "fisher",
        "regmean",
        "task_arithmetic",
        "ties",
        "adamerging",
        "awd_ta",
        "awd_ta (single-task)",
        "awd_ties",
        "awd_adamerging",
    ]
    assert rows["adamerging"]["method_report"]["adamerging_split"] == "test"
    assert rows["awd_adamerging"]["params"]["merge"] == "adamerging"
    report_dir = tmp_path / "report"
    assert report_main([str(out), "--table", "awd_vit_b32", "--out", str(report_dir)]) == 0
    report = (report_dir / "report.md").read_text()
    lines = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    # The AWD row (AWD-TA) holds our MNIST and SVHN next to the paper's 98.1 and 85.1; tasks we lack stay missing.
    cells = [c.strip() for c in lines["AWD"].split("|")[2:-1]]
    ours = {t: 100 * rows["awd_ta"]["scores"][t]["acc"] for t in TASKS}
    assert cells[4] == f"{ours['svhn']:.1f} / 85.1" and cells[6] == f"{ours['mnist']:.1f} / 98.1"
    assert cells[0].startswith("—")
    assert "TIES-Merging" in lines and "Task Arithmetic" in lines and "Weight Averaging" in lines
    for name in ("Fisher Merging", "RegMean", "AdaMerging", "AWD + AdaMerging"):  # every row of the preset
        assert name in lines, name


# ------------------------------------------------------------------------------------------ shipped configs

CLIP8 = {
    "sun397": "tanganke/sun397",
    "stanford_cars": "tanganke/stanford_cars",
    "resisc45": "tanganke/resisc45",
    "eurosat": "tanganke/eurosat",
    "svhn": "ufldl-stanford/svhn",
    "gtsrb": "tanganke/gtsrb",
    "mnist": "ylecun/mnist",
    "dtd": "tanganke/dtd",
}


@pytest.mark.parametrize(("experiment", "model"), [("awd_vit_b32", "base-patch32"), ("awd_vit_l14", "large-patch14")])
def test_shipped_presets_name_the_papers_models_datasets_and_columns(
    tmp_path: Path, experiment: str, model: str
) -> None:
    """Config only (nothing is downloaded): the suite parses, the pool covers it, the paper table has its tasks."""
    cfg = make_cfg(tmp_path, [f"experiment={experiment}"], tiny=False)
    suite = build(cfg.eval)
    assert isinstance(suite, ZeroShotImageSuite) and suite.task_names == list(CLIP8)
    assert {t: info.dataset for t, info in suite.tasks.items()} == CLIP8
    for info in suite.tasks.values():
        assert not info.local and info.image_column == "image" and info.label_column == "label"
        held_out = "extra[:2%]" if info.dataset == CLIP8["svhn"] else "train[-10%:]"
        assert info.splits == {"train": "train", "validation": held_out, "test": "test"} and info.templates
    assert cfg.model.pretrained == f"openai/clip-vit-{model}"
    assert dict(cfg.model.experts) == {t: f"tanganke/clip-vit-{model}_{t.replace('_', '-')}" for t in CLIP8}
    table = load_table(experiment)
    columns = [{t.name.lower(), *t.aliases} for t in table.tasks]
    assert [next(t for t in CLIP8 if t in names) for names in columns] == list(CLIP8)  # every column, paper order
    methods = cfg.table.methods
    assert list(methods) == [
        "weight_averaging",
        "fisher",
        "regmean",
        "task_arithmetic",
        "ties",
        "adamerging",
        "awd_ta",
        "awd_ties",
        "awd_adamerging",
    ]
    assert methods.awd_ta.merge.name == "task_arithmetic" and methods.awd_ties.merge.name == "ties"
    assert methods.awd_adamerging.merge.name == "adamerging" and methods.awd_adamerging.grid is None
    assert methods.task_arithmetic.grid.scaling == pytest.approx([0.05 * i for i in range(1, 21)])
    assert methods.ties.grid.scaling == pytest.approx([0.1 * i for i in range(1, 11)]) and methods.ties.k == 20


def test_loader_workers_give_the_same_batches(assets: SimpleNamespace) -> None:
    batches = []
    for workers in (0, 1):
        suite = ZeroShotImageSuite("local", str(assets.suite), TASKS, batch_size=5, num_workers=workers)
        batches.append(list(suite.eval_loader("svhn", "test", assets.processor)))
    assert len(batches[0]) == 3
    for a, b in zip(*batches, strict=True):
        assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["labels"], b["labels"])
