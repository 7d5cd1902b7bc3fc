"""Which tensors, and which of their rows, a fine-tune trains; what it must keep frozen.

The plan maps `model.<name>` → its trainable dim-0 rows (None = the whole tensor): tensors a
`strategy.trainable` glob matches, the new rows of every expert tensor after `new_experts`
(`MoE.expert_tensors`), and with `head_classes` those classes' head rows. `frozen_snapshots`
lists what an optimizer step may move but must not (frozen rows of partial tensors, floating
buffers outside the plan); `delta_of` is what the fine-tune trained.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from advarch.checkpoint import PREFIX
from advarch.models.output import ExpertModel, TaskHeads
from advarch.spec import DataSpec
from advarch.strategies.base import close_experts
from advarch.strategies.finetune_base import copy_base, model_state, state_tensors

log = logging.getLogger("advarch")

Plan = dict[str, torch.Tensor | None]  # tensor name → trainable dim-0 rows; None = all of it


def named_moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(`model.<path>`, MoE module) for every MoE layer of an advarch Model."""
    moe_ids = {id(m) for m in model.moe_layers()} if isinstance(model, ExpertModel) else set()
    return [(PREFIX + n, m) for n, m in model.named_modules() if id(m) in moe_ids]


def expert_tensor_names(model: nn.Module) -> dict[str, int]:
    """State names of every tensor an MoE layer holds with one row per expert → its E
    (`MoE.expert_tensors`: router, stacked experts, routing bias and its counts)."""
    state = state_tensors(model)
    return {
        f"{prefix}.{name}": moe.num_experts
        for prefix, moe in named_moe_layers(model)
        for name in moe.expert_tensors()
        if f"{prefix}.{name}" in state
    }


def glob_matches(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Parameter names (`model.` prefix) matching any glob; each glob must match something.

    A tensor shared under several names (a language model's head tied to its input embedding)
    matches under any of them and is listed under its first (`model.input.weight`)."""
    canonical = {id(p): PREFIX + n for n, p in model.named_parameters()}
    names = {
        PREFIX + n: canonical[id(p)] for n, p in model.named_parameters(remove_duplicate=False)
    }
    hits: dict[str, None] = {}
    for pattern in patterns:
        matched = [n for n in names if fnmatchcase(n, pattern)]
        if not matched:
            raise ValueError(
                f"strategy.trainable pattern {pattern!r} matches no parameter "
                f"(names look like {', '.join(list(names)[:3])}, …)"
            )
        hits.update(dict.fromkeys(names[n] for n in matched))
        tied = [n for n in matched if names[n] not in matched]
        if tied:
            log.info("strategy.trainable %r: %s is tied to %s, which trains", pattern,
                     ", ".join(tied), ", ".join(dict.fromkeys(names[n] for n in tied)))  # fmt: skip
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
    heads = model.num_heads_out if isinstance(model, TaskHeads) else 1
    return torch.tensor(sorted({t * C + c for t in range(heads) for c in classes}))


def make_plan(
    model: nn.Module,
    whole: Sequence[str],
    new_experts: int,
    head_classes: Sequence[int] | None,
) -> Plan:
    """Which tensors (and which of their rows) train: `whole` (the `strategy.trainable`
    matches), new expert rows, head rows; see the module docstring, step 3."""
    plan: Plan = dict.fromkeys(whole)
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
    open_experts: Sequence[bool] | None = None,
) -> Plan:
    """Load the base (when given), close the experts its run closed (`open_experts`: a
    continual run's experts no task owns, never trained), grow the MoE layers (new experts
    open), set `requires_grad`; returns the plan."""
    moes = named_moe_layers(model)
    if new_experts < 0:
        raise ValueError(f"strategy.new_experts={new_experts} must be >= 0")
    if new_experts and not moes:
        raise ValueError(f"strategy.new_experts={new_experts} needs a model with MoE layers")
    whole = glob_matches(model, trainable)
    if base is not None:
        fresh = copy_base(model, model_state(base), str(pretrained), set(whole))
        if fresh:
            log.info(
                "finetune: %d tensors are new or reshaped, trained from a fresh initialisation: %s",
                len(fresh), _grouped(fresh),
            )  # fmt: skip
    if open_experts is not None:
        close_experts(model, open_experts)
    if new_experts:
        for _, moe in moes:
            moe.add_experts(new_experts)
    plan = make_plan(model, whole, new_experts, head_classes)
    for name, p in model.named_parameters():
        p.requires_grad_(PREFIX + name in plan)
    return plan


def tied_and_trained(model: nn.Module, plan: Plan, trainable: Sequence[str]) -> list[list[str]]:
    """The names of each tensor the plan trains that the model uses under several names (a
    head tied to the input embeddings: training one trains the other), where the `trainable`
    globs do not name each of them (`["*"]` trains the embeddings on purpose)."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(PREFIX + name)
    return [
        group
        for group in names.values()
        if len(group) > 1
        and group[0] in plan
        and not all(any(fnmatchcase(n, glob) for glob in trainable) for n in group)
    ]


def _grouped(names: Sequence[str], depth: int = 4) -> str:
    """`a.b.c.d.* (24), a.e.f (1)`: tensor names grouped by their first `depth` components."""
    groups: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        key = ".".join(parts[:depth]) + (".*" if len(parts) > depth else "")
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{key} ({n})" for key, n in groups.items())


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
