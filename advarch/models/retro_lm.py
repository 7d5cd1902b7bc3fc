"""RETRO decoder wiring (Borgeaud et al. 2022, §2.4 and App. B): CCA inside decoder layers.

Shape legend: B batch, T time, D model dim, m chunk size, L = T // m chunks, K neighbours per
chunk, R neighbour length (chunk + continuation).

RETRO's decoder layer ℓ ∈ P is ATTN → CCA → FFN, each a pre-norm residual sub-layer (paper
Algorithm 1; P = every third layer from layer 6 of 32, i.e. 0-based {5, 8, …, 29}). At the
first layer of P the neighbours are encoded once (eq. 2: the encoder reads the decoder's token
embeddings of the neighbours and cross-attends to that layer's states of the chunk they were
retrieved for); every CCA layer then attends to the same encoding with the causal offset of
`ChunkedCrossAttention`. `cca_layers=null` scales P to a shallow stack: every third layer from
min(5, depth // 2). Retrieval off (neighbours None or K = 0) runs the plain decoder layers
unchanged, so the same weights serve with and without retrieval.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from advarch.models.blocks.norm import make_norm
from advarch.models.blocks.retro import ChunkedCrossAttention, NeighbourEncoder
from advarch.models.layers import Layer, LayerContext
from advarch.spec import DataSpec


def default_cca_layers(depth: int) -> list[int]:
    """RETRO's placement scaled to `depth`: every third layer from min(5, depth // 2)."""
    return list(range(min(5, depth // 2), depth, 3))


class RetroAdapter(nn.Module):
    """Neighbour encoder plus per-layer CCA sub-layers for a decoder stack (`Model.layers`).

    Args:
        dim: model width D.
        num_layers: decoder depth (`model.depth`).
        spec: the DataSpec; must describe data with retrieval neighbours.
        num_heads: attention heads of the encoder and CCA (`model.num_heads`).
        norm: `rmsnorm` or `layernorm` (`model.norm`).
        cca_layers: 0-based decoder layers with a CCA sub-layer; None = RETRO's placement.
        encoder_depth: neighbour-encoder layers (RETRO uses 2).
        encoder_ffn_hidden: encoder feed-forward width (None = 4·dim).
        activation: encoder feed-forward activation, `gelu` or `swiglu`.
        chunk_size: retrieval chunk m; None takes the data's `data.retrieval.chunk_size`.
        rotary: relative rotary positions in the encoder and CCA.
        dropout: attention and feed-forward dropout of the encoder and CCA.
    """

    def __init__(
        self,
        dim: int,
        num_layers: int,
        spec: DataSpec,
        *,
        num_heads: int,
        norm: str = "rmsnorm",
        cca_layers: Sequence[int] | None = None,
        encoder_depth: int = 2,
        encoder_ffn_hidden: int | None = None,
        activation: str = "gelu",
        chunk_size: int | None = None,
        rotary: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spec.retrieval_neighbours <= 0:
            raise ValueError("model=retro needs data with retrieval (data=text_retrieval)")
        if chunk_size is not None and chunk_size != spec.retrieval_chunk:
            raise ValueError(
                f"model.retro.chunk_size={chunk_size} differs from "
                f"data.retrieval.chunk_size={spec.retrieval_chunk} (use null to follow the data)"
            )
        m = spec.retrieval_chunk
        layers = default_cca_layers(num_layers) if cca_layers is None else list(cca_layers)
        bad = [i for i in layers if not 0 <= i < num_layers]
        if not layers or bad or len(set(layers)) != len(layers):
            raise ValueError(
                f"model.retro.cca_layers={layers} must be distinct layer indices in "
                f"[0, {num_layers}) (model.depth={num_layers}), at least one"
            )
        self.cca_layers = tuple(sorted(layers))
        self.pad_id = spec.pad_id
        self.encoder = NeighbourEncoder(
            dim,
            num_heads,
            depth=encoder_depth,
            chunk_size=m,
            ffn_hidden=encoder_ffn_hidden,
            activation=activation,
            norm=norm,
            rotary=rotary,
            dropout=dropout,
        )
        self.cca = nn.ModuleDict(
            {str(i): ChunkedCrossAttention(dim, num_heads, m, rotary, dropout) for i in layers}
        )
        self.cca_norm = nn.ModuleDict({str(i): make_norm(norm, dim) for i in layers})

    def run(
        self,
        layers: nn.ModuleList,
        h: torch.Tensor,
        ctx: LayerContext,
        inputs: torch.Tensor,
        neighbours: torch.Tensor | None,
        embed: nn.Embedding,
    ) -> torch.Tensor:
        """Decoder states h (B, T, D) through `layers` with CCA at `cca_layers` -> (B, T, D).

        Steps: 1. retrieval off → plain layers; 2. embed neighbours (B, L, K, R) with the
        decoder's table; 3. per layer: mixer; at a CCA layer encode the neighbours (first
        time only) and add CCA; FFN.

        Args:
            inputs: (B, T) token ids (unused here; the decoder input is already `h`).
            neighbours: (B, L, K, R) token ids, `pad_id` at padding; None = retrieval off.
        """
        if neighbours is None or neighbours.shape[2] == 0:
            for layer in layers:
                h = layer(h, ctx)
            return h
        pad = neighbours == self.pad_id if self.pad_id >= 0 else None  # (B, L, K, R)
        nb_emb = embed(neighbours)  # (B, L, K, R, D)
        encoded = None
        for i, layer in enumerate(layers):
            if str(i) not in self.cca:
                h = layer(h, ctx)
                continue
            h = _mixer_sublayer(layer, h, ctx)
            if encoded is None:
                encoded = self.encoder(nb_emb, h, neighbour_pad_mask=pad)  # (B, L, K, R, D)
            h = h + self.cca[str(i)](self.cca_norm[str(i)](h), encoded, neighbour_pad_mask=pad)
            h = _ffn_sublayer(layer, h, ctx)
        return h


def _mixer_sublayer(layer: Layer, h: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """The first half of `Layer.forward` (decoder-only stacks have no cross-attention)."""
    if layer.cross is not None:
        raise ValueError("model.retro works on decoder-only stacks (no encoder cross-attention)")
    return h if layer.mixer is None else h + layer._mix(layer.mixer_norm(h), ctx)


def _ffn_sublayer(layer: Layer, h: torch.Tensor, ctx: LayerContext) -> torch.Tensor:
    """The second half of `Layer.forward`: the pre-norm FFN or MoE residual."""
    return h if layer.ffn is None else h + layer._ffn(layer.ffn_norm(h), ctx)
