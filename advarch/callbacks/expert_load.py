"""Expert-load heatmaps for MoE models: layers × experts, coloured by fraction of token-slots.

Reads the `moe/layer{i}/load` entries of the model-output `stats` that the strategy returns
from `training_step` as `{"loss": ..., "stats": ...}`, averages them over each logging window
and writes `expert_load_step{N}.png`, `expert_load_latest.png` and the history
`expert_load_history.npz` (steps × layers × experts). Router collapse shows as one bright
column; a healthy router is a flat 1/E image.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from advarch.checkpoint import run_dir_of

LOAD_KEY = re.compile(r"moe/layer(\d+)/load$")
MAX_ANNOTATED_CELLS = 256  # beyond this the numbers are unreadable; the colours remain


def plot_expert_load(
    load: np.ndarray, path: str | Path, title: str, layers: Sequence[int] | None = None
) -> Path:
    """Write a heatmap of `load` (layers, E) to `path` (PNG, Agg canvas, no pyplot state).

    Cells hold the fraction of the layer's token-slots routed to each expert (NaN = the layer
    has fewer experts). `layers` labels the rows (default 0…layers−1). Returns the path.
    """
    load = np.asarray(load, dtype=float)
    rows, experts = load.shape
    fig = Figure(figsize=(max(4.0, 0.6 * experts + 2.0), max(2.5, 0.45 * rows + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(load, aspect="auto", cmap="viridis", vmin=0.0)
    fig.colorbar(image, ax=ax, label="fraction of token-slots")
    if load.size <= MAX_ANNOTATED_CELLS:
        vmax = np.nanmax(load) if np.isfinite(load).any() else 1.0
        for (i, j), value in np.ndenumerate(load):
            if np.isfinite(value):
                colour = "black" if value > 0.6 * vmax else "white"
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color=colour)
    ax.set(xlabel="expert", ylabel="layer", title=title)
    ax.set_xticks(range(experts))
    ax.set_yticks(range(rows), [str(i) for i in (layers if layers is not None else range(rows))])
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _stack_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Stack 1-D load vectors of possibly different lengths into (len(rows), max E), NaN-padded."""
    out = np.full((len(rows), max(r.shape[0] for r in rows)), np.nan)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


class ExpertLoadCallback(L.Callback):
    """Average per-layer expert load over each window of `every_n_steps` steps and plot it.

    Writes (rank zero only) a heatmap every `every_n_steps` optimizer steps and at train end,
    keeps the history in `expert_load_history.npz` (`steps` (S,), `load` (S, layers, E),
    `layers` (layers,)) and, when a `WandbLogger` is attached, logs the image under
    `moe/expert_load`. Models without MoE stats produce no files.

    Args:
        every_n_steps: optimizer steps per logging window (and per heatmap).
        plot_dir: output folder; None = `<trainer.default_root_dir>/plots`.
    """

    def __init__(self, every_n_steps: int = 50, plot_dir: str | None = None) -> None:
        super().__init__()
        if every_n_steps < 1:
            raise ValueError(f"callbacks.expert_load.every_n_steps={every_n_steps} must be >= 1")
        self.every_n_steps = every_n_steps
        self.plot_dir = plot_dir
        self.history_steps: list[int] = []
        self.history: list[np.ndarray] = []  # one (layers, E) mean load per window
        self.layers: list[int] = []
        self._window_sum: dict[int, np.ndarray] = {}
        self._window_batches = 0
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step  # (a resume's: no window closes before a step)
        if self.history and trainer.is_global_zero:  # resumed: its folder gets the earlier ones
            folder = self._folder(trainer)
            if trainer.ckpt_path:  # (heatmaps take ~0.4 s each to draw again: copied)
                earlier = self._folder(trainer, run_dir_of(Path(trainer.ckpt_path)))
                self._carry_heatmaps(earlier, folder)
            self._save_history(folder)

    def state_dict(self) -> dict[str, Any]:
        """The windows so far and the open one's sums: a resumed run's history is the
        uninterrupted run's (tensors: a checkpoint loads without numpy's pickles)."""
        history = torch.from_numpy(self.history_array()) if self.history else torch.empty(0)
        return {
            "history_steps": list(self.history_steps),
            "history": history,  # (S, layers, E) float64, NaN-padded
            "layers": list(self.layers),
            "window_sum": {layer: torch.from_numpy(s) for layer, s in self._window_sum.items()},
            "window_batches": self._window_batches,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history_steps = list(state_dict["history_steps"])
        self.history = list(state_dict["history"].numpy())
        self.layers = list(state_dict["layers"])
        self._window_sum = {int(k): s.numpy() for k, s in state_dict["window_sum"].items()}
        self._window_batches = int(state_dict["window_batches"])

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        stats = outputs.get("stats") if isinstance(outputs, Mapping) else None
        loads = {
            int(match.group(1)): value.detach().float().cpu().numpy()
            for key, value in (stats or {}).items()
            if (match := LOAD_KEY.search(key))
        }
        if not loads:
            return
        for layer, load in loads.items():
            previous = self._window_sum.get(layer)
            same_shape = previous is not None and previous.shape == load.shape
            self._window_sum[layer] = previous + load if same_shape else load.copy()
        self._window_batches += 1
        step = trainer.global_step  # (under gradient accumulation: steps, not micro-batches)
        if step % self.every_n_steps == 0 and step != self._last_step:
            self._flush(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._window_batches:
            self._flush(trainer, trainer.global_step)

    def _flush(self, trainer: L.Trainer, step: int) -> None:
        """Close the window: record its mean load, plot it, save the history, log to W&B."""
        self.layers = sorted(self._window_sum)
        batches = self._window_batches
        mean = [self._window_sum[i] / batches for i in self.layers]
        self.history_steps.append(step)
        self.history.append(_stack_rows(mean))
        self._window_sum, self._window_batches, self._last_step = {}, 0, step
        if not trainer.is_global_zero:
            return
        folder = self._folder(trainer)
        title = f"expert load, step {step} (mean over {batches} batch{'es' * (batches != 1)})"
        path = folder / f"expert_load_step{step}.png"
        plot_expert_load(self.history[-1], path, title, self.layers)
        shutil.copyfile(path, folder / "expert_load_latest.png")
        self._save_history(folder)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="moe/expert_load", images=[str(path)])

    def _folder(self, trainer: L.Trainer, run_dir: Path | None = None) -> Path:
        """The heatmaps' folder: `plot_dir`, else `plots/` of the run (this one's)."""
        return Path(self.plot_dir or Path(run_dir or trainer.default_root_dir) / "plots")

    def _carry_heatmaps(self, earlier: Path, folder: Path) -> None:
        """Copy the heatmaps of the windows before a resume, missing in `folder`, from the
        `earlier` run's (the last of them as the latest)."""
        names = [f"expert_load_step{step}.png" for step in self.history_steps]
        for name in names:
            if (earlier / name).is_file() and not (folder / name).exists():
                folder.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(earlier / name, folder / name)
        if (folder / names[-1]).is_file():
            shutil.copyfile(folder / names[-1], folder / "expert_load_latest.png")

    def _save_history(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / "expert_load_history.npz",
            steps=np.asarray(self.history_steps),
            load=self.history_array(),
            layers=np.asarray(self.layers),
        )

    def history_array(self) -> np.ndarray:
        """History as (steps, layers, E), NaN-padded where a window had fewer layers/experts."""
        layers = max(h.shape[0] for h in self.history)
        experts = max(h.shape[1] for h in self.history)
        out = np.full((len(self.history), layers, experts), np.nan)
        for i, h in enumerate(self.history):
            out[i, : h.shape[0], : h.shape[1]] = h
        return out
