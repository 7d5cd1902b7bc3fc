"""ExpertLoadCallback: heatmaps, history and W&B images from synthetic MoE stats."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from advarch.callbacks.expert_load import ExpertLoadCallback, plot_expert_load
from tests.wandb_offline import history, run_log

ROOT = Path(__file__).resolve().parents[2]
E = 4


def synthetic_load(step: int, layer: int) -> torch.Tensor:
    """A load vector (E,) summing to one that changes with the step and layer."""
    raw = torch.arange(1, E + 1, dtype=torch.float32) + step * (layer + 1)
    return raw / raw.sum()


class FakeMoEModule(L.LightningModule):
    """Returns `{"loss", "stats"}` like the strategies do, with two MoE layers (0 and 2)."""

    def __init__(self, with_stats: bool = True) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2))
        self.with_stats = with_stats

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> dict:
        loss = (batch[0] * self.weight).sum().pow(2)
        stats = {"moe/layer1/dropped": torch.tensor(0.0)}
        for layer in (0, 2):
            stats[f"moe/layer{layer}/load"] = synthetic_load(self.global_step, layer)
        return {"loss": loss, "stats": stats if self.with_stats else {}}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(
    tmp_path: Path,
    max_steps: int,
    callback: ExpertLoadCallback,
    stats: bool = True,
    logger: WandbLogger | None = None,
    accumulate: int = 1,
) -> None:
    loader = DataLoader(TensorDataset(torch.randn(32, 2)), batch_size=2)
    trainer = L.Trainer(
        max_steps=max_steps,
        logger=logger or False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(FakeMoEModule(stats), loader)


def expected_window(steps: range) -> np.ndarray:
    """Mean load over batches whose pre-step global_step is in `steps`: (2 layers, E)."""
    return np.stack(
        [np.mean([synthetic_load(s, layer).numpy() for s in steps], axis=0) for layer in (0, 2)]
    )


def test_writes_heatmaps_and_history(tmp_path: Path, monkeypatch) -> None:
    import advarch.callbacks.expert_load as expert_load

    titles, plot = [], expert_load.plot_expert_load
    monkeypatch.setattr(expert_load, "plot_expert_load",
                        lambda load, path, title, *a, **k: titles.append(title) or plot(
                            load, path, title, *a, **k))  # fmt: skip
    callback = ExpertLoadCallback(every_n_steps=2)
    fit(tmp_path, max_steps=5, callback=callback)
    assert titles == ["expert load, step 2 (mean over 2 batches)", "expert load, step 4 (mean "
                      "over 2 batches)", "expert load, step 5 (mean over 1 batch)"]  # fmt: skip
    plots = tmp_path / "plots"
    names = {p.name for p in plots.iterdir()}
    assert {f"expert_load_step{n}.png" for n in (2, 4, 5)} <= names
    assert {"expert_load_latest.png", "expert_load_history.npz"} <= names
    saved = np.load(plots / "expert_load_history.npz")
    assert saved["steps"].tolist() == [2, 4, 5]
    assert saved["layers"].tolist() == [0, 2]
    assert saved["load"].shape == (3, 2, E)
    # The batch ending at global_step 2 was computed at global_step 1 (and so on).
    for i, window in enumerate([range(0, 2), range(2, 4), range(4, 5)]):
        np.testing.assert_allclose(saved["load"][i], expected_window(window), rtol=1e-6)
    np.testing.assert_allclose(callback.history_array(), saved["load"])
    assert (plots / "expert_load_latest.png").read_bytes() == (
        plots / "expert_load_step5.png"
    ).read_bytes()


def test_windows_are_optimizer_steps_under_gradient_accumulation(tmp_path: Path) -> None:
    # a heatmap of step 0 came after the first micro-batch, before any step, and the windows
    # then held 1, 3, 4, 4 micro-batches
    callback = ExpertLoadCallback(every_n_steps=2)
    fit(tmp_path, max_steps=4, callback=callback, accumulate=2)
    assert callback.history_steps == [2, 4]
    names = {p.name for p in (tmp_path / "plots").iterdir()}
    assert "expert_load_step0.png" not in names
    steps = [0, 0, 1, 1]  # the global step of each micro-batch of a window: 2 steps × 2
    for i, window in enumerate([steps, [s + 2 for s in steps]]):
        np.testing.assert_allclose(callback.history_array()[i], expected_window(window), rtol=1e-6)


def test_no_files_without_moe_stats(tmp_path: Path) -> None:
    fit(tmp_path, max_steps=3, callback=ExpertLoadCallback(every_n_steps=1), stats=False)
    assert not (tmp_path / "plots").exists()


def test_logs_each_plot_to_an_offline_wandb_run(tmp_path: Path, monkeypatch) -> None:
    """A real Trainer with the offline W&B logger: one image row per window, the very PNG the
    callback wrote to its plot folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), project="expert-load", offline=True)
    plots = tmp_path / "custom"
    fit(tmp_path, max_steps=4, callback=ExpertLoadCallback(2, str(plots)), logger=logger)
    logger.experiment.finish()
    rows = [row for row in history(tmp_path) if "moe/expert_load" in row]
    assert [row["_step"] for row in rows] == [0, 1]  # W&B's own step: one row per window
    files = run_log(tmp_path).parent / "files"
    for row, step in zip(rows, (2, 4), strict=True):
        image = row["moe/expert_load"]
        assert image["_type"] == "images/separated" and image["count"] == 1
        logged = (files / image["filenames"][0]).read_bytes()
        assert logged == (plots / f"expert_load_step{step}.png").read_bytes()


def test_plot_function_writes_png_with_nan_padding(tmp_path: Path) -> None:
    load = np.array([[0.5, 0.5, np.nan], [0.2, 0.3, 0.5]])
    path = plot_expert_load(load, tmp_path / "x" / "load.png", "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_config_instantiates_the_callback() -> None:
    from hydra.utils import instantiate

    cfg = OmegaConf.load(ROOT / "advarch" / "configs" / "callbacks" / "expert_load.yaml")
    callback = instantiate(cfg.expert_load)
    assert isinstance(callback, ExpertLoadCallback) and callback.every_n_steps == 50


def test_invalid_every_n_steps_names_the_key() -> None:
    with pytest.raises(ValueError, match="callbacks.expert_load.every_n_steps=0"):
        ExpertLoadCallback(every_n_steps=0)
