"""The third-party warnings advarch knows to be noise, ignored in every process of a run.

train.py installs them at start; `IgnoreKnownWarnings` installs them again in each process a
run spawns (`trainer=ddp` is spawn-based: its workers are fresh interpreters that never ran
train.py's setup, so without it every worker repeats Lightning's epoch-logging advice).
"""

from __future__ import annotations

import warnings

import lightning as L

_LAST = ".*The dirpath has changed from.*"  # the last filter installed: present = all are


def ignore_known_warnings() -> None:
    """Install the filters unless they are there: changing the warning filters resets
    Python's record of warnings already shown, so a process with several runs (demos,
    sweeps) would repeat every warning."""
    if any(f[1] is not None and f[1].pattern == _LAST for f in warnings.filters):
        return
    warnings.filterwarnings("ignore", message=".*batching rule.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*dataloader is not resumable.*")  # ours is
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # frozen ones
    # epoch values are torchmetrics' compute(), already reduced over DDP processes (test_ddp)
    warnings.filterwarnings("ignore", message=".*sync_dist=True.*when logging on epoch level.*")
    # short epochs: every epoch's values are logged anyway, the step curve has fewer points
    warnings.filterwarnings("ignore", message=".*is smaller than the logging interval.*")
    # bf16-mixed keeps float32 parameters: the summary's 32-bit size is the true one
    warnings.filterwarnings("ignore", message=".*is not supported by the model summary.*")
    # validation and test on several processes repeat a few samples: README's DDP section says so
    warnings.filterwarnings("ignore", message=".*Using `DistributedSampler` with the dataloaders.*")
    # the ranked best-k record under another key: RankedCheckpoint finds it or says it restarts
    warnings.filterwarnings(
        "ignore", message=r'.*Please add the following callbacks: \["RankedCheckpoint\{[^"]*\}"\]'
    )
    # a run resumed in its own folder (`hydra.run.dir=<run> ckpt_path=auto`, a requeued job):
    # any other run into a folder holding one is refused before it starts (`output_folders`)
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty")
    # a resumed run writes into a folder of its own, by design: the old folder keeps its best
    warnings.filterwarnings("ignore", message=_LAST)


class IgnoreKnownWarnings(L.Callback):
    """`ignore_known_warnings` in every process of the run, spawned DDP workers included."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        ignore_known_warnings()
