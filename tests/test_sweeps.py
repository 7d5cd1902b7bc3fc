"""Multirun sweeps and W&B runs as a user types them: `python train.py -m …` in a fresh folder.

Each command runs as a subprocess in its own working directory (the real run and sweep
folders, `${unique:}`, the default W&B offline logger); the only shared thing is the
tokenised-corpus cache, linked in as `outputs/cache`. Results are read back from the files a
user would open: `summary.md`/`summary.csv`, `result.json`, the offline W&B run log.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.wandb_offline import offline_run

pytestmark = pytest.mark.xdist_group("cli")


@pytest.fixture
def workdir(tmp_path: Path, cache_dir: Path) -> Path:
    """A fresh working folder whose `outputs/cache` is the session's corpus cache."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    (tmp_path / "outputs").mkdir()
    (tmp_path / "outputs" / "cache").symlink_to(cache_dir)
    return tmp_path


def train(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )


def sweep_dir(workdir: Path) -> Path:
    (found,) = (workdir / "outputs" / "multiruns").iterdir()
    return found


@pytest.mark.slow
def test_grid_sweep_with_a_failing_trial(workdir: Path) -> None:
    # num_heads=3 does not divide dim 32: those trials fail, the sweep goes on and exits 0
    out = train(
        workdir, "-m", "model.depth=1,2", "model.num_heads=2,3", "debug=tiny", "logger=wandb"
    )
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert "Traceback" not in log
    failures = [line for line in log.splitlines() if "failed: model.num_heads=3 must" in line]
    assert len(failures) == 2 and all("trial model.depth=" in line for line in failures)

    folder = sweep_dir(workdir)
    with (folder / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["model.num_heads"] for r in rows] == ["2", "2", "3", "3"]  # best first, fails last
    ok = rows[:2]
    assert float(ok[0]["val/loss"]) <= float(ok[1]["val/loss"])
    assert all(r["status"].startswith("failed: model.num_heads=3 must divide") for r in rows[2:])
    assert (
        "| trial | model.depth | model.num_heads | val/loss | status |"
        in (folder / "summary.md").read_text()
    )

    assert all((folder / r["trial"] / "error.txt").is_file() for r in rows[2:])  # tracebacks

    runs = [offline_run(folder / r["trial"]) for r in ok]
    assert {r["job_type"] for r in runs} == {"sweep"}
    assert len({r["group"] for r in runs}) == 1 and folder.name in runs[0]["group"]
    names = {r["name"] for r in runs}  # readable and unique: run name + the trial's overrides
    assert names == {
        f"debug-tiny-moe-plain model.depth={r['model.depth']} model.num_heads=2" for r in ok
    }


@pytest.mark.slow
def test_sweep_where_every_trial_fails_exits_non_zero(workdir: Path) -> None:
    out = train(workdir, "-m", "model.num_heads=3,5", "debug=tiny")
    assert out.returncode != 0
    assert "Traceback" not in out.stdout + out.stderr
    assert "error: all 2 trials failed" in out.stderr


@pytest.mark.slow
def test_optuna_sweep_as_typed(workdir: Path) -> None:
    out = train(workdir, "-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", "debug=tiny")
    assert out.returncode == 0, out.stderr[-3000:]
    folder = sweep_dir(workdir)
    with (folder / "summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    assert {"strategy.lr", "strategy.weight_decay", "model.dim"} <= set(rows[0])
    assert (folder / "optimization_results.yaml").is_file()


@pytest.mark.slow
def test_wandb_run_carries_config_identity_and_summary(workdir: Path) -> None:
    out = train(workdir, "debug=tiny", "logger=wandb", "tags=[baseline]", "seed=7")
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = (workdir / "outputs" / "runs" / "debug-tiny-moe-plain").iterdir()
    run = offline_run(run_dir)
    config = run["config"]
    assert config["model"]["dim"] == 32 and config["model"]["moe"]["num_experts"] == 8
    assert config["seed"] == 7 and config["strategy"]["lr"] > 0 and config["data"]["seq_len"]
    assert config["params"]["total"] >= config["params"]["trainable"] > 0
    assert len(config["git"]["commit"]) == 40 and isinstance(config["git"]["dirty"], bool)
    assert len(config["data_fingerprint"]) == 12
    assert run["name"] == "debug-tiny-moe-plain" and run["group"] == "debug-tiny-moe-plain"
    assert run["job_type"] == "train"
    assert run["tags"] == ["baseline", "model:moe", "strategy:plain", "data:text"]
    assert set(run["summary"]["val/loss"]) == {"min"}  # the best value, not the last
    assert "test/bpb" in run["summary"]

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    evaluated = subprocess.run(
        [sys.executable, str(ROOT / "eval.py"), f"ckpt_path={ckpt}"],
        cwd=workdir, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    (eval_dir,) = (workdir / "outputs" / "runs" / "eval").iterdir()
    eval_run = offline_run(eval_dir)
    assert eval_run["job_type"] == "eval" and eval_run["group"] == run["group"]
    assert eval_run["config"]["model"] == config["model"] and "test/bpb" in eval_run["summary"]
