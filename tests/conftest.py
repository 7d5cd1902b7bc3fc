"""Shared fixtures: Hydra-composed configs in a tmp_path, a small cached text corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import advarch.config.resolvers  # noqa: F401
from advarch.config.compose import compose_run

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter (read at its import)
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(1)

# A small slice of the embedded corpus, shared by every test through one cache folder.
SMALL_TEXT = [
    "data.max_documents=40",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.max_eval_sequences=8",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    return tmp_path_factory.getbasetemp().parent / f"advarch-cache-{worker}"


def compose_config(
    overrides: list[str], output_dir: Path, cache: Path, config_name: str = "train"
) -> DictConfig:
    """Compose like the CLI does, with outputs in `output_dir` and the shared test cache."""
    if config_name == "train" and not any(o.lstrip("+~").startswith("logger=") for o in overrides):
        overrides = [*overrides, "logger=csv"]  # W&B (the CLI default) only where a test asks
    cfg = compose_run(overrides, output_dir / "run", config_name, root_dir=output_dir)
    with open_dict(cfg):
        cfg.paths.cache_dir = str(cache)
        if "data" in cfg and cfg.data is not None and "cache_dir" in cfg.data:
            cfg.data.cache_dir = str(cache)
    return cfg


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path):
    """`make_cfg([...overrides])` → a composed training config writing into tmp_path."""

    def _make(
        overrides: list[str], config_name: str = "train", output_dir: Path | None = None
    ) -> DictConfig:
        return compose_config(overrides, output_dir or tmp_path, cache_dir, config_name)

    yield _make
    GlobalHydra.instance().clear()
