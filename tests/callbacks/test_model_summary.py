"""The model summary's totals: the module's own counts where `requires_grad` cannot say."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn

from advarch.callbacks.model_summary import ModelSummary


class RowsTrained(L.LightningModule):
    """A stacked (4, 10) tensor of which one row trains (as a finetune's new expert)."""

    def __init__(self) -> None:
        super().__init__()
        self.experts = nn.Parameter(torch.zeros(4, 10))

    def parameter_counts(self) -> dict[str, int]:
        return {"params/total": 40, "params/trainable": 10, "params/frozen": 30}


@pytest.mark.parametrize(("module", "line"), [
    (RowsTrained(), "params: 10 trainable (25.0%), 30 frozen"),  # the share, where some are
    (nn.Linear(4, 5), "params: 25 trainable, 0 frozen"),  # requires_grad counts
])  # fmt: skip
def test_totals_are_the_modules_own_counts(module, line, capsys) -> None:
    if not isinstance(module, L.LightningModule):
        wrapped = L.LightningModule()
        wrapped.net = module
        module = wrapped
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False)
    ModelSummary().on_fit_start(trainer, module)
    out = " ".join(capsys.readouterr().out.split())
    assert line in out


def test_a_trials_label_above_the_table_keeps_its_list_overrides(capsys) -> None:
    # review 36: `Table(title=...)` read markup: `[attn,ssm]` vanished from the title
    summary = ModelSummary()
    summary.run_label = "trial 1 (model.layers=[attn,ssm])"
    summary.summarize([("Name", ["net"]), ("Type", ["Linear"]), ("Params", ["25"])], 25, 25, 0.0)
    out = "".join(capsys.readouterr().out.split())
    assert "trial1(model.layers=[attn,ssm])" in out
