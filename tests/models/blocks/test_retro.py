"""Chunked cross-attention and the neighbour encoder: reference parity, causality, masking."""

from __future__ import annotations

import pytest
import torch

from advarch.models.blocks.retro import ChunkedCrossAttention, NeighbourEncoder

D, H = 16, 2


def _attention_reference(attn, x, ctx, q_pos, k_pos, key_pad=None):
    """Plain per-head softmax attention with the module's weights (no SDPA)."""
    dh = x.shape[-1] // H

    def heads(t):  # (N, T, D) -> (N, H, T, Dh)
        return t.reshape(t.shape[0], t.shape[1], H, dh).transpose(1, 2)

    q = heads(x @ attn.to_q.weight.T)
    k, v = (heads(t) for t in (ctx @ attn.to_kv.weight.T).chunk(2, dim=-1))
    if attn.rotary is not None:
        q, k = attn.rotary(q, q_pos), attn.rotary(k, k_pos)
    scores = q @ k.transpose(-1, -2) / dh**0.5  # (N, H, Tq, Tk)
    if key_pad is not None:
        scores = scores.masked_fill(key_pad[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(x.shape) @ attn.to_out.weight.T


def cca_reference(cca, h, enc, pad=None):
    """Loop over examples and chunks: chunk u's neighbours feed positions
    [u·m+m-1, (u+1)·m+m-1) ∩ [0, T); a chunk with only padded neighbours feeds nothing."""
    m, (b, t, d) = cca.chunk_size, h.shape
    num_chunks, k, r = enc.shape[1:4]
    rows = []
    for i in range(b):
        parts = [h.new_zeros(m - 1, d)]
        for u in range(num_chunks):
            lo, hi = u * m + m - 1, min((u + 1) * m + m - 1, t)
            kp = None if pad is None else pad[i, u].reshape(1, k * r)
            if kp is not None and kp.all():
                parts.append(h.new_zeros(hi - lo, d))
                continue
            q_pos, k_pos = torch.arange(hi - lo) + m - 1, torch.arange(r).repeat(k)
            ctx = enc[i, u].reshape(1, k * r, d)
            parts.append(
                _attention_reference(cca.attn, h[i : i + 1, lo:hi], ctx, q_pos, k_pos, kp)[0]
            )
        rows.append(torch.cat(parts)[:t])
    return torch.stack(rows)


def _inputs(b=2, t=24, m=4, k=2, r=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(b, t, D, generator=g, dtype=dtype)
    enc = torch.randn(b, t // m, k, r, D, generator=g, dtype=dtype)
    return h, enc


@pytest.mark.parametrize("t", [24, 26, 4, 7])
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_cca_matches_per_chunk_reference(t, rotary, masked):
    m = 4
    torch.manual_seed(t)
    cca = ChunkedCrossAttention(D, H, chunk_size=m, rotary=rotary).double()
    h, enc = _inputs(t=t, m=m, seed=t)
    pad = None
    if masked:
        pad = torch.rand(enc.shape[:4]) < 0.4
        pad[0, 0] = True  # chunk 0 of example 0 retrieved nothing
    h1, e1 = h.clone().requires_grad_(), enc.clone().requires_grad_()
    h2, e2 = h.clone().requires_grad_(), enc.clone().requires_grad_()
    out = cca(h1, e1, neighbour_pad_mask=pad)
    ref = cca_reference(cca, h2, e2, pad)
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    grads = torch.autograd.grad((out * w).sum(), [h1, e1, cca.attn.to_q.weight])
    ref_grads = torch.autograd.grad((ref * w).sum(), [h2, e2, cca.attn.to_q.weight])
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("u", [0, 2, 5])
def test_cca_causal_offset(u):
    m, t = 4, 24
    cca = ChunkedCrossAttention(D, H, chunk_size=m).double()
    h, enc = _inputs(t=t, m=m)
    out = cca(h, enc)
    enc2 = enc.clone()
    enc2[:, u] += torch.randn_like(enc2[:, u])
    out2 = cca(h, enc2)
    first = u * m + m - 1  # the token that completes chunk u
    changed = (out - out2).abs().amax(dim=(0, 2)) > 1e-9  # (T,)
    assert not changed[:first].any()
    assert changed[first : min(first + m, t)].all()
    assert not changed[first + m :].any()  # CCA alone: chunk u feeds only its attending chunk
    assert (out[:, : m - 1] == 0).all()


def test_encoder_and_cca_are_causal_in_decoder_states():
    """Perturbing the decoder state at position p never changes outputs before p."""
    m, t = 4, 20
    torch.manual_seed(1)
    enc_mod = NeighbourEncoder(D, H, depth=2, chunk_size=m).double()
    cca = ChunkedCrossAttention(D, H, chunk_size=m).double()
    h, nb = _inputs(t=t, m=m)

    def run(hh):
        return hh + cca(hh, enc_mod(nb, hh))

    base = run(h)
    for p in (0, 3, 5, 11, 19):
        h2 = h.clone()
        h2[:, p] += 1.0
        diff = (run(h2) - base).abs().amax(dim=(0, 2))
        assert (diff[:p] == 0).all(), p
        assert diff[p:].max() > 0


def test_encoder_attends_to_its_own_chunk():
    m, t = 4, 16
    enc_mod = NeighbourEncoder(D, H, depth=1, chunk_size=m).double()
    h, nb = _inputs(t=t, m=m)
    base = enc_mod(nb, h)
    h2 = h.clone()
    h2[:, 2 * m + 1] += 1.0  # a position inside chunk 2
    diff = (enc_mod(nb, h2) - base).abs().amax(dim=(0, 2, 3, 4))  # (L,)
    assert diff[2] > 0
    assert (diff[torch.arange(len(diff)) != 2] == 0).all()


def test_padding_in_neighbours_is_ignored():
    """Values at padded neighbour positions influence neither the encoder's real tokens nor CCA."""
    m, t = 4, 16
    torch.manual_seed(2)
    enc_mod = NeighbourEncoder(D, H, depth=2, chunk_size=m).double()
    cca = ChunkedCrossAttention(D, H, chunk_size=m).double()
    h, nb = _inputs(t=t, m=m)
    pad = torch.zeros(nb.shape[:4], dtype=torch.bool)
    pad[..., 6:] = True  # continuations cut short at a document end
    pad[1, 2] = True  # no neighbour at all for chunk 2 of example 1
    out = cca(h, enc_mod(nb, h, neighbour_pad_mask=pad), neighbour_pad_mask=pad)
    nb2 = nb.masked_fill(pad[..., None], 3.0)
    out2 = cca(h, enc_mod(nb2, h, neighbour_pad_mask=pad), neighbour_pad_mask=pad)
    torch.testing.assert_close(out, out2)
    assert (out[1, 2 * m + m - 1 : 3 * m + m - 1] == 0).all()


def test_retrieval_off_is_the_plain_decoder():
    cca = ChunkedCrossAttention(D, H, chunk_size=4)
    encoder = NeighbourEncoder(D, H, chunk_size=4)
    h = torch.randn(2, 12, D)
    assert encoder(None, h) is None
    assert torch.equal(h + cca(h, None), h)
    empty = torch.randn(2, 3, 0, 8, D)  # K = 0
    assert encoder(empty, h) is None
    assert torch.equal(h + cca(h, empty), h)


def test_float32_forward_backward_shapes():
    m, t, k, r = 8, 32, 2, 16
    encoder = NeighbourEncoder(D, H, chunk_size=m)
    cca = ChunkedCrossAttention(D, H, chunk_size=m)
    h = torch.randn(3, t, D, requires_grad=True)
    nb = torch.randn(3, t // m, k, r, D, requires_grad=True)
    e = encoder(nb, h)
    assert e.shape == nb.shape
    out = cca(h, e)
    assert out.shape == h.shape
    out.square().mean().backward()
    assert torch.isfinite(h.grad).all() and nb.grad.abs().sum() > 0


def test_validation_errors_name_keys():
    with pytest.raises(ValueError, match=r"model\.retro\.num_heads=3"):
        ChunkedCrossAttention(16, 3)
    with pytest.raises(ValueError, match=r"model\.retro\.chunk_size=0"):
        ChunkedCrossAttention(16, 2, chunk_size=0)
    with pytest.raises(ValueError, match=r"model\.retro\.encoder_depth=0"):
        NeighbourEncoder(16, 2, depth=0)
    cca = ChunkedCrossAttention(D, H, chunk_size=4)
    with pytest.raises(ValueError, match="L=2 chunks, expected"):
        cca(torch.randn(1, 16, D), torch.randn(1, 2, 1, 8, D))
