"""Parallel prefill: a prompt in one sequence-parallel pass gives the logits and the decoding
state that stepping through it token by token gives, per mixer and per packaged model, and
decoding goes on from that state as from the stepped one (float32, tight tolerances).

Prompt lengths run from shorter than the conv width to past the sliding window and every chunk
size (the fused SSM kernel's 64 steps, SSD's chunk, RETRO's retrieval chunk), mostly not
multiples of them.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import nn

from advarch.models.blocks import ssm
from advarch.models.blocks.attention import Attention
from advarch.models.blocks.sliding_window import SlidingWindowAttention
from advarch.models.blocks.ssd import Mamba2
from advarch.models.blocks.ssm import SelectiveSSM

TOL = {"rtol": 1e-5, "atol": 1e-5}
MIXERS = {  # small blocks whose chunk, window and conv sizes the prompt lengths cross
    "attn": lambda: Attention(16, 2),
    "swa": lambda: SlidingWindowAttention(16, 2, window=5),
    "ssm": lambda: SelectiveSSM(16, d_state=4),
    "ssm_conv1": lambda: SelectiveSSM(16, d_state=4, d_conv=1),
    "ssd": lambda: Mamba2(16, d_state=8, head_dim=8, chunk_size=4),
}


def leaves(state: Any) -> list[Any]:
    """Every tensor and scalar of a decoding state (lists, tuples, dicts, dataclasses)."""
    if dataclasses.is_dataclass(state):
        state = [getattr(state, f.name) for f in dataclasses.fields(state)]
    if isinstance(state, dict):
        state = list(state.values())
    if isinstance(state, list | tuple):
        return [leaf for part in state for leaf in leaves(part)]
    return [state]


def assert_same_state(got: Any, want: Any) -> None:
    got, want = leaves(got), leaves(want)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, torch.Tensor):
            assert g.shape == w.shape and g.dtype == w.dtype
            torch.testing.assert_close(g, w, **TOL)
        else:
            assert g == w


def step_mixer(mixer: nn.Module, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
    """x (B, T, D) through `step`, one token at a time: the reference prefill."""
    ys = []
    for t in range(x.shape[1]):
        y, state = mixer.step(x[:, t : t + 1], state)
        ys.append(y)
    return torch.cat(ys, 1), state


@pytest.mark.parametrize("length", [1, 2, 13, 71])
@pytest.mark.parametrize("name", list(MIXERS))
def test_mixer_prefill_equals_stepping(name: str, length: int) -> None:
    torch.manual_seed(length)
    mixer = MIXERS[name]().eval()
    x, more = torch.randn(2, length, 16), torch.randn(2, 4, 16)
    with torch.no_grad():
        y, state = mixer.prefill(x)
        y_ref, state_ref = step_mixer(mixer, x, mixer.init_state(2, x.device, x.dtype))
        torch.testing.assert_close(y, y_ref, **TOL)
        torch.testing.assert_close(y, mixer(x), **TOL)  # the training forward, too
        assert_same_state(state, state_ref)
        torch.testing.assert_close(step_mixer(mixer, more, state)[0],
                                   step_mixer(mixer, more, state_ref)[0], **TOL)  # fmt: skip


def test_ssm_prefill_without_the_fused_kernel(monkeypatch) -> None:
    """The parallel scan's last state serves prefill where the C++ kernel is unavailable."""
    monkeypatch.setattr(ssm, "kernel_available", lambda: False)
    test_mixer_prefill_equals_stepping("ssm", 71)
