"""Multi-process training with plain DDP (subprocess launcher) and the default W&B logger:
one summary, one W&B run, the metrics of the single-process run with the same global batch,
and a resume mid-epoch that continues exactly."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from advarch.train import run
from tests.cli import run_python
from tests.conftest import ROOT

pytestmark = pytest.mark.slow

LM = [
    "debug=tiny",
    "model=transformer",  # dense: an MoE's balance loss and capacity depend on the local batch
    "data.max_documents=40",
    "data.seq_len=64",
    "data.max_eval_sequences=7",  # 4 + 3 on two processes: none evaluated twice
    "trainer.accelerator=cpu",
    "trainer.deterministic=true",
    "callbacks.rich_progress_bar=null",
    "logger=wandb",  # the default logger (debug=tiny alone would switch to CSV)
]


def train(tmp: Path, name: str, *extra: str) -> subprocess.CompletedProcess:
    return run_python(
        ["train.py", *LM, f"hydra.run.dir={tmp}/{name}", f"paths.cache_dir={tmp}/cache", *extra],
        cwd=ROOT,
        timeout=900,
        warm=False,  # (each run in a process of its own hash seed, as a resumed run is)
    )


def last_values(run_dir: Path) -> dict[str, float]:
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    return {
        k: float(v) for r in rows for k, v in r.items() if v and k.split("/")[0] in ("val", "test")
    }


STEP_CHECKPOINTS = [  # a ranked checkpoint at step 2, mid-way through debug=tiny's 3-batch epoch
    "trainer.val_check_interval=2",
    "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.model_checkpoint.save_top_k=-1",
    "callbacks.model_checkpoint.filename='step-{step}'",
]


def train_losses(run_dir: Path) -> list[float]:
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r["train/loss"]]


def epoch_values(run_dir: Path) -> dict[str, list[float]]:
    """Every training epoch's aggregate (`train/<metric>_epoch`), epoch by epoch."""
    with (run_dir / "csv" / "version_0" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    keys = [k for k in rows[0] if k.startswith("train/") and k.endswith("_epoch")]
    return {k: [float(r[k]) for r in rows if r[k]] for k in keys}


def test_two_cpu_processes_equal_one_process_and_resume_exactly(tmp_path: Path, make_cfg) -> None:
    # the single-process reference trains in this process (CSV alone: W&B logs no metric of it)
    reference = [o for o in LM if o != "logger=wandb"]
    single = make_cfg([*reference, "data.batch_size=8", "trainer.devices=1", *STEP_CHECKPOINTS],
                      output_dir=tmp_path / "single")  # fmt: skip
    run(single)
    ddp = train(tmp_path, "ddp", "data.batch_size=4", "trainer.devices=2", *STEP_CHECKPOINTS)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("advarch run summary") == 1  # rank 0 only
    assert "Traceback" not in ddp.stderr
    assert (tmp_path / "ddp" / "wandb_id.txt").read_text().strip()
    assert len(list((tmp_path / "ddp" / "wandb").glob("offline-run-*"))) == 1
    assert (tmp_path / "ddp" / "checkpoints" / "last.ckpt").is_file()
    one, two = last_values(Path(single.paths.output_dir)), last_values(tmp_path / "ddp")
    assert one.keys() == two.keys() and "val/loss" in one and "test/loss" in one
    print("single:", one, "\nddp:   ", two)
    for key in one:  # the same batches (Lightning's own sampler reshuffled them: within 2e-3);
        # only the gradients' summation order differs; an accuracy may flip an argmax tie
        tolerance = {"abs": 2 / 512} if key.endswith("acc") else {"rel": 1e-4}
        assert two[key] == pytest.approx(one[key], **tolerance), key

    # resumed mid-epoch: every process skips what all of them trained (it crashed, and before
    # that the shortened epoch was reshuffled into other batches)
    step_2 = tmp_path / "ddp" / "checkpoints" / "step-2.ckpt"
    resumed = train(tmp_path, "resumed", "data.batch_size=4", "trainer.devices=2",
                    *STEP_CHECKPOINTS, f"ckpt_path={step_2}")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert train_losses(tmp_path / "resumed") == train_losses(tmp_path / "ddp")  # (0-1 carried)
    assert last_values(tmp_path / "resumed") == two
    # the resumed epoch's averages count every process's batches before the stop once (each
    # process loaded rank 0's own running sums: its batches twice, the other's never)
    uninterrupted, continued = epoch_values(tmp_path / "ddp"), epoch_values(tmp_path / "resumed")
    assert continued.keys() == uninterrupted.keys() and "train/loss_epoch" in continued
    for key, values in uninterrupted.items():  # (float32 sums in another order)
        assert continued[key] == pytest.approx(values, rel=1e-5), key

    # on another number of processes the skip and the epoch's length would not match: refused
    alone = train(tmp_path, "alone", "data.batch_size=4", "trainer.devices=1",
                  *STEP_CHECKPOINTS, f"ckpt_path={step_2}")  # fmt: skip
    assert alone.returncode == 1 and "Traceback" not in alone.stderr, alone.stderr[-3000:]
    refusal = alone.stderr.strip().splitlines()[-1]
    assert refusal.endswith(
        "stopped in the middle of an epoch, trained by 2 process(es); this run has 1: resume "
        "it with as many (trainer.devices × trainer.num_nodes), or from a checkpoint of an "
        "epoch's end"
    ), refusal
