"""Shared fixtures: Hydra-composed configs in a tmp_path, a small cached text corpus, the command
line in a temporary project copy, and the few checkpoints that script and eval tests share."""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from filelock import FileLock
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

import advarch.config.resolvers  # noqa: F401
from advarch.config.compose import compose_run
from advarch.pipeline import build_all
from tests.cli import Project  # (sets W&B and Hugging Face offline)

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

# A small slice of the embedded corpus, shared by every test through one cache folder.
SMALL_TEXT = [
    "data.max_documents=40",
    "data.seq_len=64",
    "data.batch_size=4",
    "data.max_eval_sequences=8",
]
# The one tiny-size override set: any sequence model on the small corpus, in seconds.
TINY = ["debug=tiny", *SMALL_TEXT]


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


def final_module(cfg: DictConfig) -> L.LightningModule:
    """The strategy of a finished in-process run rebuilt from its config, with its last
    checkpoint's weights, in eval mode: what its final metrics were computed with."""
    _, _, module = build_all(cfg)
    state = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    module.load_state_dict(state["state_dict"])
    return module.eval()


def first_batches(cfg: DictConfig, split: str, count: int) -> list[Any]:
    """The first `count` batches of the run's `split` (val or test), drawn again from its config."""
    datamodule, _, _ = build_all(cfg)
    datamodule.setup("validate" if split == "val" else split)
    return list(itertools.islice(getattr(datamodule, f"{split}_dataloader")(), count))


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path):
    """`make_cfg([...overrides])` → a composed training config writing into tmp_path."""

    def _make(
        overrides: list[str], config_name: str = "train", output_dir: Path | None = None
    ) -> DictConfig:
        return compose_config(overrides, output_dir or tmp_path, cache_dir, config_name)

    yield _make
    GlobalHydra.instance().clear()


@pytest.fixture
def project(tmp_path: Path, cache_dir: Path) -> Project:
    """A fresh clone's layout in tmp_path for running `python train.py ...` as a user does."""
    return Project(tmp_path / "project", cache_dir)


@dataclass(frozen=True)
class TrainedRun:
    """A run made through the command line: its folder and final checkpoint."""

    run_dir: Path

    @property
    def ckpt(self) -> Path:
        return self.run_dir / "checkpoints" / "last.ckpt"


# Session checkpoints: tiny MoE LMs on the small corpus with 6 test batches, of which
# debug=tiny's limit_test_batches=2 tests only the first two (eval.py must do the same).
# logger=wandb: a debug run logs CSV only unless asked, and these carry a W&B run on resume
# (tests/test_sweeps.py reads the W&B record of lm_seed1, test_readme's eval.py line lm's).
SESSION_LM = ["debug=tiny", *SMALL_TEXT[:-1], "data.max_eval_sequences=24", "logger=wandb",
              "tags=[baseline]"]  # fmt: skip
SESSION_RUNS = {"lm": [*SESSION_LM], "lm_seed1": [*SESSION_LM, "seed=1"]}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainedRun]:
    """{name: run} of SESSION_RUNS trained once per test session through `python train.py`.

    Every xdist worker shares them: the first trains under a file lock, the others wait and
    read the recorded run folders.
    """
    base = tmp_path_factory.getbasetemp()  # xdist: <session>/popen-gwN; else the session's own
    shared = (base.parent if "PYTEST_XDIST_WORKER" in os.environ else base) / "cli-session"
    shared.mkdir(exist_ok=True)
    record = shared / "runs.json"
    with FileLock(str(shared / "lock")):
        if not record.is_file():
            proj = Project(shared / "project", shared / "cache")
            runs = {
                name: str(proj.run(*args).check().run_dir) for name, args in SESSION_RUNS.items()
            }
            record.write_text(json.dumps(runs))
    return {name: TrainedRun(Path(d)) for name, d in json.loads(record.read_text()).items()}
