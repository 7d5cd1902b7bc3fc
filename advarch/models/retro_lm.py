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
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from advarch.models.blocks.config import ACTIVATIONS, BlockConfig, Checks, ModelShape
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
        config = RetroConfig(
            cca_layers=cca_layers,
            encoder_depth=encoder_depth,
            encoder_ffn_hidden=encoder_ffn_hidden,
            activation=activation,
            chunk_size=chunk_size,
            rotary=rotary,
            dropout=dropout,
        )
        config.validate(ModelShape(dim=dim, depth=num_layers, num_heads=num_heads, norm=norm))
        m = spec.retrieval_chunk
        layers = config.layers(num_layers)
        self.cca_layers = tuple(sorted(layers))
        self.pad_id = spec.pad_id
        self.neighbours, self.neighbour_len = (
            spec.retrieval_neighbours,
            spec.retrieval_neighbour_len,
        )
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
        neighbours: torch.Tensor | None,
        embed: nn.Embedding,
    ) -> torch.Tensor:
        """Decoder states h (B, T, D) through `layers` with CCA at `cca_layers` -> (B, T, D).

        Steps: 1. retrieval off → plain layers; 2. embed neighbours (B, L, K, R) with the
        decoder's table; 3. per layer: mixer; at a CCA layer encode the neighbours (first
        time only) and add CCA; FFN.

        Args:
            neighbours: (B, L, K, R) token ids, `pad_id` at padding; None = retrieval off.
        """
        if neighbours is None or neighbours.shape[2] == 0:
            for layer in layers:
                h = layer(h, ctx)
            return h
        pad = self._pad_mask(neighbours)
        nb_emb = embed(neighbours)  # (B, L, K, R, D)
        encoded = None
        for i, layer in enumerate(layers):
            if i not in self.cca_layers:
                h = layer(h, ctx)
                continue
            h = _decoder_only(layer).mixer_residual(h, ctx)
            if encoded is None:
                encoded = self.encoder(nb_emb, h, neighbour_pad_mask=pad)  # (B, L, K, R, D)
            h = h + self.cca[str(i)](self.cca_norm[str(i)](h), encoded, neighbour_pad_mask=pad)
            h = layer.ffn_residual(h, ctx)
        return h

    def init_state(self, layer_states: list[Any]) -> RetroDecodeState:
        """Incremental-decoding state around the decoder layers' own states."""
        return RetroDecodeState(layers=layer_states)

    def step(
        self,
        layers: nn.ModuleList,
        h: torch.Tensor,
        state: RetroDecodeState,
        ctx: LayerContext,
        neighbours: torch.Tensor | None,
        embed: nn.Embedding,
    ) -> tuple[torch.Tensor, RetroDecodeState]:
        """One new token's embedding h (B, 1, D) through `layers` -> (B, 1, D), new state.

        Equals `run` on the whole prefix at the last position: decoder layers advance their
        caches; the first CCA layer keeps its states of the current chunk, and when this token
        completes a chunk, the chunk's neighbours are encoded against them; every position
        from there to the next completion attends to that one encoding (O(K·R) per token).

        Args:
            neighbours: (B, 1, K, R) token ids of the chunk this token completes (retrieved
                after seeing it); None when it completes none or retrieval is off.
        """
        m, t = self.encoder.chunk_size, state.position
        completes = (t + 1) % m == 0
        if neighbours is not None and not completes:
            raise ValueError(
                f"neighbours arrive with the token that completes a chunk of {m}; "
                f"token {t} completes none"
            )
        chunk_states, encoded, pad = state.chunk_states, state.encoded, state.pad
        new_states = []
        for i, (layer, s) in enumerate(zip(layers, state.layers, strict=True)):
            if i not in self.cca_layers:
                h, s = layer.step(h, s, ctx)
                new_states.append(s)
                continue
            h, s = _decoder_only(layer).mixer_step(h, s)
            new_states.append(s)
            if i == self.cca_layers[0]:
                chunk_states = h if t % m == 0 else torch.cat([chunk_states, h], 1)  # (B, ≤m, D)
                if completes:  # a chunk without neighbours informs nothing, as in `run`
                    encoded, pad = None, None
                    if neighbours is not None and neighbours.shape[2] > 0:
                        pad = self._pad_mask(neighbours)
                        encoded = self.encoder(embed(neighbours), chunk_states,
                                               neighbour_pad_mask=pad)  # fmt: skip
            if encoded is not None:
                query = self.cca_norm[str(i)](h)
                h = h + self.cca[str(i)].step(query, encoded, (t + 1) % m, neighbour_pad_mask=pad)
            h = layer.ffn_residual(h, ctx)
        new = RetroDecodeState(new_states, t + 1, chunk_states, encoded, pad)
        return h, new

    def prefill(
        self,
        layers: nn.ModuleList,
        h: torch.Tensor,
        ctx: LayerContext,
        neighbours: torch.Tensor | None,
        embed: nn.Embedding,
    ) -> tuple[torch.Tensor, RetroDecodeState]:
        """`run` over a prompt's embeddings h (B, T, D), with the state `step` goes on from.

        Each layer runs in one pass (`Layer.prefill`); the state keeps what T calls of `step`
        would: the layers' states, the first CCA layer's states of the current chunk (the
        positions from ⌊(T − 1) / m⌋·m on) and the encoding of the last completed chunk's
        neighbours, which the positions up to the next completion attend to.

        Args:
            neighbours: (B, T // m, K, R) token ids of every completed chunk; None (or K = 0,
                or T < m) = no retrieval.
        """
        T, m = h.shape[1], self.encoder.chunk_size
        if neighbours is not None and (neighbours.shape[1] == 0 or neighbours.shape[2] == 0):
            neighbours = None  # nothing retrieved: the plain layers, as in `run`
        pad = None if neighbours is None else self._pad_mask(neighbours)
        encoded = chunk_states = None
        states = []
        for i, layer in enumerate(layers):
            if i not in self.cca_layers:
                h, s = layer.prefill(h, ctx)
                states.append(s)
                continue
            h, s = _decoder_only(layer).mixer_prefill(h)
            states.append(s)
            if i == self.cca_layers[0]:
                chunk_states = h[:, (T - 1) // m * m :]  # (B, ≤m, D)
                if neighbours is not None:
                    encoded = self.encoder(embed(neighbours), h, neighbour_pad_mask=pad)
            if encoded is not None:
                h = h + self.cca[str(i)](self.cca_norm[str(i)](h), encoded, neighbour_pad_mask=pad)
            h = layer.ffn_residual(h, ctx)
        last_encoded = None if encoded is None else encoded[:, -1:]  # (B, 1, K, R, D)
        last_pad = None if pad is None else pad[:, -1:]
        return h, RetroDecodeState(states, T, chunk_states, last_encoded, last_pad)

    def _pad_mask(self, neighbours: torch.Tensor) -> torch.Tensor | None:
        return neighbours == self.pad_id if self.pad_id >= 0 else None  # (B, L, K, R)


@dataclass
class RetroDecodeState:
    """What RETRO carries from one decoded token to the next.

    Shapes: B batch, D model dim, m chunk, K neighbours, R neighbour length.
    """

    layers: list[Any]  # each decoder layer's mixer state (KV cache, SSM state)
    position: int = 0  # tokens consumed so far
    chunk_states: torch.Tensor | None = None  # (B, ≤m, D) first CCA layer, current chunk
    encoded: torch.Tensor | None = None  # (B, 1, K, R, D) neighbours of the last full chunk
    pad: torch.Tensor | None = None  # (B, 1, K, R) True at neighbour padding


def _decoder_only(layer: Layer) -> Layer:
    """`layer`, refused if it cross-attends to an encoder (RETRO wires decoder-only stacks)."""
    if layer.cross is not None:
        raise ValueError("model.retro works on decoder-only stacks (no encoder cross-attention)")
    return layer


@dataclass(frozen=True)
class RetroConfig(BlockConfig):
    """`model.retro`: RETRO options (see `RetroAdapter`); the data must carry neighbours."""

    name: ClassVar[str] = "retro"

    cca_layers: Sequence[int] | None = None
    encoder_depth: int = 2
    encoder_ffn_hidden: int | None = None
    activation: str = "gelu"
    chunk_size: int | None = None
    rotary: bool = True
    dropout: float = 0.0

    def layers(self, depth: int) -> list[int]:
        """The decoder layers with CCA: `cca_layers`, or RETRO's placement scaled to `depth`."""
        return default_cca_layers(depth) if self.cca_layers is None else list(self.cca_layers)

    def checks(self, shape: ModelShape) -> Checks:
        yield shape.heads_check()  # the encoder's attention and CCA
        layers, depth = self.layers(shape.depth), shape.depth
        bad = [i for i in layers if not 0 <= i < depth]
        yield (
            bool(layers) and not bad and len(set(layers)) == len(layers),
            f"{self.key('cca_layers')}={layers} must be distinct layer indices in [0, {depth}) "
            f"(model.depth={depth}), at least one",
        )
        yield from self.at_least_one("encoder_depth")
        hidden = self.encoder_ffn_hidden
        yield (
            hidden is None or hidden >= 1,
            f"{self.key('encoder_ffn_hidden')}={hidden} must be >= 1 or null",
        )
        yield (
            self.activation in ACTIVATIONS,
            f"{self.key('activation')}={self.activation!r} is not one of: "
            + ", ".join(ACTIVATIONS),
        )
        size = self.chunk_size
        yield size is None or size >= 1, f"{self.key('chunk_size')}={size} must be >= 1 or null"
        yield 0.0 <= self.dropout < 1.0, f"{self.key('dropout')}={self.dropout} must be in [0, 1)"

    def build_adapter(self, shape: ModelShape, spec: DataSpec) -> RetroAdapter:
        """The RETRO adapter of a decoder of `shape` over data described by `spec`."""
        return RetroAdapter(
            shape.dim,
            shape.depth,
            spec,
            num_heads=shape.num_heads,
            norm=shape.norm,
            **self.options(),
        )
