"""The advarch model: an input adapter, a stack of layers built from patterns, and a head.

One class covers every kind of data the DataSpec describes:

- `lm`: causal decoder over tokens, tied LM head (optionally RETRO chunked cross-attention);
- `classification` / `regression`: bidirectional encoder over tokens or feature patches,
  mean-pooled, one head or one head per task;
- `seq2seq`: bidirectional encoder + causal decoder with cross-attention.

Hybrid stacks come from the `layers` (mixers) and `ffn` patterns, repeated to `depth`:
`layers=[ssm, attn]`, `ffn=[dense, moe]` gives ssm+dense, attn+moe, ssm+dense, …
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from advarch.models.blocks.attention import Attention
from advarch.models.blocks.config import BlockConfig
from advarch.models.blocks.moe import MoEConfig
from advarch.models.blocks.norm import make_norm
from advarch.models.blocks.sliding_window import (
    CAUSAL_GLOBAL_TOKENS,
    SlidingWindowAttention,
    SlidingWindowConfig,
)
from advarch.models.blocks.ssd import Mamba2, SSDConfig
from advarch.models.blocks.ssm import SelectiveSSM, SSMConfig
from advarch.models.layers import Layer, LayerContext, RoutedFFN
from advarch.models.output import ModelOutput
from advarch.models.registry import BLOCKS, build_block, check_model, expand_pattern
from advarch.models.retro_lm import RetroConfig
from advarch.spec import DataSpec

Options = Mapping[str, Any]  # a block's `model.<name>` mapping as composed from YAML


class Model(nn.Module):
    """A backbone sized from the DataSpec; see the module docstring for the kinds."""

    OUTPUT_LAYERS = ("head.*",)  # after the pooled features (`OutputLayers`)

    def __init__(
        self,
        spec: DataSpec,
        dim: int = 256,
        depth: int = 4,
        num_heads: int = 4,
        layers: str | Sequence[str] = "attn",
        ffn: str | Sequence[str] = "dense",
        ffn_hidden: int | None = None,
        activation: str = "gelu",
        norm: str = "rmsnorm",
        dropout: float = 0.0,
        tie_embeddings: bool = True,
        feature_patch: int = 8,
        encoder_depth: int | None = None,
        heads: str = "auto",
        moe: MoEConfig | Options | None = None,
        swa: SlidingWindowConfig | Options | None = None,
        ssm: SSMConfig | Options | None = None,
        ssd: SSDConfig | Options | None = None,
        retro: RetroConfig | Options | None = None,
        **blocks: BlockConfig | Options | None,
    ) -> None:
        """Check every option (`check_model`), then build input, layers, norm and head.

        Block options (`moe`, `swa`, `ssm`, `ssd`, `retro`, and `blocks`: those of blocks a
        project registers itself in `BLOCKS`, by name) are typed configs or the YAML mappings
        they parse; `retro` left empty builds no RETRO adapter.
        """
        super().__init__()
        self.shape, self.block_configs = check_model(
            dict(
                dim=dim, depth=depth, num_heads=num_heads, layers=layers, ffn=ffn,
                ffn_hidden=ffn_hidden, activation=activation, norm=norm, dropout=dropout,
                encoder_depth=encoder_depth, moe=moe, swa=swa, ssm=ssm, ssd=ssd, retro=retro,
                **self.registered(blocks),
            )
        )  # fmt: skip
        self.spec, self.dim = spec, dim
        self.input = self._make_input(spec, dim, feature_patch)
        causal = spec.kind in ("lm", "seq2seq")
        mixers = expand_pattern(layers, depth, "mixer")
        global_tokens = self.block_configs["swa"].global_tokens
        if spec.kind == "lm" and global_tokens and "swa" in mixers:
            raise ValueError(CAUSAL_GLOBAL_TOKENS.format(list(global_tokens)))
        ffns = expand_pattern(ffn, depth, "ffn")
        if spec.kind == "seq2seq":
            enc_depth = depth if encoder_depth is None else encoder_depth
            self.encoder = self._stack(
                expand_pattern(layers, enc_depth, "mixer"),
                expand_pattern(ffn, enc_depth, "ffn"),
                causal=False,
            )
            self.encoder_norm = make_norm(norm, dim)
            self.target_embed = (
                self.input
                if not spec.target_vocab_size or spec.target_vocab_size == spec.vocab_size
                else nn.Embedding(spec.target_vocab_size, dim)
            )
        self.layers = self._stack(
            mixers,
            ffns,
            causal=causal,
            cross=spec.kind == "seq2seq",
            first_index=len(self.encoder) if spec.kind == "seq2seq" else 0,
        )
        self.final_norm = make_norm(norm, dim)
        self.retro = self._make_retro(spec) if retro else None
        self.head, self.num_heads_out = self._make_head(spec, heads, tie_embeddings)
        self.apply(self._init_weights)

    def reach_notes(self) -> list[str]:
        """A line per kind of layer that sees other tokens than its stack suggests: sliding
        windows that cover the whole sequence (full attention, at the window's cost), and
        recurrences (ssm, ssd) in a seq2seq encoder, which read the source left to right."""
        T, notes = self.spec.seq_len, []
        covering = [
            m.window
            for m in self.modules()
            if isinstance(m, SlidingWindowAttention)
            and (m.window >= T if m.causal else m.window // 2 >= T - 1)
        ]
        if T > 1 and covering:
            notes.append(
                f"model.swa.window={max(covering)} covers the data's {T}-token sequences: the "
                f"sliding-window layers attend to all of them (full attention); set "
                f"model.swa.window below {T} for a window"
            )
        encoder = getattr(self, "encoder", None)
        if encoder is not None and any(
            isinstance(m, SelectiveSSM | Mamba2) for m in encoder.modules()
        ):
            notes.append(
                "the seq2seq encoder's ssm/ssd layers read the source left to right (a "
                "recurrence): each source token sees only those before it"
            )
        return notes

    # -- construction -------------------------------------------------------------------------
    @staticmethod
    def _make_input(spec: DataSpec, dim: int, feature_patch: int) -> nn.Module:
        if spec.vocab_size:
            return nn.Embedding(spec.vocab_size, dim)
        if spec.num_features:
            if feature_patch < 1:
                raise ValueError(f"model.feature_patch={feature_patch} must be >= 1")
            return FeaturePatches(spec.num_features, feature_patch, dim)
        raise ValueError(f"data spec {spec.kind!r} has neither vocab_size nor num_features")

    def _stack(
        self,
        mixers: list[str],
        ffns: list[str],
        causal: bool,
        cross: bool = False,
        first_index: int = 0,
    ) -> nn.ModuleList:
        shape, configs = self.shape, self.block_configs
        out = nn.ModuleList()
        for i, (mixer_kind, ffn_kind) in enumerate(zip(mixers, ffns, strict=True)):
            mixer = build_block(mixer_kind, configs, shape, causal)
            ffn = build_block(ffn_kind, configs, shape, causal)
            cross_attn = (
                Attention(self.dim, shape.num_heads, cross=True, dropout=shape.dropout)
                if cross
                else None
            )
            out.append(Layer(first_index + i, self.dim, mixer, ffn, shape.norm, cross=cross_attn))
        return out

    def _make_retro(self, spec: DataSpec) -> nn.Module:
        if spec.kind != "lm":
            raise ValueError(f"model.retro needs language-model data, got data kind {spec.kind!r}")
        return self.block_configs["retro"].build_adapter(self.shape, spec)

    def _make_head(self, spec: DataSpec, heads: str, tie: bool) -> tuple[nn.Linear, int]:
        if heads not in ("auto", "single", "per_task"):
            raise ValueError(f"model.heads={heads!r} is not one of: auto, single, per_task")
        if spec.kind in ("lm", "seq2seq"):
            vocab = spec.target_vocab_size or spec.vocab_size
            head = nn.Linear(self.dim, vocab, bias=False)
            embed = self.target_embed if spec.kind == "seq2seq" else self.input
            if tie and isinstance(embed, nn.Embedding) and embed.num_embeddings == vocab:
                head.weight = embed.weight
            return head, 1
        n = head_groups(spec, heads)
        return nn.Linear(self.dim, n * max(spec.num_classes, 1)), n

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        """GPT-2's N(0, 0.02) for every Linear and Embedding, zero biases; a layer its block
        initialised on purpose (`keeps_init`, e.g. Mamba's Δ projection) keeps that init."""
        if getattr(module, "keeps_init", False):
            return
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    # -- forward ------------------------------------------------------------------------------
    def forward(
        self,
        inputs: torch.Tensor,
        *,
        pad_mask: torch.Tensor | None = None,
        global_mask: torch.Tensor | None = None,
        expert_mask: torch.Tensor | None = None,
        decoder_input_ids: torch.Tensor | None = None,
        neighbours: torch.Tensor | None = None,
    ) -> ModelOutput:
        """inputs: (B, T) token ids or (B, F) features. Returns logits per the kind:
        lm/seq2seq (B, T, V); classification (B, C) or (B, tasks, C) with per-task heads;
        regression (B, tasks)."""
        ctx = LayerContext(pad_mask=pad_mask, global_mask=global_mask, expert_mask=expert_mask)
        padded = self.spec.padded_inputs and self.spec.pad_id >= 0
        if pad_mask is None and padded and not inputs.is_floating_point():
            ctx.pad_mask = inputs == self.spec.pad_id
        h = self.input(inputs)  # (B, T, D)
        if self.spec.kind == "seq2seq":
            h = self._run_seq2seq(h, decoder_input_ids, ctx)
        elif self.retro is not None:
            h = self.retro.run(self.layers, h, ctx, neighbours, self.input)
        else:
            for layer in self.layers:
                h = layer(h, ctx)
        h = self.final_norm(h)
        features = None
        if self.spec.kind in ("classification", "regression"):
            features = self._pool(h, ctx.pad_mask)  # (B, D)
            logits = self._classify(features)
        else:
            logits = self.head(h)
        aux = torch.stack(ctx.aux_losses).sum() if ctx.aux_losses else h.new_zeros(())
        return ModelOutput(logits=logits, aux_loss=aux, stats=ctx.stats, features=features)

    def _run_seq2seq(
        self, h: torch.Tensor, decoder_input_ids: torch.Tensor | None, ctx: LayerContext
    ) -> torch.Tensor:
        if decoder_input_ids is None:
            raise ValueError("seq2seq models need decoder_input_ids in the batch")
        for layer in self.encoder:
            h = layer(h, ctx)
        ctx.memory, ctx.memory_pad_mask = self.encoder_norm(h), ctx.pad_mask
        ctx.pad_mask = ctx.global_mask = None  # (source positions: the decoder is causal)
        d = self.target_embed(decoder_input_ids)
        for layer in self.layers:
            d = layer(d, ctx)
        return d

    @staticmethod
    def _pool(h: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor:
        if pad_mask is None:
            return h.mean(1)
        keep = (~pad_mask).unsqueeze(-1).to(h.dtype)
        return (h * keep).sum(1) / keep.sum(1).clamp_min(1.0)

    def _classify(self, features: torch.Tensor) -> torch.Tensor:
        logits = self.head(features)
        if self.spec.kind == "regression":
            return logits  # (B, tasks) when per-task, (B, 1) otherwise
        if self.num_heads_out > 1:
            return logits.view(features.shape[0], self.num_heads_out, -1)  # (B, tasks, C)
        return logits

    # -- incremental decoding -----------------------------------------------------------------
    def init_state(self, batch_size: int) -> Any:
        """Recurrent state for `step`: per-layer KV caches and SSM states (plus RETRO's)."""
        p = next(self.parameters())
        states = [layer.init_state(batch_size, p.device, p.dtype) for layer in self.layers]
        return states if self.retro is None else self.retro.init_state(states)

    def step(
        self, token: torch.Tensor, state: Any, neighbours: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        """token: (B, 1) newest ids → next-token logits (B, V) and the advanced state.

        RETRO: `neighbours` (B, 1, K, R) are those of the chunk this token completes.
        """
        self._check_decoding(neighbours)
        ctx = LayerContext()
        h = self.input(token)
        if self.retro is not None:
            h, state = self.retro.step(self.layers, h, state, ctx, neighbours, self.input)
        else:
            new_state = []
            for layer, s in zip(self.layers, state, strict=True):
                h, s = layer.step(h, s, ctx)
                new_state.append(s)
            state = new_state
        return self.head(self.final_norm(h))[:, -1], state

    def prefill(
        self, tokens: torch.Tensor, neighbours: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Any]:
        """A prompt (B, T) → next-token logits (B, V) and the decoding state after it.

        What `init_state` and T calls of `step` give, from one pass of every layer in its
        sequence-parallel form (`Layer.prefill`): KV caches from the prompt's keys and values,
        SSM states from the scans' final states; no loop over the prompt's tokens. FFNs and
        MoE act per token (an MoE in eval mode is dropless, so a token routes alike either way).

        RETRO: `neighbours` (B, T // m, K, R) are those of every chunk the prompt completes, as
        `step` would have received them one chunk at a time.
        """
        self._check_decoding(neighbours)
        ctx = LayerContext()
        h = self.input(tokens)  # (B, T, D)
        if self.retro is not None:
            h, state = self.retro.prefill(self.layers, h, ctx, neighbours, self.input)
        else:
            state = []
            for layer in self.layers:
                h, s = layer.prefill(h, ctx)
                state.append(s)
        return self.head(self.final_norm(h[:, -1:]))[:, -1], state

    def _check_decoding(self, neighbours: torch.Tensor | None) -> None:
        """ValueError unless this is a decoder LM and neighbours come only to a RETRO model."""
        if self.spec.kind != "lm":
            raise ValueError("incremental decoding needs a decoder language model")
        if neighbours is not None and self.retro is None:
            raise ValueError("neighbours given to a model without model.retro")

    def moe_layers(self) -> list[RoutedFFN]:
        """The MoE sub-layers, in order (for expert masks, merging and finetuning)."""
        return [layer.ffn for layer in self.modules() if isinstance(layer, Layer) and layer.is_moe]

    @classmethod
    def check_options(cls, **options: Any) -> None:
        """Every check the constructor makes on its keywords (all but `spec`), building nothing:
        what `advarch.pipeline.validate` runs before any data is read."""
        bound = inspect.signature(cls).bind_partial(**options)
        bound.apply_defaults()
        arguments = dict(bound.arguments)
        check_model({**arguments, **cls.registered(arguments.pop("blocks", {}))})

    @staticmethod
    def registered(blocks: Mapping[str, Any]) -> Mapping[str, Any]:
        """`blocks` (the keywords beyond the named ones), each a block in `BLOCKS` that has
        options (`attn` and `dense` have none); else a ValueError naming the first other one,
        as an unknown option of the model."""
        named = [p for p in inspect.signature(Model).parameters if p not in ("spec", "blocks")]
        own = [n for n, b in BLOCKS.items() if n not in named and dataclasses.fields(b.config)]
        unknown = [name for name in blocks if name not in own]
        if unknown:
            known = ", ".join([*named, *own])
            raise ValueError(
                f"model.{unknown[0]} is not an option of advarch.models.Model (options: {known})"
            )
        return blocks


class FeaturePatches(nn.Module):
    """(B, F) features → (B, ⌈F/p⌉, D) tokens: each group of p features is one token; the
    last group is zero-padded when p does not divide F (e.g. 100 features in patches of 8)."""

    def __init__(self, num_features: int, patch: int, dim: int) -> None:
        super().__init__()
        self.patch = patch
        self.pad = -num_features % patch  # zeros appended to fill the last patch
        self.proj = nn.Linear(patch, dim)
        self.position = nn.Parameter(torch.zeros(-(-num_features // patch), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = F.pad(x, (0, self.pad)) if self.pad else x  # (B, ⌈F/p⌉·p)
        return self.proj(x.view(b, -1, self.patch).to(self.proj.weight.dtype)) + self.position


def head_groups(spec: DataSpec, heads: str = "auto") -> int:
    """How many groups of `spec.num_classes` outputs a classifier's head has: one per task
    (`model.heads=per_task`, or `auto` on a task-incremental stream), else one shared by
    every task (a domain or class scenario, single-task data)."""
    scenario = spec.extras.get("scenario", "task")
    per_task = heads == "per_task" or (
        heads == "auto" and spec.num_tasks > 1 and scenario == "task"
    )
    return spec.num_tasks if per_task else 1
