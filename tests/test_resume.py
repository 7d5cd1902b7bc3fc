"""Fault injection through the real CLI: kill -9 and SIGTERM a continual run, resume it with
`ckpt_path=auto`, and get exactly the uninterrupted run's accuracy matrix, weights and metrics.

The stream: EWC on 3 permuted-digit tasks × 2 epochs × 4 batches (24 steps, tiny model),
checkpointed at every epoch end as the shipped continual experiments are.
"""

from __future__ import annotations

import csv
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from advarch.pipeline import instantiate_dict
from tests.cli import Project, run_python
from tests.conftest import ROOT

EXPERIMENTS = sorted(p.stem for p in (ROOT / "advarch" / "configs" / "experiment").glob("*.yaml"))


STREAM = [
    "strategy=ewc",
    "model=transformer",
    "model.dropout=0.1",  # (drawn from the global random state: the checkpoints keep it)
    "debug=tiny",
    "data=permuted_digits",
    "data.num_tasks=3",
    "data.epochs_per_task=2",
    "data.batch_size=32",
    "trainer.max_steps=-1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.val_check_interval=1.0",
    "trainer.check_val_every_n_epoch=1",
    "trainer.deterministic=true",
    "strategy.fisher_samples=32",
    "strategy.fisher_chunk_size=16",
    "callbacks.rich_progress_bar=null",
    "callbacks.expert_load=null",
    "callbacks.model_checkpoint.filename='epoch-{epoch}'",
    "callbacks.model_checkpoint.every_n_train_steps=null",
    "callbacks.model_checkpoint.every_n_epochs=1",
    "callbacks.model_checkpoint.save_on_train_epoch_end=true",
    "callbacks.model_checkpoint.monitor=null",
    "logger=csv",
]
STEPS_PER_TASK = 8  # 2 epochs × 4 batches: task boundaries after steps 8 and 16


def train(root: Path, name: str, folder: str, *extra: str) -> subprocess.CompletedProcess:
    return run_python(
        [
            "train.py",
            *STREAM,
            f"run_name={name}",
            f"paths.root_dir={root}",
            f"paths.cache_dir={root}/cache",
            f"hydra.run.dir={root}/outputs/runs/{name}/{folder}",
            *extra,
        ],
        cwd=ROOT,
        warm=False,  # (each run in a process of its own hash seed, as a resumed run is)
    )


def interrupt_at(step: int, signum: int) -> list[str]:
    return [
        "+callbacks.interrupt._target_=tests.helpers.SignalAtStep",
        f"+callbacks.interrupt.step={step}",
        f"+callbacks.interrupt.signum={int(signum)}",
    ]


def outcome(run_dir: Path) -> dict:
    """Final weights, accuracy matrix, EWC state and the last value of every logged metric."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    final = {k: v for r in rows for k, v in r.items() if v and k.split("/")[0] in ("cl", "test")}
    timing = ("train/tokens_per_s", "train/samples_per_s")
    return {
        "curves": [{k: v for k, v in r.items() if k not in timing} for r in rows],
        "step": ckpt["global_step"],
        "state": ckpt["state_dict"],
        "R": ckpt["continual"]["accuracy_matrix"],
        "fisher": ckpt["ewc"]["importances"],
        "metrics": final,
    }


def assert_same(resumed: dict, full: dict) -> None:
    assert resumed["step"] == full["step"]
    assert torch.equal(resumed["R"], full["R"]), (resumed["R"], full["R"])
    assert resumed["metrics"] == full["metrics"]
    assert resumed["curves"] == full["curves"]  # every row from step 0: the report's curves
    assert resumed["state"].keys() == full["state"].keys()
    assert all(torch.equal(resumed["state"][k], full["state"][k]) for k in full["state"])
    for f, g in zip(resumed["fisher"], full["fisher"], strict=True):
        assert all(torch.equal(f[n], g[n]) for n in g)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_writes_last_ckpt_periodically(make_cfg, experiment: str) -> None:
    """Lightning 2.6 writes last.ckpt only when a top-k save happens (save_top_k != 0); task
    streams must save after every epoch's hooks, so every task boundary is in a checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    cfg = make_cfg([f"experiment={experiment}"])
    callbacks = instantiate_dict(cfg.callbacks, "callbacks")
    (ckpt,) = [c for c in callbacks if isinstance(c, ModelCheckpoint)]
    assert ckpt.save_last and ckpt.save_top_k != 0
    assert ckpt._every_n_train_steps > 0 or ckpt._every_n_epochs >= 1
    if "epochs_per_task" in cfg.data:  # a task stream
        assert ckpt._every_n_epochs == 1 and ckpt._save_on_train_epoch_end


@pytest.mark.slow
def test_sigterm_and_kill_9_mid_task_and_at_a_boundary_resume_exactly(tmp_path: Path) -> None:
    """One chain of interruptions, each resumed with `ckpt_path=auto`, ends exactly where the
    uninterrupted run does: SIGTERM at step 6 (saved at that step, exit 143); kill -9 at the
    end of task 0 before its boundary work (R row, Fisher, checkpoint); kill -9 at a random
    step inside task 1, with the newest last.ckpt then truncated (auto falls back)."""
    full = train(tmp_path / "reference", "full", "run")
    assert full.returncode == 0, full.stderr[-3000:]
    runs = tmp_path / "outputs" / "runs" / "stream"

    stopped = train(tmp_path, "stream", "1-sigterm", *interrupt_at(6, signal.SIGTERM))
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    last = runs / "1-sigterm" / "checkpoints" / "last.ckpt"
    assert f"SIGTERM received: saved {last} at step 6" in stopped.stdout
    assert "Traceback" not in stopped.stderr
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6

    boundary = ["ckpt_path=auto", *interrupt_at(STEPS_PER_TASK, signal.SIGKILL)]
    killed = train(tmp_path, "stream", "2-boundary", *boundary)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert f"ckpt_path=auto: resuming {last} (step 6, epoch 1, task 0 (0 finished))" in (
        killed.stdout + killed.stderr
    )

    step = random.Random(12).choice([s for s in range(9, 16) if s % 4])  # inside task 1
    killed = train(tmp_path, "stream", "3-mid-task", "ckpt_path=auto", *interrupt_at(step, 9))
    assert killed.returncode == -signal.SIGKILL, (step, killed.stderr[-2000:])
    checkpoints = runs / "3-mid-task" / "checkpoints"
    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == step - step % 4 and saved["continual"]["task"] == 1
    (checkpoints / "last.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes()[:1000])

    resumed = train(tmp_path, "stream", "4-resumed", "ckpt_path=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr
    assert f"skipping {checkpoints / 'last.ckpt'} is truncated or not a checkpoint" in log
    fallback = checkpoints / f"epoch-{saved['epoch']}.ckpt"
    where = f"(step {saved['global_step']}, epoch {saved['epoch']}, task 1"
    assert f"resuming {fallback} {where}" in log
    assert_same(outcome(runs / "4-resumed"), outcome(tmp_path / "reference/outputs/runs/full/run"))


def test_a_folder_or_checkpoint_in_use_by_a_running_run_is_refused(project: Project) -> None:
    # two runs in one folder interleaved their logs, wrote each other's checkpoints and died on
    # the CSV logger; ckpt_path=auto resumed a run still training (one W&B run for both)
    first = subprocess.Popen(  # noqa: S603
        ["python", "train.py", "debug=tiny", "run_name=busy", "trainer.max_steps=100000",
         "trainer.val_check_interval=2", "callbacks.model_checkpoint.every_n_train_steps=2",
         "+callbacks.idle._target_=tests.helpers.IdleSteps", "+callbacks.idle.seconds=0.5"],
        cwd=project.root, env=project.env(warm=False), stdout=subprocess.DEVNULL,  # (its pid)
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        pattern = "outputs/runs/busy/*/checkpoints/last.ckpt"
        while not list(project.root.glob(pattern)) and time.monotonic() < deadline:
            time.sleep(0.1)
        (last,) = project.root.glob(pattern)
        folder = last.parent.parent
        before = {p.name: p.read_bytes() for p in folder.glob(".hydra/*")}
        same = project.run("debug=tiny", "model=ssm", f"hydra.run.dir={folder}")
        assert same.rc == 1 and same.stderr.strip() == (
            f"error: {folder} is in use by another run (process {first.pid}): give this one its "
            "own folder (another hydra.run.dir, or leave it out)"
        )
        # the running run's recorded config and log untouched (they were rewritten or deleted)
        assert {p.name: p.read_bytes() for p in folder.glob(".hydra/*")} == before
        # fault pass 42c: a resume typed into it was refused after Hydra rewrote its .hydra/
        typed = project.run("debug=tiny", "seed=77", f"hydra.run.dir={folder}", "ckpt_path=auto")
        assert typed.rc == 1 and typed.stderr.strip().startswith(f"error: {folder} is in use")
        assert {p.name: p.read_bytes() for p in folder.glob(".hydra/*")} == before
        assert (folder / "train.log").is_file() and (folder / "config_tree.txt").is_file()
        auto = project.run("debug=tiny", "run_name=busy", "ckpt_path=auto")
        assert auto.rc == 1 and "Traceback" not in auto.stderr
        assert "belongs to a run still training" in auto.stderr
        assert f"(process {first.pid}): stop it before resuming it" in auto.stderr
    finally:
        first.kill()
        first.communicate(timeout=60)
    resumed = project.run("debug=tiny", "run_name=busy", "ckpt_path=auto", "trainer.max_steps=4")
    resumed.check()  # killed with -9: its folder is free again
