"""A Lightning run mergelab makes leaves nothing behind once it returns: experts are fine-tuned, and merged models
scored, one after another in one process, so an optimizer's state (2x the model with AdamW), the gradients (1x) and
a scored model must go when their fit or test ends, not at Python's next cyclic collection (the trainer and the
module refer to each other)."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace
from typing import Any

import lightning as L
import torch

from mergelab.suites.scoring import run_test
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


TRAINER = {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": False}


def test_a_finished_fit_frees_the_optimizer_state_and_gradients() -> None:
    torch.manual_seed(0)
    batches = [{"x": torch.randn(8, 4), "y": torch.randn(8)} for _ in range(3)]
    data = torch.utils.data.DataLoader(batches, batch_size=None)  # type: ignore[arg-type]
    module = Recording(Regressor(), lr=1e-2, weight_decay=0.0, warmup_ratio=0.0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    gc.disable()  # what is freed must be freed by the fit itself, not by a collection
    try:
        seconds, loss = fit(module, data, 2, TRAINER)
        assert seconds > 0 and loss == loss  # a finite last loss was read before the state went
        assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())  # it trained
        assert module.optimizer.state == {}  # AdamW's exp_avg / exp_avg_sq: gone
        assert all(p.grad is None for p in module.parameters())
        assert module._trainer is None  # no path from the kept model back to the trainer
    finally:
        gc.enable()


class Scorer(L.LightningModule):
    """A scored model as the suites' evaluators are: test batches in, ``scores`` out (plumbing only)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 2)
        self.eval_tasks = ["t"]
        self.right = 0

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.right += int((self.linear(batch["x"]).argmax(-1) == batch["y"]).sum())

    def on_test_end(self) -> None:
        self.scores = {"t": {"acc": self.right / 16}}


def test_a_scored_model_goes_when_its_caller_drops_it() -> None:
    torch.manual_seed(0)
    examples = [{"x": torch.randn(4), "y": torch.randint(0, 2, ())} for _ in range(16)]
    loader = torch.utils.data.DataLoader(examples, batch_size=8)  # type: ignore[arg-type]
    gc.disable()
    try:
        model = Scorer()
        scores = run_test(model, [loader], TRAINER)
        assert 0.0 <= scores["t"]["acc"] <= 1.0 and scores["t"]["acc"] == model.right / 16
        gone = weakref.ref(model)
        del model
        assert gone() is None  # no trainer left holding it until a collection
    finally:
        gc.enable()
