"""Fine-tuning an expert leaves nothing of its training state behind: experts are fine-tuned one after another in
one process, so an optimizer's state (2x the model with AdamW) and the gradients (1x) must go when its fit ends,
not at Python's next cyclic collection (the trainer and the module refer to each other)."""

from __future__ import annotations

import gc
from types import SimpleNamespace
from typing import Any

import torch

from mergelab.training.experts import ExpertFinetuner, fit


class Regressor(torch.nn.Module):
    """A model whose output has a ``loss``, as transformers models do (plumbing only)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> Any:
        return SimpleNamespace(loss=torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), y))


class Recording(ExpertFinetuner):
    """Keeps the optimizer it configured, to look at after the fit."""

    def configure_optimizers(self) -> Any:
        config = super().configure_optimizers()
        self.optimizer = config["optimizer"] if isinstance(config, dict) else config[0][0]
        return config


def test_a_finished_fit_frees_the_optimizer_state_and_gradients() -> None:
    torch.manual_seed(0)
    batches = [{"x": torch.randn(8, 4), "y": torch.randn(8)} for _ in range(3)]
    data = torch.utils.data.DataLoader(batches, batch_size=None)  # type: ignore[arg-type]
    module = Recording(Regressor(), lr=1e-2, weight_decay=0.0, warmup_ratio=0.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer_kwargs = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}
    gc.disable()  # what is freed must be freed by the fit itself, not by a collection
    try:
        seconds, loss = fit(module, data, 2, trainer_kwargs)
        assert seconds > 0 and loss == loss  # a finite last loss was read before the state went
        assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())  # it trained
        assert module.optimizer.state == {}  # AdamW's exp_avg / exp_avg_sq: gone
        assert all(p.grad is None for p in module.parameters())
        assert module._trainer is None  # no path from the kept model back to the trainer
    finally:
        gc.enable()
