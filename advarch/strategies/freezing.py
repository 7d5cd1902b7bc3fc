"""Bit-exact freezing of whole tensors or some of their rows, restored after each optimizer step.

Restoring after the step (instead of masking gradients) keeps frozen values identical even
under weight decay and Adam's moment updates, and lets one tensor (stacked experts, a head)
have frozen and trainable rows. Their gradients are also zeroed before the step, before
gradient clipping: frozen entries take no share of the clipping norm (which would shrink the
trainable ones' update) and their Adam moments stay zero. `BaseStrategy` does both for
the slices a strategy lists in `frozen` (the continual and frozen-base finetune strategies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FrozenSlice:
    """Rows `rows` of `tensor` (all of it when None) restored to `saved` after each step."""

    tensor: torch.Tensor
    rows: torch.Tensor | None
    saved: torch.Tensor

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero the frozen entries' gradient (call before clipping and the optimizer step)."""
        grad = self.tensor.grad
        if grad is None:
            return
        if self.rows is None:
            grad.zero_()
        else:
            grad.index_fill_(0, self.rows, 0.0)

    @torch.no_grad()
    def restore(self) -> None:
        if self.rows is None:
            self.tensor.copy_(self.saved)
        else:
            self.tensor.index_copy_(0, self.rows, self.saved)


def freeze(tensor: torch.Tensor, rows: torch.Tensor | None = None) -> FrozenSlice:
    """Snapshot `tensor` (or its dim-0 `rows`) now."""
    value = tensor.detach() if rows is None else tensor.detach().index_select(0, rows)
    return FrozenSlice(tensor, rows, value.clone())
