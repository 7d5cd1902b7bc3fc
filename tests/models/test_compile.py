"""`model.compile=true`: every model family builds compiled, is captured as one graph, and
computes what it computes plain.

Dynamo captures the graphs here with a counting `eager` backend (no code generation), which
keeps the test to seconds on CPU, with the options `model.compile` uses: one graph break in the
layer loop would make torch.compile run the whole model eagerly. The README's
`python train.py model.compile=true` runs Inductor on CPU; the GPU run
(`trainer=gpu model.compile=true`) exercises Inductor there.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._dynamo.testing import CompileCounter

from advarch.errors import ConfigError
from advarch.pipeline import build_datamodule, build_model
from advarch.train import run
from tests.conftest import SMALL_TEXT

FAMILIES = [
    ["debug=tiny", *SMALL_TEXT],  # the default MoE decoder (CPU: the expert loop operator)
    [
        "debug=tiny",
        *SMALL_TEXT,
        "model=hybrid",
        "model.layers=[ssm,attn,swa]",  # the fused CPU scan operator, MoE FFNs
        "model.swa.window=8",
    ],
    ["debug=tiny", "model=seq2seq_moe", "data=seq2seq_reverse"],  # encoder and decoder
    ["experiment=mmoe_synthetic"],
]


@pytest.fixture
def eager_backend(monkeypatch) -> CompileCounter:
    """`nn.Module.compile` with its other options as given, the backend a graph counter."""
    real, counter = nn.Module.compile, CompileCounter()
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: real(self, **kw, backend=counter))
    return counter


@pytest.mark.parametrize("overrides", FAMILIES, ids=["moe", "hybrid", "seq2seq_moe", "mmoe"])
def test_compiled_model_matches_plain(make_cfg, eager_backend, overrides) -> None:
    cfg = make_cfg([*overrides, "model.compile=true"])
    datamodule, spec = build_datamodule(cfg)
    datamodule.prepare_data()
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    inputs = batch["input_ids"] if "input_ids" in batch else batch["inputs"]
    kwargs = {k: batch[k] for k in ("decoder_input_ids",) if k in batch}  # seq2seq's targets
    torch.manual_seed(0)
    compiled = build_model(cfg, spec)
    cfg.model.compile = False
    torch.manual_seed(0)
    plain = build_model(cfg, spec)
    assert compiled._compiled_call_impl is not None and plain._compiled_call_impl is None
    assert compiled.state_dict().keys() == plain.state_dict().keys()  # checkpoints unchanged
    out_c, out_p = compiled(inputs, **kwargs), plain(inputs, **kwargs)
    assert eager_backend.frame_count == 1  # the whole forward is one graph
    torch.testing.assert_close(out_c.logits, out_p.logits)
    (out_c.logits.sum() + out_c.aux_loss).backward()
    assert all(p.grad is not None for p in compiled.parameters() if p.requires_grad)


def test_compile_must_be_a_boolean(make_cfg) -> None:
    cfg = make_cfg(["debug=tiny", *SMALL_TEXT, "model.compile=yes"])
    with pytest.raises(ConfigError, match="model.compile='yes' must be true or false"):
        build_model(cfg, build_datamodule(cfg)[1])


def test_a_compiled_run_compiles_once_to_train_and_once_to_evaluate(make_cfg, eager_backend):
    """Fit's validations run under no_grad; so does testing (not inference mode, which
    would compile the model a third time: minutes for a large model on a GPU)."""
    metrics = run(make_cfg(["debug=tiny", *SMALL_TEXT, "model.compile=true", "~logger"]))
    assert metrics["test/loss"] > 0
    assert eager_backend.frame_count == 2
