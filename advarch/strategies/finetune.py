"""Fine-tuning a frozen pretrained model: trainable globs, new MoE experts, delta files.

Partial fine-tuning in the PEFT manner (only named tensors train and only they are saved, as in
`peft`'s `get_peft_model_state_dict`), plus expert expansion for MoE layers as in Lifelong-MoE
(Chen et al. 2023, "Lifelong Language Pretraining with Distribution-Specialized Experts", §3.2:
append experts and router rows; freeze the old experts and the old gating rows).

What happens, in order:

1. The model is built from the CURRENT config. The base checkpoint's `state_dict`
   (`strategy.pretrained`, keys `model.<name>`) is copied in strictly: a missing, extra or
   differently shaped tensor is a one-line error naming it and `strategy.pretrained`, except a
   tensor `trainable` covers whole (e.g. a new head, or RETRO's neighbour encoder and CCA
   when retrofitting a plain decoder), which keeps its fresh initialisation.
2. `new_experts` fresh experts (router rows, routing-bias entries) are appended to every MoE
   layer with `MoE.add_experts`.
3. The plan maps tensor name → its trainable dim-0 rows (None = the whole tensor): tensors a
   `trainable` glob matches, whole; the new rows of every expert tensor (router, w_in, w_out,
   routing_bias); with `head_classes`, the head rows of those classes. Other parameters get
   `requires_grad=False`, so the optimizer never holds them; modules with nothing trainable stay
   in eval mode (`train()` is overridden, so Lightning's `model.train()` cannot flip them).
4. Partially trainable tensors (stacked experts, head rows) are whole parameters in the
   optimizer. Zeroing the frozen rows' gradients is not enough: AdamW's decoupled weight decay
   moves every entry, gradient or not. So the frozen rows' gradients are zeroed in
   `on_before_optimizer_step` (before clipping: they take no share of the clipping norm and
   their Adam moments stay zero), and the rows are copied back from a snapshot of the base after
   every optimizer step, which keeps them bit-identical. Floating buffers outside the plan (the
   old experts' aux-loss-free routing bias) are restored the same way.
5. At train end `<run>/finetuned_delta.pt` is written atomically:
   {"base": pretrained path, "tensors": trained tensors (only the trained rows of partial ones),
   "rows": those rows, "options" (trainable, new_experts, head_classes), "config": this run's
   config, "spec", "base_fingerprint"}.
   `load_finetuned` rebuilds base + delta bit-exactly. The Lightning checkpoint keeps the full
   state, so resuming and `eval.py` work as for any run.

Here: the strategy (steps 1–5) and `load_finetuned`; the base checkpoint is read and fitted in
`finetune_base`, the plan and what stays frozen are `finetune_plan`, and `evaluation.accuracy`
measures a finetuned model.

Shapes: E experts per MoE layer (E₀ in the base, E₀ + new_experts after growth), C classes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from advarch.atomic import save_atomic
from advarch.callbacks.data_identity import KEY as DATA_KEY
from advarch.callbacks.data_identity import held_out_trained_on, split_documents_of
from advarch.checkpoint import PREFIX, TOKENIZER, ran_with, read_checkpoint
from advarch.data.tokenizer import tokenizer_difference, tokenizer_state
from advarch.errors import ConfigError
from advarch.models.output import output_layer_globs
from advarch.spec import DataSpec
from advarch.strategies.base import BaseStrategy, saved_open_experts
from advarch.strategies.finetune_base import fingerprint, load_base, state_tensors
from advarch.strategies.finetune_plan import (
    count_plan_parameters,
    delta_of,
    frozen_modules,
    frozen_snapshots,
    prepare_model,
    tied_and_trained,
)
from advarch.strategies.freezing import FrozenSlice

SPLIT_NAMES = {"val": "validation", "test": "test"}
log = logging.getLogger("advarch")

DELTA_FILE = "finetuned_delta.pt"


# -- the strategy -----------------------------------------------------------------------------
class FinetuneStrategy(BaseStrategy):
    """Train only what `trainable`, `new_experts` and `head_classes` name; the base stays frozen.

    Args:
        base: `BaseStrategy`'s options (optimizer, scheduler, aux_loss_weight).
        pretrained: the base run's checkpoint. Required to train; None only rebuilds the
            architecture (eval.py, which loads the weights from the finetuned checkpoint).
        trainable: fnmatch globs over parameter names (`model.head.*`, `*router*`); each must
            match a parameter; matched tensors train whole. None: the model's output layers
            (`OutputLayers`: its head, or a multi-task model's towers).
        new_experts: experts appended to every MoE layer; only their rows train.
        head_classes: train only these classes' head rows (weight and bias); the rest frozen.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: DataSpec,
        *,
        pretrained: str | None = None,
        trainable: Sequence[str] | None = None,
        new_experts: int = 0,
        head_classes: Sequence[int] | None = None,
        **base: Any,
    ) -> None:
        super().__init__(model, spec, **base)
        ckpt = load_base(pretrained) if pretrained is not None else None
        self.pretrained = None if ckpt is None else str(Path(pretrained).expanduser().resolve())
        self.base_fingerprint = None if ckpt is None else fingerprint(ckpt["state_dict"])
        self.base_tokenizer = None if ckpt is None else ckpt.get(TOKENIZER)
        self.base_data = {} if ckpt is None else {DATA_KEY: ckpt.get(DATA_KEY)}
        self.options = {
            "trainable": output_layers(model) if trainable is None else list(trainable),
            "new_experts": new_experts,
            "head_classes": None if head_classes is None else list(head_classes),
        }
        state = None if ckpt is None else ckpt["state_dict"]
        open_experts = None if ckpt is None else saved_open_experts(ckpt)
        self.plan = prepare_model(model, state, pretrained=pretrained, open_experts=open_experts,
                                  **self.options)  # fmt: skip
        self.base_experts = next((m.num_experts - new_experts for m in model.moe_layers()), 0)
        self._snapshots = frozen_snapshots(model, self.plan)
        self._bind_frozen()
        self._frozen_modules = frozen_modules(model)
        self.hparams.update(count_plan_parameters(model, self.plan))
        self.train()

    # -- frozen parts -------------------------------------------------------------------------
    def _bind_frozen(self) -> None:
        """Point the snapshots at the live tensors on the current device."""
        state = state_tensors(self.model)
        self.frozen = []
        for name, rows, saved in self._snapshots:
            tensor = state[name]
            rows = None if rows is None else rows.to(tensor.device)
            self.frozen.append(FrozenSlice(tensor, rows, saved.to(tensor.device)))

    def train(self, mode: bool = True) -> FinetuneStrategy:
        """Like nn.Module.train, but modules with nothing trainable always stay in eval mode."""
        super().train(mode)
        for module in getattr(self, "_frozen_modules", ()):
            module.train(False)
        return self

    def base_expert_mask(self) -> torch.Tensor | None:
        """Bool (E,) expert mask allowing only the base's experts (None without new experts)."""
        moes = self.model.moe_layers()
        if not moes or moes[0].num_experts == self.base_experts:
            return None
        return torch.arange(moes[0].num_experts, device=self.device) < self.base_experts

    # -- hooks --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.pretrained is None:
            raise ConfigError(
                "strategy.pretrained is not set; give the base run's checkpoint, e.g. "
                "strategy.pretrained=<run>/checkpoints/last.ckpt"
            )
        tokenizer = getattr(self.trainer.datamodule, "tokenizer", None)
        data = tokenizer_state(tokenizer)
        if self.base_tokenizer and tokenizer is not None and data is None:
            log.warning("this data's tokenizer (%s) is not one of advarch's: whether its token ids "
                        "mean the same text as strategy.pretrained's is not checked",
                        type(tokenizer).__name__)  # fmt: skip
        differs = tokenizer_difference(self.base_tokenizer, data)
        if differs:
            raise ConfigError(
                f"strategy.pretrained={self.pretrained} was trained on a tokenizer ({differs[0]}) "
                f"other than this data's ({differs[1]}): its token ids would mean other text. "
                "Leave data.tokenizer_from out: advarch's text data then tokenises with the "
                "base's tokenizer"
            )
        if stage == "fit":
            self._warn_of_held_out_text_the_base_learnt()

    def _warn_of_held_out_text_the_base_learnt(self) -> None:
        """One warning where this data's validation or test documents were the base's
        training documents (the same corpus split otherwise)."""
        datamodule = self.trainer.datamodule
        seen = held_out_trained_on(self.base_data, datamodule)
        if not seen:
            return
        held = split_documents_of(datamodule.meta)
        said = " and ".join(f"{len(names)} of the {len(held[split])} {SPLIT_NAMES[split]}"
                            for split, names in seen.items())  # fmt: skip
        example = next(iter(seen.values()))[0]
        log.warning("strategy.pretrained=%s trained on %s documents of this run (e.g. %s): "
                    "their metrics partly measure text the base learnt; give this run the "
                    "base's data options%s", self.pretrained, said, example,
                    ran_with(Path(self.pretrained)))  # fmt: skip

    def parameter_counts(self) -> dict[str, int]:
        """The plan's counts: rows of partially trained tensors counted per row."""
        return count_plan_parameters(self.model, self.plan)

    def on_fit_start(self) -> None:
        self._bind_frozen()
        tied = tied_and_trained(self.model, self.plan, self.options["trainable"])
        for names in tied:  # (the base is not frozen then)
            log.warning(
                "finetune: %s are one tensor (model.tie_embeddings=true): training one trains "
                "the other; model.tie_embeddings=false trains a head of its own on frozen "
                "embeddings", " and ".join(names),
            )  # fmt: skip

    def on_train_start(self) -> None:
        super().on_train_start()
        counts = {k: float(v) for k, v in self.parameter_counts().items()}
        self.log_dict(counts, on_step=False, on_epoch=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["advarch_finetune"] = {
            "base": self.pretrained,
            "trained": {n: None if r is None else r.tolist() for n, r in self.plan.items()},
        }

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = self.save_delta(Path(self.trainer.default_root_dir) / DELTA_FILE)
            log.info("finetune: trained tensors written to %s", path)

    def save_delta(self, path: Path) -> Path:
        """Write the trained tensors and a pointer to the base to `path` (atomically)."""
        delta = {
            "base": self.pretrained,
            "base_fingerprint": self.base_fingerprint,
            "config": self.hparams.get("cfg"),
            "spec": asdict(self.spec),
            "options": self.options,
            **delta_of(self.model, self.plan),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        return save_atomic(delta, path)


# -- loading a finetuned model ----------------------------------------------------------------
@torch.no_grad()
def load_finetuned(delta_path: str | os.PathLike) -> nn.Module:
    """Rebuild a finetuned model from its delta file and the base checkpoint it points to.

    The architecture comes from the finetune run's config stored in the delta (the base
    checkpoint's config only had to fit it at training time); the base weights are loaded and
    the MoE layers grown exactly as in training, then the trained tensors are written in.

    Returns:
        The advarch Model in eval mode, equal tensor for tensor to the finetuned one.

    Raises:
        ValueError: the base checkpoint is missing, changed since finetuning, or does not fit.
    """
    from advarch.pipeline import build_model

    delta = read_checkpoint(delta_path, "delta", require="tensors")
    base = load_base(delta["base"])
    if delta.get("base_fingerprint") not in (None, fingerprint(base["state_dict"])):
        raise ValueError(f"base checkpoint {delta['base']} changed since {delta_path} was made")
    cfg = OmegaConf.create(delta["config"])
    model = build_model(cfg, DataSpec(**delta["spec"]))
    prepare_model(model, base["state_dict"], pretrained=delta["base"],
                  open_experts=saved_open_experts(base), **delta["options"])  # fmt: skip
    state = state_tensors(model)
    for name, value in delta["tensors"].items():
        rows = delta["rows"].get(name)
        if rows is None:
            state[name].copy_(value)
        else:
            state[name].index_copy_(0, torch.tensor(rows), value)
    return model.eval()


def output_layers(model: nn.Module) -> list[str]:
    """`strategy.trainable`'s default: globs of the model's layers after its pooled features
    (its head; a multi-task model's towers)."""
    return [PREFIX + glob for glob in output_layer_globs(model)]
