"""Benchmark (not a test): the AWD ViT table preset at the real CLIP ViT-B/32 (or ViT-L/14) shape, offline.

No CLIP weights or datasets can be downloaded here, so the pool is a random CLIP with openai/clip-vit-base-patch32's
architecture (224-pixel images, 32-pixel patches, 12 vision blocks of width 768; text tower of width 512) and eight
"experts" whose vision towers are the pretrained one plus Gaussian noise, scored on generated images (one colour per
class, with noise) with the real preset's methods (``experiment=awd_vit_b32``, no tuning, AWD with few steps).
Accuracies mean nothing; the point is that every shape fits and how long each stage takes. ``--tasks`` takes the
first N of the eight tasks (memory grows with N: every expert's vision tower, and AWD's task vectors, stay in
memory).

    python experiments/bench_clip_vision.py [--model b32|l14] [--tasks 8] [--images 16] [--awd-steps 20] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

SHAPES = {
    "b32": {
        "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "image_size": 224, "patch_size": 32},
        "text": {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8},
        "projection_dim": 512,
        "experiment": "awd_vit_b32",
    },
    "l14": {
        "vision": {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "image_size": 224, "patch_size": 14},
        "text": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
        "projection_dim": 768,
        "experiment": "awd_vit_l14",
    },
}  # fmt: skip
TASKS = ["sun397", "stanford_cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd"]
CLASSES = 10


def build_assets(root: Path, shape: dict, tasks: list[str], images: int) -> tuple[Path, dict[str, str], Path]:
    """The pretrained CLIP dir, one perturbed vision tower per task, and a suite of generated images."""
    import datasets
    import numpy as np
    import torch
    import yaml
    from PIL import Image
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # A character-level CLIP tokenizer: the real vocabulary is on the hub.
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": len(chars) + i for i, c in enumerate(chars)}
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = len(vocab), len(vocab) + 1
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    eos = vocab["<|endoftext|>"]
    text = {**shape["text"], "vocab_size": 49408, "max_position_embeddings": 77, "eos_token_id": eos}
    torch.manual_seed(0)
    config = CLIPConfig(text_config=text, vision_config=shape["vision"], projection_dim=shape["projection_dim"])
    clip = CLIPModel(config).eval()
    pre = root / "clip"
    clip.save_pretrained(pre)
    tokenizer.save_pretrained(pre)
    CLIPImageProcessor().save_pretrained(pre)  # CLIP's defaults: resize 224, centre crop, CLIP mean/std

    experts = {}
    base = clip.vision_model.state_dict()
    for i, task in enumerate(tasks):
        gen = torch.Generator().manual_seed(i + 1)
        clip.vision_model.load_state_dict({k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in base.items()})
        clip.vision_model.save_pretrained(root / f"expert_{task}")
        experts[task] = str(root / f"expert_{task}")

    rng = np.random.default_rng(0)
    names = [f"class {c}" for c in range(CLASSES)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    entries = {}
    for task in tasks:
        colours = rng.integers(0, 256, (CLASSES, 3))
        for split in ("validation", "test"):
            labels = [i % CLASSES for i in range(images)]
            pics = [
                Image.fromarray(np.clip(colours[y] + rng.normal(0, 40, (96, 128, 3)), 0, 255).astype("uint8"))
                for y in labels
            ]
            ds = datasets.Dataset.from_dict({"image": pics, "label": labels}, features=features)
            (root / "data" / task).mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(root / "data" / task / f"{split}.parquet"))
        entries[task] = {"dataset": f"data/{task}", "splits": {"validation": "validation", "test": "test"},
                         "templates": ["a photo of a {classname}.", "a photo of the {classname}."]}  # fmt: skip
    (root / "tasks.yaml").write_text(yaml.safe_dump({"tasks": entries}))
    return pre, experts, root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(SHAPES), default="b32")
    parser.add_argument("--tasks", type=int, default=len(TASKS), help="the first N of the eight tasks")
    parser.add_argument("--images", type=int, default=16, help="images per task and split")
    parser.add_argument("--awd-steps", type=int, default=20)
    parser.add_argument("--out", default=None, help="run dir (default: a temporary dir)")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from mergelab.cli import CONFIG_DIR
    from mergelab.run import run

    shape = SHAPES[args.model]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        tasks = TASKS[: args.tasks]
        pre, experts, suite = build_assets(root, shape, tasks, args.images)
        build_s = time.perf_counter() - start
        mapping = ", ".join(f"{t}: '{p}'" for t, p in experts.items())
        overrides = [
            f"experiment={shape['experiment']}",
            "model=clip_local",
            f"model.pretrained={pre}",
            f"model.experts={{{mapping}}}",
            f"model.cache_dir={root / 'cache'}",
            f"eval.data_dir={suite}",
            f"eval.tasks=[{','.join(tasks)}]",
            "eval.num_workers=0",
            "eval.batch_size=16",
            "tune=false",
            "logger=csv",
            "plot=false",
            "trainer.enable_progress_bar=false",
            *(f"table.methods.{m}.steps={args.awd_steps}" for m in ("awd_ta", "awd_ties")),
        ]
        out = Path(args.out) if args.out else root / "run"
        with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
            cfg = compose("config", overrides=overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(out)
        start = time.perf_counter()
        run(cfg)
        run_s = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        heads = sorted((root / "cache" / "heads").iterdir())
        record = {
            "model": args.model,
            "tasks": tasks,
            "images_per_task_and_split": args.images,
            "awd_steps": args.awd_steps,
            "build_assets_s": round(build_s, 1),
            "run_s": round(run_s, 1),
            "timings": metrics["timings"],
            "rows": list(metrics["rows"]),
            "heads_cached": len(heads),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }
        print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
