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

Shapes: E experts per MoE layer (E₀ in the base, E₀ + new_experts after growth), C classes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from torch import nn

from advarch.atomic import save_atomic
from advarch.checkpoint import PREFIX, read_checkpoint
from advarch.config.validate import ConfigError
from advarch.spec import DataSpec
from advarch.strategies.base import BaseStrategy
from advarch.strategies.freezing import FrozenSlice

log = logging.getLogger("advarch")

DELTA_FILE = "finetuned_delta.pt"
Plan = dict[str, torch.Tensor | None]  # tensor name → trainable dim-0 rows; None = all of it


# -- base checkpoint --------------------------------------------------------------------------
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
                f"{tuple(tensor.shape)} in this model (add experts with strategy.new_experts)"
            )
    return fresh


# -- the plan ---------------------------------------------------------------------------------
def named_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(`model.<path>`, MoE module) for every MoE layer of an advarch Model."""
    moe_ids = {id(m) for m in getattr(model, "moe_layers", list)()}
    return [(PREFIX + n, m) for n, m in model.named_modules() if id(m) in moe_ids]


def expert_tensor_names(model: nn.Module) -> dict[str, int]:
    """State names of every tensor an MoE layer holds with one row per expert → its E."""
    state = state_tensors(model)
    out = {}
    for prefix, moe in named_moe_layers(model):
        own = [*moe.named_parameters(recurse=False), *moe.named_buffers(recurse=False)]
        for name, tensor in own:
            full = f"{prefix}.{name}"
            if full in state and tensor.dim() >= 1 and tensor.shape[0] == moe.num_experts:
                out[full] = moe.num_experts
    return out


def glob_matches(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Parameter names (`model.` prefix) matching any glob; each glob must match something."""
    names = [PREFIX + n for n, _ in model.named_parameters()]
    hits: dict[str, None] = {}
    for pattern in patterns:
        matched = [n for n in names if fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(
                f"strategy.trainable pattern {pattern!r} matches no parameter "
                f"(names look like {', '.join(names[:3])}, …)"
            )
        hits.update(dict.fromkeys(matched))
    return list(hits)


def head_rows(model: nn.Module, classes: Sequence[int]) -> torch.Tensor:
    """Rows of the classification head for `classes` (in every per-task head)."""
    spec: DataSpec = model.spec
    C = spec.num_classes
    if spec.kind != "classification" or not classes:
        raise ValueError(
            f"strategy.head_classes={list(classes)} needs classification data and a class list"
        )
    if not all(0 <= c < C for c in classes):
        raise ValueError(f"strategy.head_classes={list(classes)} must be classes 0..{C - 1}")
    heads = getattr(model, "num_heads_out", 1)
    return torch.tensor(sorted({t * C + c for t in range(heads) for c in classes}))


def make_plan(
    model: nn.Module,
    trainable: Sequence[str],
    new_experts: int,
    head_classes: Sequence[int] | None,
) -> Plan:
    """Which tensors (and which of their rows) train; see the module docstring, step 3."""
    plan: Plan = dict.fromkeys(glob_matches(model, trainable))
    if new_experts:
        for name, E in expert_tensor_names(model).items():
            plan.setdefault(name, torch.arange(E - new_experts, E))  # a whole-tensor glob wins
    if head_classes is not None:
        rows, state = head_rows(model, head_classes), state_tensors(model)
        for name in (f"{PREFIX}head.weight", f"{PREFIX}head.bias"):
            if name in plan:
                raise ValueError(
                    f"strategy.head_classes trains rows of {name} but strategy.trainable "
                    "already trains all of it; drop one"
                )
            if name in state:
                plan[name] = rows
    if not plan:
        raise ValueError(
            "strategy.trainable=[] with strategy.new_experts=0 and no strategy.head_classes "
            "leaves nothing to train"
        )
    return plan


def prepare_model(
    model: nn.Module,
    base: Mapping[str, torch.Tensor] | None,
    *,
    pretrained: str | None,
    trainable: Sequence[str],
    new_experts: int,
    head_classes: Sequence[int] | None,
) -> Plan:
    """Load the base (when given), grow the MoE layers, set `requires_grad`; returns the plan."""
    moes = named_moe_layers(model)
    if new_experts < 0:
        raise ValueError(f"strategy.new_experts={new_experts} must be >= 0")
    if new_experts and not moes:
        raise ValueError(f"strategy.new_experts={new_experts} needs a model with MoE layers")
    if base is not None:
        whole = set(glob_matches(model, trainable))
        fresh = copy_base(model, model_state(base), str(pretrained), whole)
        for name in fresh:
            log.info("finetune: %s is new or reshaped; trained from a fresh initialisation", name)
    if new_experts:
        for _, moe in moes:
            moe.add_experts(new_experts)
    plan = make_plan(model, trainable, new_experts, head_classes)
    for name, p in model.named_parameters():
        p.requires_grad_(PREFIX + name in plan)
    return plan


def frozen_snapshots(model: nn.Module, plan: Plan) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, frozen dim-0 rows, their values now) of partially trained tensors and of floating
    buffers outside the plan: what the optimizer step may move but must not."""
    out = []
    for name, tensor in state_tensors(model).items():
        if name in plan and plan[name] is None:
            continue
        if name in plan:
            keep = torch.ones(tensor.shape[0], dtype=torch.bool)
            keep[plan[name]] = False
            rows = keep.nonzero()[:, 0]
        elif isinstance(tensor, nn.Parameter) or not tensor.is_floating_point():
            continue  # frozen parameters are not in the optimizer; int buffers never drift
        else:
            rows = None  # the whole buffer
        if rows is None or rows.numel():
            value = tensor.detach() if rows is None else tensor.detach().index_select(0, rows)
            out.append((name, rows, value.clone()))
    return out


def frozen_modules(root: nn.Module) -> list[nn.Module]:
    """Top-most submodules with parameters, none of them trainable (kept in eval mode)."""
    params = list(root.parameters())
    if params and not any(p.requires_grad for p in params):
        return [root]
    return [m for child in root.children() for m in frozen_modules(child)]


def count_plan_parameters(model: nn.Module, plan: Plan) -> dict[str, int]:
    """Total, trained and frozen parameters (rows of partial tensors counted per row)."""
    params = {PREFIX + n: p for n, p in model.named_parameters()}
    total = sum(p.numel() for p in params.values())
    trainable = sum(
        params[n].numel() if rows is None else len(rows) * params[n][0].numel()
        for n, rows in plan.items()
        if n in params
    )
    return {
        "params/trainable": trainable,
        "params/total": total,
        "params/frozen": total - trainable,
    }


def delta_of(model: nn.Module, plan: Plan) -> dict[str, dict[str, Any]]:
    """{"tensors": trained tensors (only the trained rows of partial ones), "rows": …}."""
    state = state_tensors(model)
    tensors, rows = {}, {}
    for name, r in plan.items():
        t = state[name].detach()
        tensors[name] = (t if r is None else t.index_select(0, r.to(t.device))).cpu().clone()
        if r is not None:
            rows[name] = r.tolist()
    return {"tensors": tensors, "rows": rows}


# -- the strategy -----------------------------------------------------------------------------
class FinetuneStrategy(BaseStrategy):
    """Train only what `trainable`, `new_experts` and `head_classes` name; the base stays frozen.

    Args:
        base: `BaseStrategy`'s options (optimizer, scheduler, aux_loss_weight).
        pretrained: the base run's checkpoint. Required to train; None only rebuilds the
            architecture (eval.py, which loads the weights from the finetuned checkpoint).
        trainable: fnmatch globs over parameter names (`model.head.*`, `*router*`); each must
            match a parameter; matched tensors train whole.
        new_experts: experts appended to every MoE layer; only their rows train.
        head_classes: train only these classes' head rows (weight and bias); the rest frozen.
    """

    def __init__(
        self,
        model: nn.Module,
        spec: DataSpec,
        *,
        pretrained: str | None = None,
        trainable: Sequence[str] = ("model.head.*",),
        new_experts: int = 0,
        head_classes: Sequence[int] | None = None,
        **base: Any,
    ) -> None:
        super().__init__(model, spec, **base)
        base = load_base(pretrained) if pretrained is not None else None
        self.pretrained = None if base is None else str(Path(pretrained).expanduser().resolve())
        self.base_fingerprint = None if base is None else fingerprint(base["state_dict"])
        self.options = {
            "trainable": list(trainable),
            "new_experts": new_experts,
            "head_classes": None if head_classes is None else list(head_classes),
        }
        state = None if base is None else base["state_dict"]
        self.plan = prepare_model(model, state, pretrained=pretrained, **self.options)
        self.base_experts = next((m.num_experts - new_experts for m in model.moe_layers()), 0)
        self._snapshots = frozen_snapshots(model, self.plan)
        self._frozen: list[FrozenSlice] = []
        self._bind_frozen()
        self._frozen_modules = frozen_modules(model)
        self.hparams.update(count_plan_parameters(model, self.plan))
        self.train()

    # -- frozen parts -------------------------------------------------------------------------
    def _bind_frozen(self) -> None:
        """Point the snapshots at the live tensors on the current device."""
        state = state_tensors(self.model)
        self._frozen = []
        for name, rows, saved in self._snapshots:
            tensor = state[name]
            rows = None if rows is None else rows.to(tensor.device)
            self._frozen.append(FrozenSlice(tensor, rows, saved.to(tensor.device)))

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

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Routing-bias update, then zero the frozen rows' gradients (before clipping)."""
        super().on_before_optimizer_step(optimizer)
        for frozen in self._frozen:
            grad = frozen.tensor.grad
            if grad is not None:
                grad.index_fill_(0, frozen.rows, 0.0)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The optimizer step, then the frozen rows and buffers restored bit-exactly."""
        super().optimizer_step(*args, **kwargs)
        self.restore_frozen()

    def restore_frozen(self) -> None:
        for frozen in self._frozen:
            frozen.restore()

    # -- hooks --------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.pretrained is None:
            raise ConfigError(
                "strategy.pretrained is not set; give the base run's checkpoint, e.g. "
                "strategy.pretrained=<run>/checkpoints/last.ckpt"
            )

    def on_fit_start(self) -> None:
        self._bind_frozen()
        counts = count_plan_parameters(self.model, self.plan)
        self._print_counts(counts["params/trainable"], counts["params/total"])

    def on_train_start(self) -> None:
        super().on_train_start()
        counts = {k: float(v) for k, v in count_plan_parameters(self.model, self.plan).items()}
        self.log_dict(counts, on_step=False, on_epoch=True)

    @staticmethod
    @rank_zero_only
    def _print_counts(trainable: int, total: int) -> None:
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || "
            f"trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
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
    prepare_model(model, base["state_dict"], pretrained=delta["base"], **delta["options"])
    state = state_tensors(model)
    for name, value in delta["tensors"].items():
        rows = delta["rows"].get(name)
        if rows is None:
            state[name].copy_(value)
        else:
            state[name].index_copy_(0, torch.tensor(rows), value)
    return model.eval()


@torch.no_grad()
def accuracy(
    model: nn.Module,
    batches: Any,
    *,
    expert_mask: torch.Tensor | None = None,
    classes: Sequence[int] | None = None,
) -> float:
    """Accuracy of a classification model over `batches` (dicts with `inputs`, `labels`).

    `classes` restricts the prediction to those classes' logits (task-aware evaluation);
    `expert_mask` (E,) is passed to the model (e.g. `FinetuneStrategy.base_expert_mask()`).
    """
    correct = seen = 0
    for batch in batches:
        logits = model(batch["inputs"], expert_mask=expert_mask).logits  # (B, C)
        if classes is not None:
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool)
            allowed[list(classes)] = True
            logits = logits.masked_fill(~allowed, float("-inf"))
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
        seen += len(batch["labels"])
    return correct / max(seen, 1)
