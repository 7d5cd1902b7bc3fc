"""A block of a project's own (`examples/own_block`): registered in `BLOCKS`, its options
under `model.<name>` checked like advarch's, and decoded token by token as the full forward."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

from advarch.generation import generate
from advarch.models.registry import BLOCKS, Block
from advarch.spec import DataSpec

SPEC = DataSpec(kind="lm", vocab_size=40, seq_len=64, eos_id=37, pad_id=38, bos_id=39)


@pytest.fixture
def own(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The example's module, its `gru` registered for this test alone (other tests list the
    registered blocks in their messages)."""
    module = importlib.import_module("examples.own_block.gru")
    BLOCKS.pop("gru", None)  # (its first import registered it)
    monkeypatch.setitem(BLOCKS, "gru", Block("mixer", module.GRUMixer, module.GRUConfig))
    return module


def test_an_own_blocks_options_build_it_and_decoding_equals_the_full_forward(own) -> None:
    # new user 41: `Model` took the options of its five blocks alone, so a registered block
    # with options failed to build ("got an unexpected keyword argument 'gru'")
    torch.manual_seed(0)
    model = own.GRUHybridModel(SPEC, dim=32, depth=2, num_heads=2, layers=["gru", "attn"],
                               gru={"hidden_mult": 2, "num_layers": 2}).double().eval()  # fmt: skip
    mixer = model.layers[0].mixer
    assert isinstance(mixer, own.GRUMixer) and mixer.gru.hidden_size == 64
    assert mixer.gru.num_layers == 2
    prompt = torch.randint(0, 36, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 12, greedy=True, use_cache=True)
    assert torch.equal(cached, generate(model, prompt, 12, greedy=True, use_cache=False))
    sampled = [generate(model, prompt, 12, seed=3, use_cache=c) for c in (True, False)]
    assert torch.equal(*sampled)


def test_an_own_blocks_bad_option_is_one_line_naming_its_key(own) -> None:
    with pytest.raises(ValueError, match=r"^model\.gru\.hidden_mult=0 must be >= 1$"):
        own.GRUHybridModel.check_options(layers=["gru"], gru={"hidden_mult": 0})
    with pytest.raises(ValueError, match=r"^model\.gru\.width is not an option of model\.gru"):
        own.GRUHybridModel.check_options(layers=["gru"], gru={"width": 2})
    with pytest.raises(ValueError, match=r"^model\.lstm is not an option of advarch\.models\.Mo"):
        own.GRUHybridModel(SPEC, layers=["gru"], lstm={})  # (neither a keyword nor registered)
    for optionless in ("attn", "dense"):  # (review 41: `model..foo is not an option of model.`)
        with pytest.raises(ValueError, match=rf"^model\.{optionless} is not an option of adv"):
            own.GRUHybridModel.check_options(**{optionless: {"foo": 1}})
