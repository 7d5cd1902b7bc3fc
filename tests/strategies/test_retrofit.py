"""Retrofitting RETRO onto a trained plain decoder through the finetune strategy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from advarch.atomic import save_atomic
from advarch.models.model import Model
from advarch.spec import DataSpec
from advarch.strategies.finetune import FinetuneStrategy
from advarch.strategies.optimization import parameter_groups

M, K = 4, 2
SPEC = DataSpec(kind="lm", vocab_size=40, seq_len=12, pad_id=0, retrieval_neighbours=K,
                retrieval_chunk=M, retrieval_neighbour_len=2 * M)  # fmt: skip
SIZE = {"dim": 16, "depth": 2, "num_heads": 2, "ffn_hidden": 32}


def plain_checkpoint(path: Path) -> tuple[Model, str]:
    torch.manual_seed(0)
    plain = Model(SPEC, **SIZE)
    state = {f"model.{k}": v.clone() for k, v in plain.state_dict().items()}
    save_atomic({"state_dict": state, "hyper_parameters": {"cfg": {}}}, path)
    return plain.eval(), str(path)


def retrofit(pretrained: str, trainable: list[str]) -> FinetuneStrategy:
    torch.manual_seed(1)
    retro = Model(SPEC, **SIZE, retro={"encoder_depth": 1})
    return FinetuneStrategy(retro, SPEC, pretrained=pretrained, trainable=trainable)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, 40, (3, 12), generator=g)
    return tokens, torch.randint(1, 40, (3, 12 // M, K, 2 * M), generator=g)


def test_frozen_retrofit_starts_from_the_decoder_and_trains_only_retro(tmp_path: Path) -> None:
    plain, path = plain_checkpoint(tmp_path / "plain.ckpt")
    module = retrofit(path, ["model.retro.*"])
    model = module.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("retro.") for n in trained)
    assert trained == {n for n, _ in model.retro.named_parameters(prefix="retro")}
    tokens, neighbours = batch()
    # padding neighbours: CCA adds nothing, so the retrofitted model is the decoder exactly
    blank = torch.zeros_like(neighbours)
    torch.testing.assert_close(model.eval()(tokens, neighbours=blank).logits,
                               plain(tokens).logits, rtol=0, atol=0)  # fmt: skip
    decoder = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    model.train()
    opt = torch.optim.AdamW(parameter_groups(model), lr=1e-2, weight_decay=0.1)
    loss = model(tokens, neighbours=neighbours).logits.square().mean()
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in trained)
    opt.step()
    for name, p in model.named_parameters():
        if name in decoder:
            assert torch.equal(p, decoder[name]), name


def test_unfrozen_retrofit_trains_everything_from_the_decoder(tmp_path: Path) -> None:
    plain, path = plain_checkpoint(tmp_path / "plain.ckpt")
    model = retrofit(path, ["*"]).model
    assert all(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(
        model.layers[0].mixer.state_dict(), plain.layers[0].mixer.state_dict()
    )


def test_retro_tensors_not_covered_by_trainable_are_an_error(tmp_path: Path) -> None:
    _, path = plain_checkpoint(tmp_path / "plain.ckpt")
    with pytest.raises(
        ValueError, match=r"this model's tensor model.retro\.\S+ is not in the checkpoint"
    ):
        retrofit(path, ["model.final_norm.*"])
