"""Reading run and sweep folders: sparse CSV logs across resumed versions, task matrices,
task boundaries, saved overrides and settings."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from advarch.console_summary import SUMMARY_FILE
from advarch.continual_metrics import save_accuracy_matrix_csv
from advarch.reports.run_folders import (
    Metrics,
    is_run,
    read_accuracy_matrix,
    run_overrides,
    run_setting,
    sweep_runs,
    task_boundaries,
)

COLUMNS = ["epoch", "step", "train/loss", "train/acc_epoch", "val/loss", "val/acc", "lr-AdamW",
           "moe/layer0/entropy", "test/acc", "test/acc_ci95", "test/raw_proto_acc",
           "test/raw_proto_acc_ci95"]  # fmt: skip


def write_csv(run: Path, rows: list[dict], version: int = 0) -> None:
    path = run / "csv" / f"version_{version}" / "metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def synthetic_run(run: Path, final_val: float = 1.0, overrides: list[str] | None = None) -> Path:
    """A finished run's folder, its CSV log shaped like Lightning's CSVLogger's (sparse rows)."""
    rows = []
    for step in range(10):
        rows.append({"epoch": 0, "step": step, "train/loss": 3.0 - 0.2 * step, "lr-AdamW": 1e-3,
                     "moe/layer0/entropy": 2.0 - 0.05 * step})  # fmt: skip
        if step % 5 == 4:
            rows.append({"epoch": 0, "step": step, "val/loss": final_val + (9 - step) * 0.1,
                         "val/acc": 0.5 + 0.04 * step,
                         "train/acc_epoch": 0.4 + 0.04 * step})  # fmt: skip
    rows.append({"epoch": 0, "step": 10, "test/acc": 0.8, "test/acc_ci95": 0.05,
                 "test/raw_proto_acc": 0.7, "test/raw_proto_acc_ci95": 0.06})  # fmt: skip
    write_csv(run, rows)
    hydra = run / ".hydra"
    hydra.mkdir(parents=True, exist_ok=True)
    (hydra / "overrides.yaml").write_text(yaml.safe_dump(overrides or ["debug=tiny"]))
    (hydra / "config.yaml").write_text(yaml.safe_dump({"optimized_metric": "val/loss"}))
    (run / SUMMARY_FILE).write_text(json.dumps({"metrics": {}}))  # a run that finished
    return run


def test_metrics_reads_sparse_rows_and_versions(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path / "run")
    write_csv(run, [{"epoch": 1, "step": 12, "train/loss": 0.5}], version=1)  # a resumed run
    m = Metrics.read(run)
    steps, values = m.series("val/loss")
    assert steps.tolist() == [4, 9] and values.tolist() == pytest.approx([1.5, 1.0])
    final = m.final()
    assert final["train/loss"] == 0.5 and final["val/acc"] == pytest.approx(0.86)
    assert "step" not in final and final["test/acc"] == 0.8
    assert m.matching(r"(train|val)/loss") == ["train/loss", "val/loss"]


def test_task_boundaries_are_the_first_steps_of_later_tasks(tmp_path: Path) -> None:
    rows = [{"epoch": e, "step": 3 * e + i, "train/loss": 1.0} for e in range(4) for i in range(3)]
    rows.append({"epoch": 4, "step": 12, "test/acc": 1.0})  # the final test: no task starts
    write_csv(tmp_path, rows)
    metrics = Metrics.read(tmp_path)
    assert task_boundaries(metrics, epochs_per_task=2) == [6.0]  # epoch 2 starts task 1
    assert task_boundaries(metrics, epochs_per_task=1) == [3.0, 6.0, 9.0]
    assert task_boundaries(metrics, epochs_per_task=None) == []


def test_matrix_settings_and_sweep_jobs(tmp_path: Path) -> None:
    R = np.array([[0.9, 0.1], [np.nan, np.nan]])
    save_accuracy_matrix_csv(R, tmp_path / "R.csv", ["a", "b"])
    names, read = read_accuracy_matrix(tmp_path / "R.csv")
    assert names == ["a", "b"]
    np.testing.assert_array_equal(read, R)

    run = synthetic_run(tmp_path / "sweep" / "10", overrides=["model.dim=8"])
    (run / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"sweeper": {"direction": "maximize"}}})
    )
    assert run_overrides(run) == ["model.dim=8"] and run_overrides(tmp_path) == []
    assert run_setting(run, "optimized_metric") == "val/loss"  # from config.yaml
    assert run_setting(run, "hydra.sweeper.direction") == "maximize"  # from hydra.yaml
    assert run_setting(run, "data.epochs_per_task", "1") == "1"
    synthetic_run(tmp_path / "sweep" / "9")
    (tmp_path / "sweep" / "notes").mkdir()
    assert [p.name for p in sweep_runs(tmp_path / "sweep")] == ["9", "10"]
    assert is_run(run) and not is_run(tmp_path / "sweep")


def test_a_trial_a_signal_stopped_is_not_a_failed_one(tmp_path: Path) -> None:
    # its result.json records where it saved: the sweep report counted it as failed and
    # report.py pointed at an error.txt never written
    from advarch.reports.run_folders import trial_error
    from advarch.sweeps import write_result

    stopped, failed = tmp_path / "0", tmp_path / "1"
    write_result(stopped, ["model.depth=1"], "val/loss", None, {}, "SIGTERM at step 4: saved x",
                 status="interrupted")  # fmt: skip
    write_result(failed, ["model.depth=2"], "val/loss", None, {}, "model.dim must be even")
    assert trial_error(stopped) is None
    assert trial_error(failed) == "model.dim must be even"
