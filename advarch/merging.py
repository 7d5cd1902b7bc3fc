"""Model merging over checkpoints that share an architecture.

Notation: θ₀ is the base, θₜ = models[t], τₜ = θₜ − θ₀ its task vector, wₜ its weight, ρₜ its
density, λ the task-vector scale.

- ``linear``: θ = Σₜ wₜ θₜ / Σₜ wₜ, a weighted average of ``models`` (model soups, Wortsman et al.
  2022). The base only supplies metadata, non-float buffers and the ``base`` policy; list it in
  ``models`` too to average it in.
- ``task_arithmetic``: θ = θ₀ + λ Σₜ wₜ τₜ (Ilharco et al. 2023, eq. 1); a negative wₜ negates
  (forgets) a task.
- ``ties``: TIES-Merging (Yadav et al. 2023, Alg. 1): trim τ̂ₜ = τₜ ⊙ [|τₜ| ≥ k-th largest |τₜ|]
  with k = ρₜ·n; elect γ = sgn(Σₜ wₜ τ̂ₜ) per coordinate (total mass; γ = +1 on a tie); disjoint
  mean τₘ = Σ_{t∈A} wₜ τ̂ₜ / Σ_{t∈A} wₜ over A = {t : sgn(wₜ τ̂ₜ) = γ}; θ = θ₀ + λ τₘ.
- ``dare_linear`` (alias ``dare``): DARE (Yu et al. 2024, eq. 2): τ̃ₜ = mₜ ⊙ τₜ · s with
  mₜ ~ Bernoulli(ρₜ), then task arithmetic θ = θ₀ + λ Σₜ wₜ τ̃ₜ.
- ``dare_ties``: DARE drop-and-rescale in place of the TIES trim, then TIES election and disjoint
  mean (mergekit's ``dare_ties``).
- ``slerp``: spherical interpolation from θ₀ (t = 0) to models[0] (t = 1), per tensor:
  θ = sin((1−t)Ω)/sin Ω · θ₀ + sin(tΩ)/sin Ω · θ₁ with cos Ω = ⟨θ₀, θ₁⟩/(‖θ₀‖‖θ₁‖); falls back to
  lerp when |cos Ω| > 0.9995 (nearly colinear) or a tensor is zero. ``models`` has one entry.

Implementation choices (each a key of ``configs/merge.yaml``):

- ``ties_trim``: ``per_tensor`` keeps the top ρ of each tensor (mergekit, PEFT); ``global`` keeps
  the top ρ of each model's whole task vector (the TIES paper's code). The global threshold is
  exact: one pass per model copies |τₜ| of every merged tensor into one buffer and takes its k-th
  largest value, so the pass needs 4 bytes × parameters (8 for float64 models) of extra memory,
  for one model at a time. Tensors whose density a rule overrides are trimmed per tensor.
- ``dare_rescale``: ``inverse_density`` multiplies kept entries by 1/ρ, unbiased in expectation
  (DARE paper, PEFT); ``l1`` rescales so each tensor keeps its L1 norm (mergekit).
- ``per_expert``: stacked MoE expert tensors, shape (E, …) and named by ``expert_patterns``
  (fnmatch; default: the MoE block's ``*.ffn.w_in``, ``*.ffn.w_out``), are trimmed (ties
  per_tensor), L1-rescaled (dare l1) and slerped per expert slice along dim 0, so one
  expert's large update cannot crowd out the others'. Sign election and the disjoint mean
  are per coordinate and so unaffected. Routers and heads are ordinary tensors; pin them
  with a rule (``keep``/``base``) if they should not merge.
- ``rules``: fnmatch globs over state-dict names (Lightning checkpoints prefix ``model.``); the
  first match wins. A rule sets ``policy`` ``merge`` (default), ``base`` (keep θ₀; a tensor
  absent from the base is dropped) or ``keep: i`` (take models[i], any shape), and may
  override ``weights``, ``density``, ``lambda`` and ``t`` for the tensors it matches.
- k = max(1, round(ρ·n)); entries tied with the k-th largest magnitude are all kept.
- DARE masks come from a generator seeded by (``seed``, tensor name), so a tensor's result does
  not depend on the order or subset of tensors merged.
- Arithmetic runs in float32 (float64 for float64 tensors) and is cast back to the base dtype.
  Non-float tensors (int buffers, step counters) are copied from the base.
- Memory: checkpoints load with ``mmap=True`` and tensors merge one at a time, so the working set
  is the growing output plus, for the current tensor, one float copy per model and a few
  same-size temporaries (sparsification and election run in place on that copy). Copied tensors
  (``base``/``keep`` policies, non-float buffers) are the input tensor objects themselves, not
  copies; inputs are never written.

Shape legend: M models, E experts, G groups (E for a stacked expert tensor with ``per_expert``,
else 1), N elements per group.
"""

from __future__ import annotations

import math
import os
import re
import typing
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from advarch.atomic import save_atomic
from advarch.checkpoint import read_checkpoint
from advarch.typecheck import matches, wrong_type

METHODS = ("linear", "task_arithmetic", "ties", "dare", "dare_linear", "dare_ties", "slerp")
POLICIES = ("merge", "base", "keep")
TIES_TRIMS = ("per_tensor", "global")
DARE_RESCALES = ("inverse_density", "l1")
SIGN_ELECTION_METHODS = ("ties", "dare_ties")
DARE_METHODS = ("dare", "dare_linear", "dare_ties")
TASK_VECTOR_METHODS = ("task_arithmetic", "ties", *DARE_METHODS)  # θ₀ + λ·(combined τ)
# merge.yaml key: the methods whose code reads it; any other method ignores it
READ_BY_METHODS: dict[str, tuple[str, ...]] = {
    "weights": ("linear", *TASK_VECTOR_METHODS),
    "density": ("ties", *DARE_METHODS),
    "lambda": TASK_VECTOR_METHODS,
    "t": ("slerp",),
    "seed": DARE_METHODS,
    "ties_trim": ("ties",),
    "dare_rescale": DARE_METHODS,
}
# Lightning bookkeeping a merged checkpoint drops: it is loaded for inference or fine-tuning, not
# resumed mid-run.
DROPPED_CHECKPOINT_KEYS = ("optimizer_states", "lr_schedulers", "loops", "callbacks")
_LERP_DOT = 0.9995  # |cos Ω| above this: slerp's sin Ω ≈ 0, interpolate linearly
_EPS = 1e-8


def _choice(key: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r} must be one of: {', '.join(choices)}")


def _check_density(key: str, value: float | Sequence[float] | None) -> None:
    values = [] if value is None else [value] if isinstance(value, int | float) else value
    for v in values:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"{key}={v} must be in (0, 1]")


def _check_t(key: str, value: float | None) -> None:
    if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f"{key}={value} must be in [0, 1]")


def _field(key: str) -> str:
    """The dataclass field of a merge.yaml key (``lambda`` is ``lam`` in Python)."""
    return "lam" if key == "lambda" else key


def _per_model(key: str, value: float | Sequence[float], n: int) -> tuple[float, ...]:
    """Broadcast a scalar to one value per model, or check a list has one per model."""
    if isinstance(value, int | float):
        return (float(value),) * n
    if len(value) != n:
        raise ValueError(f"{key} has {len(value)} entries but models has {n}")
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class MergeRule:
    """Per-tensor policy and overrides for names matching ``pattern`` (first match wins)."""

    pattern: str
    policy: str = "merge"
    keep: int | None = None  # index into models; implies policy "keep"
    weights: float | list[float] | None = None
    density: float | list[float] | None = None
    lam: float | None = None
    t: float | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], key: str) -> MergeRule:
        """Build from a merge.yaml rule (``lambda`` → ``lam``); ``key`` prefixes error messages."""
        known = {f.name for f in fields(cls)} - {"lam"} | {"lambda"}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{key}.{unknown[0]} is not a rule key; use one of: {sorted(known)}")
        if "pattern" not in raw:
            raise ValueError(f"{key}.pattern is required")
        args = {_field(k): v for k, v in raw.items()}
        if args.get("keep") is not None:
            if args.get("policy", "keep") != "keep":
                raise ValueError(f"{key}.keep is set, so {key}.policy must be 'keep'")
            args["policy"] = "keep"
        rule = cls(**args)
        _choice(f"{key}.policy", rule.policy, POLICIES)
        if rule.policy == "keep" and rule.keep is None:
            raise ValueError(f"{key}.policy='keep' needs {key}.keep=<model index>")
        _check_density(f"{key}.density", rule.density)
        _check_t(f"{key}.t", rule.t)
        return rule


@dataclass(frozen=True)
class TensorPlan:
    """Method parameters for one tensor after applying the first matching rule."""

    policy: str
    keep: int | None
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    lam: float
    t: float
    density_overridden: bool


@dataclass
class MergeConfig:
    """Merge settings; field names equal ``configs/merge.yaml`` keys (``lambda`` is ``lam``)."""

    method: str = "task_arithmetic"
    weights: list[float] | None = None
    density: float | list[float] = 1.0
    lam: float = 1.0
    t: float = 0.5
    seed: int = 0
    rules: list[MergeRule] = field(default_factory=list)
    ties_trim: str = "per_tensor"
    dare_rescale: str = "inverse_density"
    per_expert: bool = True
    expert_patterns: list[str] = field(default_factory=lambda: ["*.ffn.w_in", "*.ffn.w_out"])

    def __post_init__(self) -> None:
        _choice("method", self.method, METHODS)
        _choice("ties_trim", self.ties_trim, TIES_TRIMS)
        _choice("dare_rescale", self.dare_rescale, DARE_RESCALES)
        _check_density("density", self.density)
        _check_t("t", self.t)
        if not math.isfinite(self.lam):
            raise ValueError(f"lambda={self.lam} must be finite")
        self.rules = [
            r if isinstance(r, MergeRule) else MergeRule.from_dict(r, f"rules[{i}]")
            for i, r in enumerate(self.rules)
        ]

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> MergeConfig:
        """Build from merge.yaml keys (without base/models/out), mapping ``lambda`` to ``lam``;
        an option the method never reads is refused (``check_options_apply``)."""
        args = {_field(k): v for k, v in raw.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(args) - known)
        if unknown:
            raise ValueError(f"{unknown[0]} is not a merge config key")
        hints = typing.get_type_hints(cls)
        for name, value in args.items():  # (rules are checked by MergeRule.from_dict)
            if name != "rules" and not matches(value, hints[name]):
                key = "lambda" if name == "lam" else name
                raise ValueError(wrong_type(key, value, hints[name]))
        cfg = cls(**args)
        cfg.check_options_apply()
        return cfg

    def check_options_apply(self) -> None:
        """ValueError naming the first option that ``method`` never reads, set away from its
        default (top level) or set at all (rules): the merge would be the same without it."""
        unset = {f.name: f.default for f in fields(self) if f.default is not MISSING}
        given = [(key, getattr(self, _field(key)), unset[_field(key)]) for key in READ_BY_METHODS]
        for i, rule in enumerate(self.rules):
            given += [
                (f"rules[{i}].{key}", getattr(rule, _field(key)), None)
                for key in ("weights", "density", "lambda", "t")
            ]
        for key, value, default in given:
            methods = READ_BY_METHODS[key.split(".")[-1]]
            if value != default and self.method not in methods:
                readers = ", ".join(m for m in methods if m != "dare")  # (an alias of dare_linear)
                raise ValueError(
                    f"{key}={value} has no effect with method={self.method} "
                    f"(it applies to {readers})"
                )

    def check_models(self, n: int) -> None:
        """Validate settings that depend on the number of models."""
        if n < 1:
            raise ValueError("models is empty; give at least one checkpoint")
        if self.method == "slerp" and n != 1:
            raise ValueError(
                f"method=slerp interpolates base → models[0], so models needs 1 entry, got {n}"
            )
        if self.weights is not None:
            _per_model("weights", self.weights, n)
        _per_model("density", self.density, n)
        for i, rule in enumerate(self.rules):
            if rule.keep is not None and not 0 <= rule.keep < n:
                raise ValueError(f"rules[{i}].keep={rule.keep} is out of range for {n} models")
            if rule.weights is not None:
                _per_model(f"rules[{i}].weights", rule.weights, n)
            if rule.density is not None:
                _per_model(f"rules[{i}].density", rule.density, n)

    def check_rules_match(self, names: Sequence[str]) -> None:
        """A rule that matches no tensor is a mistyped pattern: ValueError naming it and
        tensor names that share a word with it."""
        for i, rule in enumerate(self.rules):
            if any(fnmatchcase(name, rule.pattern) for name in names):
                continue
            words = [w for w in re.split(r"[*?.\[\]]+", rule.pattern) if w]
            similar = [n for n in names if any(w in n for w in words)] or list(names)
            raise ValueError(
                f"rules[{i}].pattern={rule.pattern!r} matches no tensor (names look like "
                f"{', '.join(similar[:2])})"
            )

    def resolve(self, name: str, n: int) -> TensorPlan:
        """Parameters for tensor ``name`` given ``n`` models: the first matching rule wins."""
        rule = next((r for r in self.rules if fnmatchcase(name, r.pattern)), None)
        rule = rule or MergeRule(pattern="*")
        weights = rule.weights if rule.weights is not None else self.weights
        return TensorPlan(
            policy=rule.policy,
            keep=rule.keep,
            weights=_per_model("weights", 1.0 if weights is None else weights, n),
            densities=_per_model("density", rule.density or self.density, n),
            lam=self.lam if rule.lam is None else rule.lam,
            t=self.t if rule.t is None else rule.t,
            density_overridden=rule.density is not None,
        )

    def num_groups(self, name: str, tensor: Tensor) -> int:
        """E for a stacked expert tensor (E, …) when ``per_expert``, else 1."""
        is_expert = any(fnmatchcase(name, p) for p in self.expert_patterns)
        return tensor.shape[0] if self.per_expert and is_expert and tensor.ndim >= 2 else 1


@dataclass
class MergeSummary:
    """Counts of what happened to each output tensor, filled by ``merge_state_dicts``."""

    merged: int = 0
    copied_from_base: int = 0
    kept_from_model: int = 0
    dropped: int = 0


def tensor_generator(seed: int, name: str) -> torch.Generator:
    """CPU generator seeded by (seed, tensor name): DARE masks independent of merge order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63)


def _keep_count(density: float, n: int) -> int:
    return max(1, round(density * n))


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _trim_mask(delta: Tensor, density: float) -> Tensor:
    """Mask of the top-``density`` magnitudes of each row of ``delta`` (G, N)."""
    n = delta.shape[-1]
    k = _keep_count(density, n)
    if k >= n:
        return torch.ones_like(delta, dtype=torch.bool)
    mag = delta.abs()
    threshold = mag.kthvalue(n - k + 1, dim=-1, keepdim=True).values  # (G, 1): k-th largest
    return mag >= threshold


def _dare_(delta: Tensor, density: float, rescale: str, generator: torch.Generator) -> None:
    """In place: drop entries of ``delta`` (G, N) with probability 1 − density, rescale the rest."""
    if density >= 1.0:
        return
    before = delta.abs().sum(-1, keepdim=True) if rescale == "l1" else None  # (G, 1)
    delta.mul_(torch.rand(delta.shape, generator=generator, dtype=delta.dtype) < density)
    if before is None:
        delta.div_(density)
        return
    after = delta.abs().sum(-1, keepdim=True)
    delta.mul_(torch.where(after > _EPS, before / after.clamp_min(_EPS), 1.0))


def _disjoint_mean_(deltas: Tensor, weights: Tensor) -> Tensor:
    """TIES sign election by total mass, then mean of the agreeing entries; consumes ``deltas``.

    The mean divides by Σ_{t∈A} |wₜ|: a negatively weighted model that agrees alone then moves
    the merge against its task (dividing by wₜ itself would flip it back towards the task)."""
    weighted = deltas.mul_(weights.view(-1, 1, 1))  # (M, G, N)
    elected = weighted.sum(0) >= 0  # (G, N): True elects +, a zero-mass tie elects +
    agree = torch.where(elected, weighted > 0, weighted < 0)  # (M, G, N); zeros never agree
    divisor = sum(w.abs() * a for w, a in zip(weights, agree, strict=True))  # (G, N)
    total = weighted.masked_fill_(~agree, 0.0).sum(0)
    return total / torch.where(divisor == 0, 1.0, divisor)


def _slerp(v0: Tensor, v1: Tensor, t: float) -> Tensor:
    """Spherical interpolation between the rows of ``v0`` and ``v1`` (G, N); lerp if colinear."""
    n0, n1 = v0.norm(dim=-1, keepdim=True), v1.norm(dim=-1, keepdim=True)  # (G, 1)
    cos = ((v0 * v1).sum(-1, keepdim=True) / (n0 * n1).clamp_min(_EPS)).clamp(-1.0, 1.0)
    linear = (cos.abs() > _LERP_DOT) | (n0 < _EPS) | (n1 < _EPS)
    omega = cos.acos()
    sin = torch.where(linear, 1.0, omega.sin())
    s0 = torch.where(linear, 1.0 - t, ((1.0 - t) * omega).sin() / sin)
    s1 = torch.where(linear, t, (t * omega).sin() / sin)
    return s0 * v0 + s1 * v1


def _label(labels: Sequence[str] | None, index: int) -> str:
    """Label of input ``index`` (0 = base, i + 1 = models[i]) for error messages."""
    if labels is not None:
        return labels[index]
    return "base" if index == 0 else f"models[{index - 1}]"


def check_tensor(
    name: str,
    base_t: Tensor | None,
    model_ts: Sequence[Tensor | None],
    plan: TensorPlan,
    labels: Sequence[str] | None = None,
) -> None:
    """Raise a one-line ``ValueError`` naming the tensor if ``plan`` cannot be applied."""
    if plan.policy == "keep":
        if model_ts[plan.keep] is None:
            raise ValueError(
                f"tensor {name!r} is kept from {_label(labels, plan.keep + 1)}, "
                "which does not have it"
            )
        return
    if plan.policy == "base":
        return
    if base_t is None:
        owner = next(i for i, m in enumerate(model_ts) if m is not None)
        raise ValueError(
            f"tensor {name!r} is in {_label(labels, owner + 1)} but not in "
            f"{_label(labels, 0)}; add a rule with policy base or keep for it"
        )
    if not base_t.is_floating_point():
        return
    for i, m in enumerate(model_ts):
        if m is None:
            raise ValueError(
                f"tensor {name!r} is missing from {_label(labels, i + 1)}; "
                "add a rule with policy base or keep for it"
            )
        if m.shape != base_t.shape:
            raise ValueError(
                f"tensor {name!r} has shape {tuple(m.shape)} in "
                f"{_label(labels, i + 1)} but {tuple(base_t.shape)} in "
                f"{_label(labels, 0)}"
            )


def _combine(
    deltas: Tensor,
    weights: Tensor,
    plan: TensorPlan,
    cfg: MergeConfig,
    generator: torch.Generator,
    thresholds: Sequence[float] | None,
) -> Tensor:
    """Sparsify task vectors (M, G, N) in place per the method and combine them to (G, N)."""
    if cfg.method == "ties":
        use_global = cfg.ties_trim == "global" and not plan.density_overridden
        if use_global and thresholds is None:
            raise ValueError(
                "ties_trim=global needs model-wide thresholds; "
                "call merge_state_dicts or pass thresholds"
            )
        for i, d in enumerate(deltas):
            d.mul_(d.abs() >= thresholds[i] if use_global else _trim_mask(d, plan.densities[i]))
    elif cfg.method in DARE_METHODS:
        for i, d in enumerate(deltas):
            _dare_(d, plan.densities[i], cfg.dare_rescale, generator)
    if cfg.method in SIGN_ELECTION_METHODS:
        return _disjoint_mean_(deltas, weights)
    return torch.tensordot(weights, deltas, dims=1)  # Σₜ wₜ τₜ


def merge_tensor(
    name: str,
    base_t: Tensor | None,
    model_ts: Sequence[Tensor | None],
    cfg: MergeConfig,
    generator: torch.Generator | None = None,
    *,
    thresholds: Sequence[float] | None = None,
    labels: Sequence[str] | None = None,
) -> Tensor | None:
    """Merge one tensor under the rule matching ``name``.

    Args:
        name: State-dict key, matched against ``cfg.rules`` and ``cfg.expert_patterns``.
        base_t: θ₀ for this key, or None if the base lacks it (allowed for base/keep policies).
        model_ts: θₜ per model, None where a model lacks the key.
        cfg: Merge settings.
        generator: DARE randomness; defaults to ``tensor_generator(cfg.seed, name)``.
        thresholds: Per-model global trim thresholds (``ties_trim=global``).
        labels: Input names for error messages: base first, then one per model.

    Returns:
        The merged tensor in the base dtype, the input tensor itself for copy policies, or None
        for policy ``base`` on a key the base lacks (the key is dropped).

    Raises:
        ValueError: Missing keys or mismatched shapes the rule does not cover.
    """
    plan = cfg.resolve(name, len(model_ts))
    check_tensor(name, base_t, model_ts, plan, labels)
    if plan.policy == "keep":
        return model_ts[plan.keep]
    if plan.policy == "base" or not base_t.is_floating_point() or base_t.numel() == 0:
        return base_t
    groups = cfg.num_groups(name, base_t)
    dtype = _compute_dtype(base_t)
    base = base_t.to(dtype).reshape(groups, -1)  # (G, N)
    thetas = torch.empty((len(model_ts), *base.shape), dtype=dtype)  # (M, G, N)
    for theta, m in zip(thetas, model_ts, strict=True):
        theta.copy_(m.reshape(groups, -1))  # one model tensor read (and cast) at a time
    weights = torch.tensor(plan.weights, dtype=dtype)  # (M,)
    if cfg.method == "linear":
        if abs(sum(plan.weights)) < _EPS:
            raise ValueError(f"weights for tensor {name!r} sum to 0; method=linear divides by it")
        merged = torch.tensordot(weights, thetas, dims=1) / sum(plan.weights)
    elif cfg.method == "slerp":
        merged = _slerp(base, thetas[0], plan.t)
    else:
        deltas = thetas.sub_(base)  # (M, G, N) task vectors, in place on our own copy
        gen = generator or tensor_generator(cfg.seed, name)
        merged = base + plan.lam * _combine(deltas, weights, plan, cfg, gen, thresholds)
    return merged.reshape(base_t.shape).to(base_t.dtype)


def tied_names(
    base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], cfg: MergeConfig
) -> dict[str, str]:
    """{name: the earlier name it is tied to}: one tensor saved under two names (a language
    model's output head tied to its input embedding), in the base and in every model alike,
    under the same rule. Merged once: two DARE draws, one per name, untied it, and a global
    TIES threshold counted its entries twice."""

    def tensor_id(t: Tensor | None) -> tuple | None:
        if t is None or t.numel() == 0:
            return None
        return (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())

    first: dict[tuple, str] = {}
    tied = {}
    for name in base:
        ids = tuple(tensor_id(s.get(name)) for s in (base, *models))
        if None in ids:
            continue
        earlier = first.setdefault(ids, name)
        if earlier != name and cfg.resolve(earlier, len(models)) == cfg.resolve(name, len(models)):
            tied[name] = earlier
    return tied


def global_thresholds(
    base: Mapping[str, Tensor], models: Sequence[Mapping[str, Tensor]], cfg: MergeConfig
) -> list[float]:
    """Per model, the k-th largest |τₜ| over all tensors that use the model-wide density
    (a tied tensor once).

    Exact: one model's task-vector magnitudes at a time go into one flat buffer.
    """
    n = len(models)
    tied = tied_names(base, models, cfg)
    names = [
        k
        for k, b in base.items()
        if k not in tied
        and b.is_floating_point()
        and b.numel() > 0
        and all(k in m for m in models)
        and (plan := cfg.resolve(k, n)).policy == "merge"
        and not plan.density_overridden
    ]
    if not names:
        return [0.0] * n
    total = sum(base[k].numel() for k in names)
    dtype = torch.float64 if all(base[k].dtype == torch.float64 for k in names) else torch.float32
    thresholds = []
    for model, density in zip(models, _per_model("density", cfg.density, n), strict=True):
        k = _keep_count(density, total)
        if k >= total:
            thresholds.append(0.0)
            continue
        buffer = torch.empty(total, dtype=dtype)  # |τₜ| of the whole model, flattened
        offset = 0
        for key in names:
            size = base[key].numel()
            buffer[offset : offset + size] = (
                (model[key].to(dtype) - base[key].to(dtype)).abs().flatten()
            )
            offset += size
        thresholds.append(buffer.kthvalue(total - k + 1).values.item())
        del buffer
    return thresholds


def merge_state_dicts(
    base: Mapping[str, Tensor],
    models: Sequence[Mapping[str, Tensor]],
    cfg: MergeConfig,
    *,
    labels: Sequence[str] | None = None,
    summary: MergeSummary | None = None,
) -> dict[str, Tensor]:
    """Merge ``models`` into ``base`` tensor by tensor; inputs are not modified.

    Every key is checked before any arithmetic, so a mismatch fails fast. Output keys follow the
    base order, then keys only some models have (kept via rules). A tensor tied under two
    names (`tied_names`) is merged once and stays tied.

    Args:
        base: θ₀ state dict.
        models: State dicts to merge (same architecture).
        cfg: Merge settings.
        labels: Input names for error messages: base first, then one per model.
        summary: Filled with counts of merged / copied / kept / dropped tensors.

    Returns:
        The merged state dict.

    Raises:
        ValueError: Invalid settings, missing keys or mismatched shapes.
    """
    cfg.check_models(len(models))
    names = list(dict.fromkeys([*base, *(k for m in models for k in m)]))
    cfg.check_rules_match(names)
    for name in names:
        check_tensor(
            name,
            base.get(name),
            [m.get(name) for m in models],
            cfg.resolve(name, len(models)),
            labels,
        )
    thresholds = None
    if cfg.method == "ties" and cfg.ties_trim == "global":
        thresholds = global_thresholds(base, models, cfg)
    summary = summary if summary is not None else MergeSummary()
    tied = tied_names(base, models, cfg)
    out: dict[str, Tensor] = {}
    for name in names:
        if name in tied:
            out[name] = out[tied[name]]
            continue
        base_t, model_ts = base.get(name), [m.get(name) for m in models]
        merged = merge_tensor(
            name,
            base_t,
            model_ts,
            cfg,
            tensor_generator(cfg.seed, name),
            thresholds=thresholds,
            labels=labels,
        )
        if merged is None:
            summary.dropped += 1
            continue
        if merged is base_t:
            summary.copied_from_base += 1
        elif any(merged is m for m in model_ts):
            summary.kept_from_model += 1
        else:
            summary.merged += 1
        out[name] = merged
    return out


HEAD, EMBEDDING = "model.head.weight", "model.input.weight"


def untie_merged_head(out: dict[str, Any], base: Mapping[str, Tensor]) -> None:
    """A base whose output head is its input embedding, merged with fine-tunes that trained a
    head of their own (`model.tie_embeddings=false`): the merged head and embedding differ, so
    the merged checkpoint's config unties them too (loading it tied would keep one of them)."""
    state, cfg = out["state_dict"], (out.get("hyper_parameters") or {}).get("cfg")
    if HEAD not in base or EMBEDDING not in base or not isinstance(cfg, dict):
        return
    if base[HEAD].data_ptr() != base[EMBEDDING].data_ptr() or torch.equal(
        state[HEAD], state[EMBEDDING]
    ):
        return
    out["hyper_parameters"] = {
        **out["hyper_parameters"],
        "cfg": {**cfg, "model": {**cfg["model"], "tie_embeddings": False}},
    }


def merge_checkpoints(
    base_path: str | os.PathLike,
    model_paths: Sequence[str | os.PathLike],
    cfg: MergeConfig,
    out_path: str | os.PathLike,
    *,
    summary: MergeSummary | None = None,
) -> Path:
    """Merge Lightning checkpoints and write the result atomically to ``out_path``.

    The output keeps the base checkpoint's entries (``hyper_parameters``,
    ``pytorch-lightning_version`` …) except optimizer/scheduler/loop/callback state, replaces
    ``state_dict`` and records the merge settings under ``advarch_merge``.

    Raises:
        CheckpointError: An input checkpoint is missing or unreadable.
        ValueError: Invalid settings, a file without ``state_dict``, mismatched tensors, or an
            ``out`` path that is a folder or equal to an input.
        OSError: ``out`` cannot be written (read-only, full disk), naming ``out_path``.
    """
    base_path, out_path = Path(base_path), Path(out_path)
    model_paths = [Path(p) for p in model_paths]
    if out_path.is_dir():
        raise ValueError(
            f"out={out_path} is a folder; name the file, e.g. out={out_path / 'merged.ckpt'}"
        )
    for p in (base_path, *model_paths):
        if out_path.exists() and out_path.resolve() == p.resolve():
            raise ValueError(f"out={out_path} would overwrite input checkpoint {p}")
    labels = [f"base ({base_path})", *(f"models[{i}] ({p})" for i, p in enumerate(model_paths))]
    keys = ["base", *(f"models[{i}]" for i in range(len(model_paths)))]
    # mmap keeps tensors on disk until read: merging streams tensor by tensor
    checkpoints = [
        read_checkpoint(p, key, mmap=True)
        for key, p in zip(keys, (base_path, *model_paths), strict=True)
    ]
    state = merge_state_dicts(
        checkpoints[0]["state_dict"],
        [c["state_dict"] for c in checkpoints[1:]],
        cfg,
        labels=labels,
        summary=summary,
    )
    out = {k: v for k, v in checkpoints[0].items() if k not in DROPPED_CHECKPOINT_KEYS}
    out["state_dict"] = state
    untie_merged_head(out, checkpoints[0]["state_dict"])
    out["advarch_merge"] = {
        "base": str(base_path),
        "models": [str(p) for p in model_paths],
        "config": asdict(cfg),
    }
    return save_atomic(out, out_path)
