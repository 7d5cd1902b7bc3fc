"""Diagonal Fisher information estimators for Elastic Weight Consolidation.

EWC (Kirkpatrick et al. 2017, eq. 3) weights each parameter by the diagonal of the Fisher
information F = E_x E_{y~p(y|x)} [(∂ log p(y|x) / ∂θ)²], estimated on n samples of a task:

- `empirical` (default): y = the true label, F ≈ 1/n Σ_i g_i², g_i = ∇ log p(y_i|x_i).
- `sampled`: y_i drawn from the model's own predictive distribution p(·|x_i) (the true Fisher
  by Monte Carlo, one draw per input).
- `exact`: the expectation over all C classes, F ≈ 1/n Σ_i Σ_c p(c|x_i) (∇ log p(c|x_i))².
- `batched`: the shortcut some libraries use, the square of the MINIBATCH-MEAN gradient,
  F ≈ 1/m Σ_batches (1/b Σ_i g_i)². Cross terms between samples mostly cancel, so it
  underestimates the per-sample estimate by roughly the batch size b. Kept for comparison.

Per-sample gradients are vectorised with `torch.func` (`functional_call` + `vmap(grad)`).
Models whose forward cannot be vmapped (MoE dispatch sorts, counts and splits tokens by
data-dependent sizes) fall back to a loop over single samples. The choice is made once per
estimator on the first chunk: the vmapped result for one sample is checked against the loop,
and any error or mismatch switches to the loop for good, so the fast path is never wrong (a
mismatch is a warning; an error, expected for MoE models, a debug line: the result is the same).

Language models: a sample is a sequence, and its log p(y|x) is the MEAN over its scored
positions (padding left out) of log p(y_t | x_<t) (teacher forcing); only the `empirical` and
`batched` estimators apply (the strategy refuses the others). The square of that mean's
gradient is not the per-token Fisher: the tokens' gradients partly cancel, as the samples' do
in `batched`, so it is roughly 1/T of it (review 42: 14× smaller at T = 16, 52× at T = 64),
and λ's scale goes with `data.seq_len` (the default λ = 10⁴ is tuned at T = 256).

The model is put in eval mode (no dropout, no router jitter) while estimating. The caller's
`log_probs(model, batch)` decides what the model sees (expert masks) and which head scores
(per-task heads); it must return log-probabilities only, so MoE aux losses are excluded.

Shapes: B batch (a chunk), C classes, P a parameter's shape, n samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

log = logging.getLogger("advarch")

Estimator = Literal["empirical", "sampled", "exact", "batched"]
ESTIMATORS = ("empirical", "sampled", "exact", "batched")
Batch = dict[str, torch.Tensor]
LogProbs = Callable[[nn.Module, Batch], torch.Tensor]  # → (B, C), or (B, T, V) for sequences
Params = dict[str, torch.Tensor]


class _Bound(nn.Module):
    """`log_probs` bound to `model`, so `functional_call` can swap the model's parameters."""

    def __init__(self, model: nn.Module, log_probs: LogProbs) -> None:
        super().__init__()
        self.model = model
        self.log_probs = log_probs

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.log_probs(self.model, batch)


def target_log_prob(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """log p(y|x) of samples: (…, C) log-probabilities and (…) targets → the mean over the
    leading dims (a single sample's value; a sequence's mean over its positions), targets
    below 0 (IGNORE: padding) left out as the training loss leaves them."""
    scored = target >= 0
    picked = log_probs.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(scored, picked, 0.0).sum() / scored.sum().clamp(min=1)


def take_samples(batches: Iterable[Batch], num_samples: int, chunk_size: int) -> Iterator[Batch]:
    """Re-chunk `batches` into chunks of at most `chunk_size` examples, `num_samples` in all."""
    left, pending = num_samples, []
    for batch in batches:
        size = min(left, len(next(iter(batch.values()))))
        pending.append({k: v[:size] for k, v in batch.items()})
        left -= size
        if left == 0:
            break
    merged = {k: torch.cat([b[k] for b in pending]) for k in pending[0]} if pending else {}
    total = num_samples - left
    for start in range(0, total, chunk_size):
        yield {k: v[start : start + chunk_size] for k, v in merged.items()}


class FisherEstimator:
    """Diagonal Fisher of a model's trainable parameters on a task's samples.

    Args:
        estimator: `empirical`, `sampled`, `exact` or `batched` (module docstring).
        num_samples: examples used (fewer if the task has fewer).
        chunk_size: examples per vmapped chunk; also the minibatch size of `batched`.
        seed: seed of the label draws of `sampled`, restarted at every call (a call may
            name its own), so a task's Fisher never depends on the calls before it: a run
            resumed after a task boundary estimates the same Fisher as an uninterrupted one.
    """

    def __init__(
        self,
        estimator: Estimator = "empirical",
        num_samples: int = 512,
        chunk_size: int = 32,
        seed: int = 0,
    ) -> None:
        if estimator not in ESTIMATORS:
            raise ValueError(f"strategy.fisher_estimator={estimator!r} is not one of {ESTIMATORS}")
        if num_samples < 1:
            raise ValueError(f"strategy.fisher_samples={num_samples} must be >= 1")
        if chunk_size < 1:
            raise ValueError(f"strategy.fisher_chunk_size={chunk_size} must be >= 1")
        self.estimator, self.num_samples, self.chunk_size = estimator, num_samples, chunk_size
        self.seed = seed
        # a call's own: held only during it (a Generator does not pickle into ddp_spawn's
        # workers: `trainer=ddp_sim strategy=ewc` hung on the unpickling error)
        self.generator: torch.Generator | None = None
        self.vectorized: bool | None = None  # decided once, on the first chunk

    def __call__(self, model: nn.Module, batches: Iterable[Batch], log_probs: LogProbs,
                 seed: int | None = None) -> Params:  # fmt: skip
        """Fisher diagonal per trainable parameter name (same shapes), averaged over samples;
        `sampled` draws labels from `seed` (None: the estimator's)."""
        self.generator = torch.Generator().manual_seed(self.seed if seed is None else seed)
        was_training = model.training
        model.eval()
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        try:
            with torch.enable_grad():
                for chunk in take_samples(batches, self.num_samples, self.chunk_size):
                    for name, value in self._chunk_sum(model, params, chunk, log_probs).items():
                        fisher[name] += value
                    count += 1 if self.estimator == "batched" else _size(chunk)
        finally:
            model.train(was_training)
            self.generator = None
        return {n: f / max(count, 1) for n, f in fisher.items()}

    # -- one chunk ----------------------------------------------------------------------------
    def _chunk_sum(
        self, model: nn.Module, params: Params, chunk: Batch, log_probs: LogProbs
    ) -> Params:
        """Σ over the chunk's samples of their squared-gradient terms (one term for batched)."""
        if self.estimator == "batched":
            return _batched_square(model, params, chunk, log_probs)
        targets = self._targets(model, chunk, log_probs)  # (B,) or None for exact
        if self.vectorized is None:
            self.vectorized = self._vmap_agrees(model, params, chunk, targets, log_probs)
        if self.vectorized:
            return self._vmapped(model, params, chunk, targets, log_probs)
        return per_sample_loop(model, params, chunk, targets, log_probs)

    @torch.no_grad()
    def _targets(self, model: nn.Module, chunk: Batch, log_probs: LogProbs) -> torch.Tensor | None:
        if self.estimator == "empirical":
            return chunk["labels"]
        if self.estimator == "exact":
            return None
        probs = log_probs(model, chunk).exp().cpu()  # (B, C)
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0].to(
            chunk["labels"].device
        )

    def _vmapped(
        self,
        model: nn.Module,
        params: Params,
        chunk: Batch,
        targets: torch.Tensor | None,
        log_probs: LogProbs,
    ) -> Params:
        bound = _Bound(model, log_probs)
        buffers = {f"model.{n}": b for n, b in model.named_buffers()}

        def sample_log_prob(p: Params, example: Batch, y: torch.Tensor) -> torch.Tensor:
            full = {**{f"model.{n}": v for n, v in p.items()}, **buffers}
            one = {k: v.unsqueeze(0) for k, v in example.items()}
            return target_log_prob(functional_call(bound, full, (one,))[0], y)

        per_sample = vmap(grad(sample_log_prob), in_dims=(None, 0, 0))  # → {n: (B, *P)}
        if targets is not None:
            grads = per_sample(params, chunk, targets)
            return {n: g.pow(2).sum(0) for n, g in grads.items()}
        # exact: one vmapped pass per class keeps memory at B·P (a Jacobian would need B·C·P)
        with torch.no_grad():
            probs = log_probs(model, chunk).exp()  # (B, C)
        out = {n: torch.zeros_like(p) for n, p in params.items()}
        for c in range(probs.shape[1]):
            grads = per_sample(params, chunk, torch.full_like(chunk["labels"], c))
            for n, g in grads.items():
                out[n] += torch.einsum("b,b...->...", probs[:, c].to(g.dtype), g.pow(2))
        return out

    def _vmap_agrees(
        self,
        model: nn.Module,
        params: Params,
        chunk: Batch,
        targets: torch.Tensor | None,
        log_probs: LogProbs,
    ) -> bool:
        """Try vmap on the first sample; use it only if it runs and matches the loop."""
        one = {k: v[:1] for k, v in chunk.items()}
        one_target = None if targets is None else targets[:1]
        try:
            fast = self._vmapped(model, params, one, one_target, log_probs)
        except (RuntimeError, NotImplementedError, ValueError, TypeError) as err:
            # expected for MoE models, so not on the console: each sample routes its tokens
            # into expert blocks of its own sizes, which vmap cannot batch
            log.debug("Fisher: vmap cannot batch this model's per-sample gradients (%s), so "
                      "they are computed one sample at a time: the same Fisher, only slower",
                      type(err).__name__)  # fmt: skip
            return False
        slow = per_sample_loop(model, params, one, one_target, log_probs)
        ok = all(torch.allclose(fast[n], slow[n], rtol=1e-3, atol=1e-7) for n in params)
        if not ok:
            log.warning("Fisher: vmapped per-sample gradients disagree with the loop; looping")
        return ok


def _size(batch: Batch) -> int:
    return len(next(iter(batch.values())))


def per_sample_loop(
    model: nn.Module,
    params: Params,
    chunk: Batch,
    targets: torch.Tensor | None,
    log_probs: LogProbs,
) -> Params:
    """The fallback: one forward/backward per sample (targets None = exact expectation)."""
    live = [p for p in model.parameters() if p.requires_grad]
    names = list(params)
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(_size(chunk)):
        lp = log_probs(model, {k: v[i : i + 1] for k, v in chunk.items()})[0]  # (C,) or (T, V)
        if targets is None:  # exact: Σ_c p(c|x) (∇ log p(c|x))²
            terms = [(lp[c], lp[c].detach().exp()) for c in range(lp.shape[0])]
        else:
            terms = [(target_log_prob(lp, targets[i]), 1.0)]
        for value, weight in terms:
            grads = torch.autograd.grad(value, live, retain_graph=True, allow_unused=True)
            for n, g in zip(names, grads, strict=True):
                if g is not None:
                    out[n] += weight * g.pow(2)
    return out


def _batched_square(model: nn.Module, params: Params, chunk: Batch, log_probs: LogProbs) -> Params:
    """(∇ mean_i log p(y_i|x_i))² over one minibatch: the biased library shortcut."""
    live = [p for p in model.parameters() if p.requires_grad]
    mean = target_log_prob(log_probs(model, chunk), chunk["labels"])  # over the batch
    grads = torch.autograd.grad(mean, live, allow_unused=True)
    return {
        n: (torch.zeros_like(p) if g is None else g.pow(2))
        for (n, p), g in zip(params.items(), grads, strict=True)
    }
