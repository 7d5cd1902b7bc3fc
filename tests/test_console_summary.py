"""What a run prints and saves about itself: the config tree, and the closing summary of a task
stream (per-task test values as one table)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from advarch.console_summary import print_config_tree, print_summary, split_table_lines
from advarch.spec import DataSpec

STREAM = DataSpec(kind="lm", vocab_size=260, seq_len=32, task_names=("text", "net", "codecs"))
METRICS = {
    "val/loss": 2.0,
    "test/loss": 2.2,
    "test/bpb": 3.1,
    "test/task_0/loss": 2.1,
    "test/task_0/bpb": 3.0,
    "test/task_1/bpb": 3.4,
    "test/task_2/loss": 2.5,
    "test/task_2/bpb": 2.9,
    "train/loss": 1.0,
}


def test_table_rows_are_metrics_and_columns_all_then_each_task() -> None:
    lines = split_table_lines(METRICS, "test", STREAM.task_names)
    assert lines[0].split() == ["test", "metrics", "all", "text", "net", "codecs"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert rows["bpb"].split()[1:] == ["3.1000", "3.0000", "3.4000", "2.9000"]
    # a value a task lacks leaves its cell empty, in its column
    loss = rows["loss"]
    assert loss.split()[1:] == ["2.2000", "2.1000", "2.5000"]
    assert loss.index("2.5000") == rows["bpb"].index("2.9000")
    header, loss = split_table_lines(METRICS, "val", STREAM.task_names)  # one task: no columns
    assert header.split() == ["val", "metrics", "all"] and loss.split() == ["loss", "2.0000"]
    assert len(header) == len(loss)  # right-aligned under its column


def test_multi_task_data_gets_a_column_per_task_name() -> None:
    spec = DataSpec(kind="regression", num_features=8, task_names=("task_a", "task_b"))
    metrics = {"test/mse": 1.5, "test/task_a/mse": 1.0, "test/task_b/mse": 2.0}
    header, mse = split_table_lines(metrics, "test", spec.task_names)
    assert header.split()[2:] == ["all", "task_a", "task_b"]
    assert mse.split() == ["mse", "1.5000", "1.0000", "2.0000"]


@pytest.mark.parametrize("continual", [False, True])
def test_summary_of_a_stream_run(tmp_path: Path, capsys, continual: bool) -> None:
    if continual:  # a continual run shows its validation matrix too
        (tmp_path / "continual").mkdir()
        (tmp_path / "continual" / "bpb_matrix.csv").write_text("trained,text\ntext,3.0\n")
    print_summary(OmegaConf.create({}), STREAM, METRICS, tmp_path)
    out = capsys.readouterr().out
    assert "test metrics" in out and "test/loss = 2.2000" not in out  # the table has it
    assert ("bpb matrix" in out) is continual


def test_few_shot_summary_shows_every_test_metric_eval_prints(tmp_path: Path, capsys) -> None:
    # (it showed test/acc_ci95 but not test/raw_proto_acc_ci95, which eval.py printed)
    spec = DataSpec(kind="classification", num_features=64, num_classes=5)
    test = {"test/loss": 1.25, "test/acc": 0.2867, "test/acc_ci95": 0.0653,
            "test/raw_proto_acc": 0.3133, "test/raw_proto_acc_ci95": 0.118}  # fmt: skip
    print_summary(OmegaConf.create({}), spec, {"val/loss": 1.3, **test}, tmp_path)
    out = capsys.readouterr().out.splitlines()
    for row in split_table_lines(test, "test", spec.task_names)[1:]:  # eval.py's lines
        name, value = row.split()
        assert f"test/{name} = {value}" in out


def test_the_config_tree_shows_long_values_whole(tmp_path: Path, capsys) -> None:
    # a log file or a pipe is 80 columns, the saved tree was 120: both cropped a path with no
    # mark, and the run folder printed was not the run's (`…_32cbc` for `…_32cbc2`)
    folder = "/runs/" + "x" * 150 + "/2026-12-07_06-21-26_32cbc2"
    cfg = OmegaConf.create({"paths": {"output_dir": folder}, "seed": 0})
    print_config_tree(cfg, tmp_path / "config_tree.txt")
    printed = "".join(line.strip(" │") for line in capsys.readouterr().out.splitlines())
    assert folder in printed  # (wrapped on the console)
    assert f"output_dir: {folder}\n" in (tmp_path / "config_tree.txt").read_text()  # one line


def test_a_resumed_offline_run_names_every_part_of_its_id_in_order(tmp_path: Path) -> None:
    # new-user 37 F5: after kill -9 (which prints nothing) and ckpt_path=auto the one sync line
    # named the resumed part: pasted, it uploaded steps 100-300 only
    from advarch.tracking import sync_hint

    runs = tmp_path / "outputs" / "runs" / "moe-plain"
    killed = runs / "2026-12-07_10-53-03_33de7b" / "wandb" / "offline-run-20261207_105310-g5r7j6jx"
    other = runs / "2026-12-07_10-54-00_aaaaaa" / "wandb" / "offline-run-20261207_105402-zzzzzzzz"
    resumed = runs / "2026-12-07_10-54-56_8104e8" / "wandb" / "offline-run-20261207_105501-g5r7j6jx"
    for part in (killed, other, resumed):
        part.mkdir(parents=True)
    assert sync_hint(resumed.parents[1]) == (
        f"sync to W&B later: wandb sync --id g5r7j6jx {killed} {resumed}"
    )
    assert sync_hint(other.parents[1]) == f"sync to W&B later: wandb sync {other}"  # one part


def test_a_resumed_sweep_trial_names_its_part_in_the_earlier_sweep(tmp_path: Path) -> None:
    # new user 38 M2: a trial resumed by a rerun of its sweep with ckpt_path=auto is in the new
    # sweep's folder, its first part in the earlier sweep's: the line named the resumed part
    from advarch.tracking import sync_hint

    sweeps = tmp_path / "outputs" / "multiruns"
    first = sweeps / "2026-12-07_13-26-56_0dbf22" / "0" / "wandb" / "offline-run-20261207_132700-a7"
    other = sweeps / "2026-12-07_13-26-56_0dbf22" / "1" / "wandb" / "offline-run-20261207_132701-b8"
    again = sweeps / "2026-12-07_13-27-07_4531d5" / "0" / "wandb" / "offline-run-20261207_132710-a7"
    for part in (first, other, again):
        part.mkdir(parents=True)
    # (a folder linked into the sweeps holds the same parts: named once)
    (sweeps / "linked").symlink_to(first.parents[2], target_is_directory=True)
    assert sync_hint(again.parents[1]) == f"sync to W&B later: wandb sync --id a7 {first} {again}"


@pytest.mark.parametrize("weights", [None, [1.0, 2.0]])
def test_a_weighted_multitask_table_says_what_its_overall_loss_is(
    tmp_path: Path, capsys, weights: list[float] | None
) -> None:
    # (new user 40b: `loss` 1.3336 beside `mse` 1.3452 in the "all" column, equal in each task's)
    spec = DataSpec(kind="regression", num_features=8, task_names=("task_a", "task_b"))
    test = {"test/loss": 1.3336, "test/mse": 1.3452, "test/task_a/loss": 1.3802,
            "test/task_a/mse": 1.3802, "test/task_b/loss": 1.3102,
            "test/task_b/mse": 1.3102}  # fmt: skip
    cfg = OmegaConf.create({"strategy": {"task_weights": weights}})
    print_summary(cfg, spec, {"val/loss": 1.3, **test}, tmp_path)
    out = capsys.readouterr().out
    said = ("loss (all) = the tasks' losses weighted by strategy.task_weights=[1.0, 2.0] (the "
            "objective trained); other rows weigh every example alike")  # fmt: skip
    assert (said in out) is (weights is not None), out
