"""Training throughput: tokens/s, samples/s and model FLOPs utilisation (MFU), in every run.

Time is wall clock over windows of `trainer.log_every_n_steps` batches, with the device
synchronised only at window edges (not every step). Validation inside `fit` and an epoch's
end (a task stream's boundary work: evaluating every task, EWC's Fisher, its checkpoint) are
paused out, up to the next batch. Rates are the whole job's: under DDP every process trains
a batch of the same size, so a process's counts times the processes; MFU divides by as many
devices' peaks.
The first batch (compilation, cuDNN autotuning, allocator warm-up) is excluded from the run
totals. MFU = `training_flops_per_token` × tokens/s ÷ the device's dense peak for the
trainer's precision (the table below; else Lightning's; unknown, e.g. CPUs: MFU not logged
unless `peak_flops` is given), times the model passes a strategy makes per counted example
where it says (`model_passes(batch)`: first-order MAML's inner loop). Each window's rates are
logged as `train/tokens_per_s` (unless a sample is one token: a feature vector, an episode's
example), `train/samples_per_s`, `train/mfu`; the run's totals replace
them in `trainer.callback_metrics` (which the run summary prints) and in the W&B run's summary.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch

from advarch.models.flops import feature_tokens, training_flops_per_token

# Dense (no sparsity) tensor-core peaks from the vendors' datasheets, FLOP/s; the first name
# the device's holds wins (the PCIe and NVL cards run at lower clocks than the SXM ones).
DENSE_PEAK = {
    "h100 pcie": {"bf16": 756e12, "tf32": 378e12},
    "h100 nvl": {"bf16": 835e12, "tf32": 418e12},
    "h200 nvl": {"bf16": 835e12, "tf32": 418e12},
    "h100": {"bf16": 989e12, "tf32": 494e12},
    "h200": {"bf16": 989e12, "tf32": 494e12},
    "a100": {"bf16": 312e12, "tf32": 156e12},
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """Dense peak FLOP/s of ``device`` at the trainer's ``precision`` (None when unknown)."""
    if device.type != "cuda":
        return None
    half = "16" in precision
    name = torch.cuda.get_device_name(device).lower()
    for chip, peaks in DENSE_PEAK.items():
        if chip in name:
            return peaks["bf16" if half else "tf32"]
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(device, torch.bfloat16 if half else "tfloat32")


def batch_counts(batch: Any, feature_tokens: int = 1) -> tuple[int, int]:
    """(samples, tokens) of a batch dict: token ids (B, T) count B·T, other inputs B times
    the tokens the model makes of one (`flops.feature_tokens`: its feature patches); a
    few-shot episode counts its support and query examples."""
    if isinstance(batch, dict) and "support" in batch:
        parts = [batch_counts({"inputs": batch[p]}, feature_tokens) for p in ("support", "query")]
        return parts[0][0] + parts[1][0], parts[0][1] + parts[1][1]
    inputs = batch.get("input_ids", batch.get("inputs")) if isinstance(batch, dict) else None
    if not isinstance(inputs, torch.Tensor) or inputs.dim() == 0:
        return 0, 0
    samples = inputs.shape[0]
    ids = inputs.dim() == 2 and not inputs.is_floating_point()
    return samples, inputs.numel() if ids else samples * feature_tokens


class ThroughputCallback(L.Callback):
    """Logs `train/tokens_per_s`, `train/samples_per_s` and `train/mfu` per window and per run.

    Args:
        peak_flops: the device's peak FLOP/s for MFU (None: looked up for the device).
    """

    def __init__(self, peak_flops: float | None = None) -> None:
        self.peak = peak_flops
        self.flops_per_token: float | None = None
        self._window = [0, 0, 0.0]  # samples, tokens, seconds since the last window edge
        self._total = [0, 0, 0.0]  # the same over the run, first batch excluded
        self._since: float | None = None  # clock at the last edge (None: paused)
        self._batches = 0
        self._processes = 1
        self._feature_tokens = 1

    def _sync_clock(self, device: torch.device) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def _elapsed(self, device: torch.device) -> float:
        now = self._sync_clock(device)
        seconds = 0.0 if self._since is None else now - self._since
        self._since = now
        return seconds

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.peak is None:
            self.peak = peak_flops(pl_module.device, str(trainer.precision))
        self._processes = max(int(trainer.world_size), 1)
        self._feature_tokens = feature_tokens(pl_module)  # (a digit: 8 patches, not 1 token)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._since is None:
            self._since = self._sync_clock(pl_module.device)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        samples, tokens = batch_counts(batch, self._feature_tokens)
        if self.flops_per_token is None and samples:
            seq_len = max(tokens // samples, 1)
            passes = getattr(pl_module, "model_passes", None)  # (few-shot inner loops)
            self.flops_per_token = training_flops_per_token(
                getattr(pl_module, "model", pl_module), seq_len
            ) * (1.0 if passes is None else passes(batch))
        self._batches += 1
        if self._batches == 1:  # warm-up batch: restart the clock after it
            self._elapsed(pl_module.device)
            return
        self._window[0] += samples * self._processes
        self._window[1] += tokens * self._processes
        if self._batches % max(trainer.log_every_n_steps, 1) == 0:
            self._close_window(pl_module.device)
            rates = self._rates(self._window)
            if rates:
                pl_module.log_dict({f"train/{k}": v for k, v in rates.items()}, on_step=True)
            self._window = [0, 0, 0.0]

    def _close_window(self, device: torch.device) -> None:
        self._window[2] += self._elapsed(device)
        for i in range(3):
            self._total[i] += self._window[i]

    def _rates(self, counts: list) -> dict[str, float]:
        samples, tokens, seconds = counts
        if seconds <= 0 or not samples:
            return {}
        rates = {"tokens_per_s": tokens / seconds, "samples_per_s": samples / seconds}
        if self.peak and self.flops_per_token:
            peak = self.peak * self._processes
            rates["mfu"] = rates["tokens_per_s"] * self.flops_per_token / peak
        if tokens == samples:  # a sample is one token (a feature vector): one rate, not twice
            del rates["tokens_per_s"]
        return rates

    def _pause(self, device: torch.device) -> None:
        """Stop the clock until the next batch starts it."""
        if self._since is not None:
            self._window[2] += self._elapsed(device)
            self._since = None

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.state.fn == "fit":
            self._pause(pl_module.device)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._pause(pl_module.device)  # (callbacks' hook runs before the module's)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The run's totals: in the callback metrics (the run summary), and in the W&B run's
        summary, which would otherwise keep the last window's rates."""
        self._close_window(pl_module.device)  # the unfinished window
        totals = {f"train/{key}": value for key, value in self._rates(self._total).items()}
        for key, value in totals.items():
            trainer.callback_metrics[key] = torch.tensor(value)
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger" and trainer.is_global_zero and totals:
                logger.experiment.summary.update(totals)
