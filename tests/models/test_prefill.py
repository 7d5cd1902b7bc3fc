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

from advarch.config.combinations import packaged_config
from advarch.generation import generate
from advarch.models import Model
from advarch.models.blocks import ssm
from advarch.models.blocks.attention import Attention
from advarch.models.blocks.sliding_window import SlidingWindowAttention
from advarch.models.blocks.ssd import Mamba2
from advarch.models.blocks.ssm import SelectiveSSM
from advarch.spec import DataSpec

TOL = {"rtol": 1e-5, "atol": 1e-5}
SPEC = DataSpec(kind="lm", vocab_size=40, seq_len=128, eos_id=37, pad_id=38)
RETRO_M = 4
RETRO_SPEC = dataclasses.replace(
    SPEC, retrieval_neighbours=2, retrieval_chunk=RETRO_M, retrieval_neighbour_len=2 * RETRO_M
)
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


def packaged_model(name: str, spec: DataSpec = SPEC, **extra: Any) -> Model:
    """The packaged `model=<name>` at a test width, weights sharpened for decisive argmaxes."""
    packaged = packaged_config("model", name)  # shared: read, not changed
    options = {k: v for k, v in packaged.items() if k not in ("_target_", "compile")}
    options |= {"dim": 32, "num_heads": 2, "ffn_hidden": 48, **extra}
    torch.manual_seed(0)
    model = Model(spec, **options).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2 and "conv" not in pname:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def fake_retrieve(chunk: torch.Tensor) -> torch.Tensor:
    """(B, m) → (B, 1, K, R): a deterministic function of the chunk, with some padding."""
    k, r = RETRO_SPEC.retrieval_neighbours, RETRO_SPEC.retrieval_neighbour_len
    nb = ((chunk.repeat(1, k * 2) * 7 + torch.arange(k * r)) % 36).view(-1, 1, k, r)
    return nb.masked_fill(nb % 5 == 0, RETRO_SPEC.pad_id)


def step_model(model: Model, seq: torch.Tensor, state: Any, start: int = 0, retrieve=None):
    """seq[:, start:] through `Model.step`, one token at a time, retrieving (RETRO) the chunk
    of seq each token completes; the last logits and the state."""
    m = model.spec.retrieval_chunk
    for t in range(start, seq.shape[1]):
        found = None
        if retrieve is not None and (t + 1) % m == 0:
            found = retrieve(seq[:, t + 1 - m : t + 1])
        logits, state = model.step(seq[:, t : t + 1], state, found)
    return logits, state


def greedy_from(model: Model, logits: torch.Tensor, state: Any, seq: torch.Tensor, n: int,
                retrieve=None) -> torch.Tensor:  # fmt: skip
    """n greedy tokens stepped on from (logits, state) after the prefix seq (B, T), never
    the padding id (as `generate`)."""
    for _ in range(n):
        logits = logits.index_fill(-1, torch.tensor([SPEC.pad_id]), float("-inf"))
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        logits, state = step_model(model, seq, state, seq.shape[1] - 1, retrieve)
    return seq


MODELS = {  # packaged config → extra options (a capacity that eval mode must not apply)
    "transformer": {},
    "moe": {},
    "moe_capacity": {"moe": {**packaged_config("model", "moe")["moe"], "capacity_factor": 1.0}},
    "longformer": {},
    "ssm": {},
    "mamba2": {"ssd": {**packaged_config("model", "mamba2")["ssd"], "chunk_size": 16}},
    "hybrid": {},
}


@pytest.mark.parametrize("length", [3, 70])
@pytest.mark.parametrize("name", list(MODELS))
def test_model_prefill_equals_stepping(name: str, length: int) -> None:
    """Logits and state as the token loop gives them, and the same greedy continuation; 70
    crosses the packaged window (64), SSD's chunk (16) and the fused scan's 64-step chunk."""
    model = packaged_model(name.removesuffix("_capacity"), **MODELS[name])
    prompt = torch.randint(0, 36, (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        logits, state = model.prefill(prompt)
        logits_ref, state_ref = step_model(model, prompt, model.init_state(2))
        torch.testing.assert_close(logits, logits_ref, **TOL)
        assert_same_state(state, state_ref)
        cont = greedy_from(model, logits, state, prompt, 12)
        assert torch.equal(cont, greedy_from(model, logits_ref, state_ref, prompt, 12))
        assert torch.equal(cont, generate(model, prompt, 12, greedy=True))


@pytest.mark.parametrize("length", [3, 8, 14])
@pytest.mark.parametrize("name", ["retro", "retro_moe"])
def test_retro_prefill_equals_stepping(name: str, length: int) -> None:
    """RETRO: the neighbours of every chunk the prompt completes (none, a whole number of
    chunks, a partial last chunk) go in at once; CCA state and continuation as stepped."""
    model = packaged_model(name, RETRO_SPEC, depth=4)
    prompt = torch.randint(0, 36, (2, length), generator=torch.Generator().manual_seed(length))
    chunks = [prompt[:, u * RETRO_M : (u + 1) * RETRO_M] for u in range(length // RETRO_M)]
    neighbours = torch.cat([fake_retrieve(c) for c in chunks], 1) if chunks else None
    with torch.no_grad():
        logits, state = model.prefill(prompt, neighbours)
        logits_ref, state_ref = step_model(model, prompt, model.init_state(2), 0, fake_retrieve)
        torch.testing.assert_close(logits, logits_ref, **TOL)
        assert_same_state(state, state_ref)
        cont = greedy_from(model, logits, state, prompt, 10, fake_retrieve)
        assert torch.equal(cont, greedy_from(model, logits_ref, state_ref, prompt, 10,
                                             fake_retrieve))  # fmt: skip
        assert torch.equal(cont, generate(model, prompt, 10, greedy=True, retrieve=fake_retrieve))


def test_generate_prefills_the_prompt_in_one_call(monkeypatch) -> None:
    """The prompt costs one `prefill`, no `step`; each new token but the last one `step`."""
    model = packaged_model("hybrid")
    calls = {"prefill": 0, "step": 0}
    for method in calls:
        original = getattr(model, method)

        def counted(*args, _original=original, _method=method, **kwargs):
            calls[_method] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(model, method, counted)
    generate(model, torch.randint(0, 36, (1, 40)), 5, greedy=True)
    assert calls == {"prefill": 1, "step": 4}
