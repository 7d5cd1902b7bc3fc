"""Markdown reports of runs and sweeps from synthetic run folders, one real tiny run, and the
script."""

from __future__ import annotations

import json
import re
import runpy
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from advarch.callbacks.signals import Interrupted
from advarch.console_summary import SUMMARY_FILE, save_summary
from advarch.continual_metrics import save_accuracy_matrix_csv
from advarch.reports.markdown import best_run, write_report
from advarch.spec import DataSpec
from tests.conftest import ROOT, SMALL_TEXT, TINY
from tests.reports.test_figures import assert_png
from tests.reports.test_run_folders import synthetic_run, write_csv


def test_run_report_has_every_section(tmp_path: Path, monkeypatch) -> None:
    import advarch.reports.figures as figures

    run = synthetic_run(tmp_path / "run")
    config = {"optimized_metric": "val/loss", "strategy": {"adaptation": "none"}}
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))  # strategy=fewshot's
    steps, experts = np.array([5, 10, 15]), 4
    load = np.full((3, 2, experts), 0.25)
    load[:, 1] = [0.7, 0.1, 0.1, 0.1]  # layer 2 collapses onto expert 0
    (run / "plots").mkdir()
    np.savez(run / "plots" / "expert_load_history.npz", steps=steps, load=load, layers=[0, 2])
    R = np.array([[0.9, 0.1, 0.1], [0.6, 0.95, 0.2], [np.nan] * 3])  # task 3 not finished
    save_accuracy_matrix_csv(R, run / "continual" / "accuracy_matrix.csv", ["t0", "t1", "t2"])

    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    md = write_report(run).read_text()
    out = run / "report"
    for name in ("learning_curves", "expert_load_history", "expert_load_final",
                 "accuracy_matrix", "fewshot_accuracy"):  # fmt: skip
        assert_png(out / f"{name}.png")
        assert f"]({name}.png)" in md
    assert "| val/loss | 1.000 |" in md and "| test/acc | 0.8000 |" in md
    assert "layer 2 0.700/0.100" in md
    # ACC over the 2 finished tasks = (0.6 + 0.95) / 2; BWT = 0.6 − 0.9
    assert "| 2 | 0.7750 | -0.3000 | 0.3000 |" in md
    assert (
        "| test/acc | 0.8000 | 0.05000 |" in md
        and "| test/raw_proto_acc | 0.7000 | 0.06000 |" in md
    )
    # the few-shot bars name what ran: ProtoNet, not "adapted" (adaptation=none adapts nothing)
    (bars,) = [ax for fig in drawn for ax in fig.axes if ax.get_title().startswith("few-shot")]
    names = [t.get_text() for t in bars.get_xticklabels()]
    assert names == ["val ProtoNet", "test ProtoNet", "test raw prototypes"]


def test_final_values_are_the_run_summarys_where_it_has_them(tmp_path: Path) -> None:
    # the CSV's last throughput row is one logging window (the run-long figure is not in the
    # CSV); summary.json holds what the run's console summary printed
    run = synthetic_run(tmp_path / "run")
    write_csv(run, [{"epoch": 0, "step": 10, "test/acc": 0.3}], version=1)  # the CSV's last
    summary = {"metrics": {"train/tokens_per_s": 23836.0, "test/mse": 0.25, "test/acc": 0.81},
               "unigram_bpb": None}  # fmt: skip
    (run / SUMMARY_FILE).write_text(json.dumps(summary))
    md = write_report(run).read_text()
    assert "| train/tokens_per_s | 23,836 |" in md and "| test/acc | 0.8100 |" in md
    assert "| test mean squared error | 0.2500 |" in md


def test_bits_per_byte_matrix_of_a_text_domain_stream(tmp_path: Path) -> None:
    run = synthetic_run(tmp_path / "run")
    B = np.array([[3.0, 3.5], [3.4, 2.8]])  # domain 0 rises from 3.0 to 3.4: forgetting 0.4
    save_accuracy_matrix_csv(B, run / "continual" / "bpb_matrix.csv", ["text", "net"])
    md = write_report(run).read_text()
    assert_png(run / "report" / "bpb_matrix.png")
    assert "| tasks finished | BPB | BWT | forgetting |" in md
    assert "| 2 | 3.100 | -0.4000 | 0.4000 |" in md  # trailing zeros kept (3.900 beside 3.914)


def test_run_report_names_the_tasks_as_the_run_summary_does(tmp_path: Path, monkeypatch) -> None:
    # (the console's table said text, net; report.md listed test/task_0/…, test/task_1/…,
    # then test/text/…, a key the CSV and W&B do not have)
    # (and the learning curves' legend said val/task_0/bpb, val/task_1/bpb)
    import advarch.reports.figures as figures

    run = synthetic_run(tmp_path / "run")
    curves = run / "csv" / "version_1" / "metrics.csv"  # per-task validation, as a stream logs
    curves.parent.mkdir()
    curves.write_text("epoch,step,val/task_0/bpb,val/task_1/bpb\n0,11,3.1,3.3\n1,12,3.0,3.2\n")
    spec = DataSpec(kind="lm", vocab_size=260, task_names=("text", "net"))
    metrics = {"test/bpb": 3.1, "test/task_0/bpb": 3.0, "test/task_1/bpb": 3.2}
    save_summary(spec, metrics, run)
    drawn = []
    save = figures._save
    monkeypatch.setattr(figures, "_save", lambda fig, path: drawn.append(fig) or save(fig, path))
    md = write_report(run).read_text()
    assert "| test/task_0/bpb (text) | 3.000 |" in md and "| test/task_1/bpb (net) | 3.200 |" in md
    assert "| test/bpb | 3.100 |" in md
    assert md.index("(text)") < md.index("(net)")  # in the tasks' order
    title = "validation bits per byte per task"
    (panel,) = [ax for fig in drawn for ax in fig.axes if ax.get_title() == title]
    labels = [line.get_label() for line in panel.get_lines()]
    assert labels == ["val/task_0/bpb (text)", "val/task_1/bpb (net)"]


def test_run_report_lists_twelve_tasks_in_their_order(tmp_path: Path) -> None:
    # (sorted as text, task_10 and task_11 came before task_2)
    run = synthetic_run(tmp_path / "run")
    names = tuple(f"domain{j}" for j in range(12))
    spec = DataSpec(kind="lm", vocab_size=260, task_names=names)
    save_summary(spec, {f"test/task_{j}/bpb": 3.0 + j / 100 for j in range(12)}, run)
    md = write_report(run).read_text()
    places = [md.index(f"| test/task_{j}/bpb (domain{j}) |") for j in range(12)]
    assert places == sorted(places)


def make_sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    settings = [("1e-3", "32", 1.2), ("3e-3", "32", 0.8), ("1e-3", "64", 0.9)]
    for i, (lr, dim, val) in enumerate(settings):
        overrides = ["debug=tiny", f"optimizer.lr={lr}", f"model.dim={dim}"]
        synthetic_run(sweep / str(i), final_val=val, overrides=overrides)
    failed = sweep / "3" / ".hydra"  # a trial that crashed before logging anything
    failed.mkdir(parents=True)
    (failed / "overrides.yaml").write_text(
        yaml.safe_dump(["debug=tiny", "optimizer.lr=1e-2", "model.dim=48"])
    )
    (failed.parent / "result.json").write_text(json.dumps({"status": "failed", "error": ERROR}))
    return sweep


ERROR = "model.num_heads=3 must divide model.dim=48 (| in a message)"


def test_sweep_report_marks_the_best_run(tmp_path: Path) -> None:
    sweep = make_sweep(tmp_path)
    md = write_report(sweep).read_text()
    assert "Shared overrides: `debug=tiny`" in md
    assert "| run | model.dim | optimizer.lr | val/loss |" in md
    assert "| ★ 1 | 32 | 3e-3 | 0.8000 |" in md
    assert "4 runs (3 with metrics, 1 failed); best by `val/loss` (minimize): run **1**." in md
    escaped = ERROR.replace("|", "\\|")  # a cell's "|" would split the table's row
    assert f"| 3 | 48 | 1e-2 | failed | — | — | — | — | — | failed: {escaped} |" in md
    assert_png(sweep / "report" / "sweep_curves.png")
    assert (sweep / "0" / "report" / "report.md").is_file()
    links = re.findall(r"\[report\]\(([^)]+)\)", md)
    assert len(links) == 3  # the finished runs; each link opens from report.md's own folder
    assert all((sweep / "report" / link).resolve().is_file() for link in links), links

    (sweep / "optimization_results.yaml").write_text(
        yaml.safe_dump(
            {
                "name": "optuna",
                "best_params": {"optimizer.lr": 0.001, "model.dim": 64},
                "best_value": 0.9,
            }
        )  # fmt: skip
    )
    md = write_report(sweep).read_text()
    assert "| ★ 2 | 64 | 1e-3 | 0.9000 |" in md and "as reported by Optuna" in md


def test_report_of_a_run_stopped_early_says_so(make_cfg) -> None:
    from advarch.train import run

    stop = ["+callbacks.stop._target_=tests.helpers.SignalAtStep", "+callbacks.stop.step=4",
            f"+callbacks.stop.signum={int(signal.SIGTERM)}"]  # fmt: skip
    cfg = make_cfg([*TINY, *stop])  # debug=tiny: 6 steps
    with pytest.raises(Interrupted):
        run(cfg)
    md = write_report(cfg.paths.output_dir).read_text()
    note = "**Stopped at step 4 of 6 — not finished**: the values are the last it logged."
    assert md.count(note) == 2  # under the headline and the table of all final metrics
    assert md.index("## Headline") < md.index(note) < md.index("## All final metrics")


@pytest.mark.parametrize(
    ("max_steps", "note"),
    [
        (20, "stopped at step 11 of 20 — not finished"),
        (10, "trained its 10 steps but stopped before its final test — not finished"),
    ],
)
def test_sweep_report_names_an_unfinished_trial(tmp_path: Path, max_steps: int,
                                                note: str) -> None:  # fmt: skip
    sweep = make_sweep(tmp_path)
    (sweep / "0" / SUMMARY_FILE).unlink()  # no summary: it stopped after logging step 10
    config = {"trainer": {"max_steps": max_steps}}
    (sweep / "0" / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    md = write_report(sweep).read_text()
    assert f"[report](../0/report/report.md) · {note} |" in md
    assert md.count("not finished") == 1  # the other trials finished


@pytest.mark.parametrize(
    ("content", "what"),
    [
        (b"", "empty file"),
        (
            b"this is not,a metrics log\n1,2\n",
            "no `step` column: its first line is 'this is not,a metrics log'",
        ),
        (b"step,train/loss\n1,2.0\n2,1.5,0.3\n", "line 3 has more fields than the header"),
        (b"step,train/loss\nfoo,bar\n", "no numeric value in its `step` column"),
        (b"\xe9\x00garbage", "not UTF-8 text: byte 0 is 0xe9"),
    ],
    ids=["empty", "no-step", "extra-field", "no-numbers", "binary"],
)
def test_a_damaged_metrics_log_is_named_and_left_out(tmp_path: Path, caplog, content: bytes,
                                                     what: str) -> None:  # fmt: skip
    run = synthetic_run(tmp_path / "run")
    damaged = run / "csv" / "version_1" / "metrics.csv"  # a resumed run's log
    damaged.parent.mkdir()
    damaged.write_bytes(content)
    with caplog.at_level("WARNING", logger="advarch"):
        md = write_report(run).read_text()
    assert f"skipping {damaged} ({what})" in caplog.text
    assert f"Left out of the learning curves: {damaged} ({what})" in md
    assert "| val/loss | 1.000 |" in md and "](learning_curves.png)" in md  # version_0's


def test_sweep_report_where_every_trial_failed_says_why(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    for trial, heads in enumerate((3, 5)):
        (sweep / str(trial) / ".hydra").mkdir(parents=True)
        (sweep / str(trial) / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"model.num_heads={heads}"]))  # fmt: skip
        error = {"error": f"model.num_heads={heads} must divide model.dim=32"}
        (sweep / str(trial) / "result.json").write_text(json.dumps(error))
    md = write_report(sweep).read_text()
    assert "2 runs (0 with metrics, 2 failed); none has a value of `val/loss`." in md
    assert "| 1 | 5 | failed | failed: model.num_heads=5 must divide model.dim=32 |" in md
    assert "## Plots" not in md  # no empty section


def test_sweep_report_takes_final_values_from_each_runs_summary(tmp_path: Path) -> None:
    # summary.json holds what the run's summary printed (throughput over the whole run), the
    # CSV's last row one logging window: W&B's summary of the report gets the former
    from advarch.reports.markdown import sweep_report

    sweep = make_sweep(tmp_path)
    summary = {"metrics": {"val/loss": 0.8, "val/acc": 0.5}}
    (sweep / "1" / SUMMARY_FILE).write_text(json.dumps(summary))
    assert sweep_report(sweep).final["val/acc"] == 0.5  # the CSV's last is 0.86


def test_best_run_by_direction() -> None:
    finals = {"0": {"val/acc": 0.5}, "1": {"val/acc": 0.7}, "2": {}}
    overrides = {n: {} for n in finals}
    assert best_run(list(finals), overrides, finals, "val/acc", "maximize") == "1"
    assert best_run(list(finals), overrides, finals, "val/acc", "minimize") == "0"
    assert best_run(["2"], overrides, finals, "val/acc", "minimize") is None


def test_not_a_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        write_report(tmp_path)
    # a run name's folder (`outputs/runs/<name>`) points at its runs
    for run in ("2026-01-01_10-00-00_a", "2026-01-02_10-00-00_b"):
        (tmp_path / run / "csv" / "version_0").mkdir(parents=True)
        (tmp_path / run / "csv" / "version_0" / "metrics.csv").write_text("step\n")
    newest = tmp_path / "2026-01-02_10-00-00_b"
    with pytest.raises(FileNotFoundError, match=f"; it holds 2 run\\(s\\), the newest {newest}$"):
        write_report(tmp_path)
    monkeypatch.setattr(sys, "argv", ["report.py", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="^error: .*missing does not exist$"):
        runpy.run_path(str(ROOT / "scripts" / "report.py"), run_name="__main__")


def test_a_failed_trial_points_at_its_error(tmp_path: Path, monkeypatch) -> None:
    # it said the trial was "neither a run folder … nor a sweep folder"
    from advarch.sweeps import write_result

    trial = tmp_path / "0"
    write_result(trial, ["model.dim=7"], "val/loss", None, {}, error="ValueError: dim 7")
    (trial / "error.txt").write_text("Traceback …\nValueError: dim 7\n")
    monkeypatch.setattr(sys, "argv", ["report.py", str(trial)])
    line = f"error: {trial}: this sweep trial failed (ValueError: dim 7); see {trial}/error.txt"
    with pytest.raises(SystemExit, match=f"^{re.escape(line)}$"):
        runpy.run_path(str(ROOT / "scripts" / "report.py"), run_name="__main__")


def test_report_of_a_real_tiny_moe_run(make_cfg) -> None:
    from advarch.train import run

    cfg = make_cfg(
        [
            "debug=tiny",
            *SMALL_TEXT,
            "model=moe",
            "callbacks.expert_load.every_n_steps=2",
            "callbacks.rich_progress_bar=null",
            "callbacks.rich_model_summary=null",
        ]  # fmt: skip
    )
    metrics = run(cfg)
    run_dir = Path(cfg.paths.output_dir)
    md = write_report(run_dir).read_text()
    assert f"| val/loss | {metrics['val/loss']:.4g} |" in md
    assert "## Expert load" in md and "2 MoE layers, 8 experts" in md
    for name in ("learning_curves", "expert_load_history", "expert_load_final"):
        assert_png(run_dir / "report" / f"{name}.png")


@pytest.mark.slow
def test_wandb_offline_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = synthetic_run(tmp_path / "run")
    (tmp_path / "open").mkdir()
    open_run = wandb.init(mode="offline", dir=str(tmp_path / "open"))  # the caller's own run
    try:
        write_report(run, wandb=True)
    finally:
        open_run.finish()
    runs = list((run / "report" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = list(runs[0].rglob("*.png"))
    assert len(media) >= 2  # learning curves and few-shot accuracy
    assert not list((tmp_path / "open").rglob("*.png"))  # nothing logged into the caller's run
    # the report run says which run it reports on (its config was empty)
    from tests.wandb_offline import finished_records, offline_run

    finished_records(run / "report")
    assert offline_run(run / "report")["config"]["run"] == str(run)


def test_damaged_run_files_are_skipped_with_a_warning_naming_them(tmp_path: Path, caplog) -> None:
    run = synthetic_run(tmp_path / "run")
    damaged = {
        run / ".hydra" / "config.yaml": b"optimized_metric: [unclosed",
        run / ".hydra" / "overrides.yaml": b"- \xff\xfe",
        run / SUMMARY_FILE: b"{not json",
    }
    for path, content in damaged.items():
        path.write_bytes(content)
    with caplog.at_level("WARNING", logger="advarch"):
        md = write_report(run).read_text()
    assert "val/loss" in md  # the report of what could be read
    for path in damaged:
        assert f"skipping {path} (" in caplog.text


def test_sweep_report_never_marks_a_failed_trial_best(tmp_path: Path) -> None:
    # hunter 31: a trial that diverged ("training loss is nan": FloatingPointError, result.json
    # status failed, Optuna/the sweeper were handed the worst value) keeps the val/loss its CSV
    # logged before diverging. The sweep table (`advarch.sweeps.collect`) ranks failures last;
    # the report must agree: the best run is the best of the trials that finished (run 1).
    from advarch.reports.markdown import sweep_report

    sweep = make_sweep(tmp_path)
    overrides = ["debug=tiny", "optimizer.lr=3e-2", "model.dim=32"]
    diverged = synthetic_run(sweep / "4", final_val=0.5, overrides=overrides)
    (diverged / SUMMARY_FILE).unlink()  # it raised: no run summary
    error = "FloatingPointError: training loss is nan at step 10 (epoch 0)"
    (diverged / "result.json").write_text(json.dumps(
        {"overrides": ["optimizer.lr=3e-2"], "status": "failed", "metric": "val/loss",
         "value": None, "error": error, "metrics": {}}))  # fmt: skip
    report = sweep_report(sweep)
    assert report.config["best_run"] == "1"
    assert "best by `val/loss` (minimize): run **1**." in "\n".join(report.lines)
    # … nor a trial a signal stopped (its values are not final; the table ranks it last)
    (diverged / "result.json").write_text(json.dumps(
        {"overrides": ["optimizer.lr=3e-2"], "status": "interrupted", "metric": "val/loss",
         "value": None, "metrics": {}}))  # fmt: skip
    assert sweep_report(sweep).config["best_run"] == "1"


def test_wandb_report_run_goes_to_the_runs_own_project_and_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # hunter 31: a run trained with logger.wandb.project=myproj logger.wandb.group=ablation
    # lives in W&B project myproj, group ablation (train.py's `wandb_init_fields`: "a value
    # the user set under logger.wandb wins"); `report.py <run> --wandb` logged the report into
    # project "advarch" (hard-coded) and the group of its run_name, so it is not beside it.
    from tests.wandb_offline import finished_records, records

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = synthetic_run(tmp_path / "run")
    logged = {"run_name": "mine", "optimized_metric": "val/loss",
              "logger": {"wandb": {"project": "myproj", "group": "ablation"}}}  # fmt: skip
    (run / "csv" / "version_0" / "hparams.yaml").write_text(yaml.safe_dump(logged))
    write_report(run, wandb=True)
    finished_records(run / "report")
    (log,) = (run / "report").glob("wandb/offline-run-*/run-*.wandb")
    (record,) = [r.run for r in records(log) if r.WhichOneof("record_type") == "run"][:1]
    assert record.project == "myproj"
    assert record.run_group == "ablation"


def test_learning_curves_mark_where_each_domain_of_a_text_domain_stream_starts(
    tmp_path: Path, monkeypatch
) -> None:
    """`data=text_domains` (the README's `strategy=ewc` / `naive` streams) trains one domain an
    epoch, fixed by its class: its config has no `epochs_per_task`, and the report drew no
    boundary (hunter 35 F2)."""
    import advarch.reports.markdown as markdown

    run = tmp_path / "run"  # 4 domains × 3 steps, validated after each, then the final test
    rows = [
        {"epoch": step // 3, "step": step, "train/loss": 5.0 - 0.1 * step} for step in range(12)
    ]
    rows += [{"epoch": 4, "step": 12, "test/acc": 0.5}]
    write_csv(run, rows)
    data = {"_target_": "advarch.data.text_domains.TextDomainsDataModule", "steps_per_task": 3}
    (run / "csv" / "version_0" / "hparams.yaml").write_text(yaml.safe_dump({"data": data}))
    drawn = []
    plot = markdown.plot_learning_curves
    monkeypatch.setattr(markdown, "plot_learning_curves",
                        lambda m, path, boundaries, names: drawn.append(boundaries)
                        or plot(m, path, boundaries, names))  # fmt: skip
    write_report(run)
    assert drawn == [[3.0, 6.0, 9.0]]
