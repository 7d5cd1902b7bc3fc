"""The frozen base of a fine-tune: reading its checkpoint, fingerprinting it, fitting it in.

`copy_base` is strict: every base tensor must have a place of the same shape in the model,
except those a `strategy.trainable` glob covers whole (a new head, RETRO's encoder and CCA on a
plain decoder), which keep their fresh initialisation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from advarch.checkpoint import PREFIX, read_checkpoint


def load_base(pretrained: str) -> dict[str, Any]:
    """The checkpoint dict at `pretrained`; a one-line CheckpointError if it is not one."""
    return read_checkpoint(pretrained, "strategy.pretrained")


def model_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's entries of a checkpoint state dict (strategies may store more, e.g. EWC)."""
    return {k: v for k, v in state.items() if k.startswith(PREFIX)}


def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """A digest of the model tensors' names and bytes: detects a base changed after finetuning."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model_state(state).items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """`model.<name>` → the live parameter or persistent buffer (tied tensors under each name)."""
    return {PREFIX + k: v for k, v in model.state_dict(keep_vars=True).items()}


@torch.no_grad()
def copy_base(
    model: nn.Module, base: Mapping[str, torch.Tensor], pretrained: str, fresh_ok: set[str]
) -> list[str]:
    """Copy the base tensors into `model`; returns the names left fresh (wholly trainable ones
    the base lacks or has in another shape). Raises a one-line ValueError for anything else
    that does not fit."""
    own = state_tensors(model)
    where = f"strategy.pretrained={pretrained!r}"
    extra = sorted(set(base) - set(own))
    if extra:
        raise ValueError(f"{where}: checkpoint tensor {extra[0]} has no place in this model")
    fresh = []
    for name, tensor in own.items():
        if name not in base and name in fresh_ok:
            fresh.append(name)  # a new module (e.g. RETRO's CCA on a plain decoder): trained
            continue
        if name not in base:
            raise ValueError(f"{where}: this model's tensor {name} is not in the checkpoint")
        if base[name].shape == tensor.shape:
            tensor.copy_(base[name])
        elif name in fresh_ok:
            fresh.append(name)
        else:
            raise ValueError(
                f"{where}: tensor {name} has shape {tuple(base[name].shape)} there but "
                f"{tuple(tensor.shape)} in this model ({_shape_hint(name, base[name], tensor)})"
            )
    return fresh


def _shape_hint(name: str, saved: torch.Tensor, own: torch.Tensor) -> str:
    """What to change when a base tensor does not fit: MoE experts differ only in their count
    (dim 0); anything else means the base was trained with other model settings."""
    experts = name.rsplit(".", 1)[-1] in ("router", "w_in", "w_out") and ".ffn." in name
    if experts and saved.shape[1:] == own.shape[1:]:
        return f"the base has {saved.shape[0]} experts: add more with strategy.new_experts"
    return ("the base was trained with other model settings: give this run the model keys "
            "of the base run's .hydra/config.yaml, e.g. its debug=tiny sizes")  # fmt: skip
