"""PyTorch's own `nn.TransformerEncoder` as a causal language model, trained by advarch.

The whole contract a model needs: a constructor that takes the datamodule's `spec` (plus its
own typed options, which are the YAML's keys) and a `forward` that returns a `ModelOutput`.
"""

from __future__ import annotations

import torch
from torch import nn

from advarch.models.output import ModelOutput
from advarch.spec import DataSpec


class TorchTransformerLM(nn.Module):
    """Token embedding + learned positions → pre-norm `nn.TransformerEncoder` (causal) → logits.

    Args:
        spec: the datamodule's DataSpec (vocabulary and sequence length).
        dim: model width.
        depth: encoder layers.
        num_heads: attention heads.
        ffn_hidden: feed-forward width.
        dropout: dropout in every layer.

    Raises:
        ValueError: an option out of range, naming its key as the YAML does (`model.dim=0`).
    """

    def __init__(
        self,
        spec: DataSpec,
        dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        ffn_hidden: int = 512,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if spec.kind != "lm":
            raise ValueError(f"model=torch_transformer needs language-model data, got {spec.kind}")
        # the framework prints a constructor's ValueError as one line: name the key as in YAML
        sizes = {"dim": dim, "depth": depth, "num_heads": num_heads, "ffn_hidden": ffn_hidden}
        for key, value in sizes.items():
            if value < 1:
                raise ValueError(f"model.{key}={value} must be >= 1")
        if not 0 <= dropout <= 1:
            raise ValueError(f"model.dropout={dropout} must be in [0, 1]")
        if dim % num_heads:
            raise ValueError(f"model.num_heads={num_heads} must divide model.dim={dim}")
        self.embed = nn.Embedding(spec.vocab_size, dim)
        self.position = nn.Parameter(torch.zeros(spec.seq_len, dim))
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, ffn_hidden, dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, spec.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, **unused: torch.Tensor) -> ModelOutput:
        T = input_ids.shape[1]
        x = self.embed(input_ids) + self.position[:T]  # (B, T, D)
        causal = nn.Transformer.generate_square_subsequent_mask(T, device=input_ids.device)
        x = self.encoder(x, mask=causal, is_causal=True)
        logits = self.head(self.norm(x))  # (B, T, V)
        return ModelOutput(logits=logits, aux_loss=logits.new_zeros(()))
