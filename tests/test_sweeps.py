"""Multirun sweeps and W&B runs as a user types them: `python train.py -m …` in a fresh folder.

Each command runs as a subprocess in its own working directory (the real run and sweep
folders, `${unique:}`, the default W&B offline logger); the only shared thing is the
tokenised-corpus cache, linked in as `outputs/cache`. Results are read back from the files a
user would open: `summary.md`/`summary.csv`, `result.json`, the offline W&B run log.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from rich.console import Console

import advarch
from advarch.sweeps import SWEEP_OVERRIDES_FILE, trial_overrides, write_summary
from tests.cli import Project, read_metrics, series
from tests.conftest import TrainedRun
from tests.wandb_offline import offline_run

pytestmark = pytest.mark.xdist_group("cli")


def summary_rows(sweep: Path) -> list[dict[str, str]]:
    with (sweep / "summary.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_grid_sweep_with_a_failing_trial(project: Project) -> None:
    # num_heads=3 does not divide dim 32: those trials fail, the sweep goes on and exits 0
    out = project.run(
        "-m", "model.depth=1,2", "model.num_heads=2,3", "debug=tiny", "logger=wandb"
    ).check()
    log = out.output
    assert "Traceback" not in log
    lines = log.splitlines()
    failures = [line for line in lines if "failed: model.num_heads=3 must" in line]
    assert sum("trial model.depth=" in line for line in failures) == 2  # a line per trial
    # the table in a pipe: a row per trial, not wrapped at 80 columns mid-word
    assert sum(line.endswith("failed: model.num_heads=3 must divide model.dim=32 │")
               for line in lines) == 2  # fmt: skip
    assert any(line.startswith("┃ trial ┃ model.depth ┃ model.num_heads ┃") for line in lines)

    folder = out.sweep_dir
    rows = summary_rows(folder)
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
def test_sweep_where_every_trial_fails_exits_non_zero(project: Project) -> None:
    out = project.run("-m", "model.num_heads=3,5", "debug=tiny")
    assert out.rc != 0
    assert "Traceback" not in out.output
    assert "error: all 2 trials failed" in out.stderr


def test_wandb_run_carries_config_identity_and_summary(trained: dict[str, TrainedRun]) -> None:
    # a session run, trained by `python train.py … logger=wandb tags=[baseline] seed=1` (its
    # eval.py run's W&B record: test_readme's `python eval.py ckpt_path=…` line)
    run_dir = trained["lm_seed1"].run_dir
    assert run_dir.parent.name == "debug-tiny-moe-plain"
    run = offline_run(run_dir)
    config = run["config"]
    assert config["model"]["dim"] == 32 and config["model"]["moe"]["num_experts"] == 8
    assert config["seed"] == 1 and config["optimizer"]["lr"] > 0 and config["data"]["seq_len"]
    assert config["params"]["total"] >= config["params"]["trainable"] > 0
    assert len(config["git"]["commit"]) == 40 and isinstance(config["git"]["dirty"], bool)
    assert len(config["data_fingerprint"]) == 12
    assert config["advarch_version"] == advarch.__version__  # (an installed package has no git)
    # the run config alone: no copies of the strategy's arguments at the top level
    assert set(config) <= {*yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text()),
                           "params", "git", "advarch_version", "data_fingerprint",
                           "_wandb"}  # fmt: skip
    hparams = yaml.safe_load((run_dir / "csv" / "version_0" / "hparams.yaml").read_text())
    assert hparams["model"] == config["model"] and hparams["git"] == config["git"]
    assert run["name"] == "debug-tiny-moe-plain" and run["group"] == "debug-tiny-moe-plain"
    assert run["job_type"] == "train"
    assert run["tags"] == ["baseline", "model:moe", "strategy:plain", "data:text"]
    assert set(run["summary"]["val/loss"]) == {"min"}  # the best value, not the last
    assert "test/bpb" in run["summary"]
    summary = json.loads((run_dir / "summary.json").read_text())["metrics"]
    # the run's throughput, as the console and summary.json say (not the last window's)
    assert run["summary"]["train/tokens_per_s"] == pytest.approx(summary["train/tokens_per_s"])


def test_summary_names_every_override_typed_for_the_whole_sweep_as_typed(tmp_path: Path) -> None:
    # Hydra hands each job `trainer.deterministic=True` for the `true` typed: that one read as
    # the trial's own, the others as shared and left out, and the header said only
    # "(every trial: trainer.deterministic=True)"
    typed = ["model.depth=1,2", "debug=tiny", "trainer.deterministic=true", "trainer.max_steps=4"]
    yaml.safe_dump(typed, (tmp_path / SWEEP_OVERRIDES_FILE).open("w"))
    jobs = [[f"model.depth={d}", "debug=tiny", "trainer.deterministic=True", "trainer.max_steps=4"]
            for d in (1, 2)]  # fmt: skip
    rows = [{"trial": n, "overrides": trial_overrides(job, typed), "status": "ok", "value": 2.0 - n}
            for n, job in enumerate(jobs)]  # fmt: skip
    assert [r["overrides"] for r in rows] == [["model.depth=1"], ["model.depth=2"]]
    table = write_summary(tmp_path, rows, "val/loss")
    every = "debug=tiny trainer.deterministic=true trainer.max_steps=4"
    assert (tmp_path / "summary.md").read_text().startswith(f"every trial: `{every}`\n")
    assert str(table.title).endswith(f"(every trial: {every})")


def test_summary_names_the_overrides_every_trial_shares_once(tmp_path: Path) -> None:
    rows = [{"trial": n, "overrides": [f"model.depth={d}", "extras.print_config=false"],
             "status": "ok", "value": v} for n, d, v in ((0, 1, 2.5), (1, 2, 2.0))]  # fmt: skip
    table = write_summary(tmp_path, rows, "val/loss")
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("every trial: `extras.print_config=false`")
    assert "| trial | model.depth | val/loss | status |" in md
    assert "every trial: extras.print_config=false" in str(table.title)
    assert summary_rows(tmp_path)[0]["extras.print_config"] == "false"  # the CSV keeps all


def test_a_searched_key_the_trials_drew_alike_is_a_column_not_shared(tmp_path: Path) -> None:
    # new user 38 L6: both trials of `-m hparams_search=optuna … hydra.sweeper.n_trials=2` drew
    # model.dim=128: the title said "(every trial: hparams_search=optuna debug=tiny
    # model.dim=128)", as if it were fixed, and its column was gone
    yaml.safe_dump(["hparams_search=optuna", "debug=tiny"],
                   (tmp_path / SWEEP_OVERRIDES_FILE).open("w"))  # fmt: skip
    space = {
        "optimizer.lr": "interval(3e-4, 3e-3)",
        "model.dim": "choice(96, 128, 192)",
        "+model.extra": "choice(1, 2)",
    }  # fmt: skip  (review 38: a `+` key too)
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    yaml.safe_dump({"hydra": {"sweeper": {"params": space}}},
                   (tmp_path / "0" / ".hydra" / "hydra.yaml").open("w"))  # fmt: skip
    rows = [{"trial": n, "overrides": [f"optimizer.lr={lr}", "model.dim=128", "+model.extra=1"],
             "status": "ok", "value": 4.0 + n} for n, lr in enumerate((0.001, 0.002))]  # fmt: skip
    table = write_summary(tmp_path, rows, "val/loss")
    md = (tmp_path / "summary.md").read_text()
    assert md.startswith("every trial: `hparams_search=optuna debug=tiny`\n"), md
    assert "| trial | optimizer.lr | model.dim | +model.extra | val/loss | status |" in md
    assert str(table.title).endswith("(every trial: hparams_search=optuna debug=tiny)")
    # … and so in scripts/report.py's sweep report (its trials' recorded command lines)
    from advarch.reports.markdown import write_report

    for row in rows:
        record = tmp_path / str(row["trial"]) / ".hydra"
        record.mkdir(parents=True, exist_ok=True)
        typed = ["hparams_search=optuna", "debug=tiny", *row["overrides"]]
        yaml.safe_dump(typed, (record / "overrides.yaml").open("w"))
    report = write_report(tmp_path).read_text()
    assert "Shared overrides: `hparams_search=optuna` `debug=tiny`\n" in report, report
    assert "| run | +model.extra | model.dim | optimizer.lr |" in report, report


def test_the_console_table_shows_values_in_brackets(tmp_path: Path) -> None:
    # a swept layer pattern, `[attn,swa]`, read as Rich markup printed an empty cell
    patterns = ((0, "[attn]", 2.5), (1, "[attn,swa]", 2.0))
    rows = [{"trial": n, "overrides": [f"model.layers={p}", "+model.swa.window=16"],
             "status": "ok", "value": v} for n, p, v in patterns]  # fmt: skip
    rows[0] |= {"status": "failed", "error": "model.layers=[attn] has [no] swa"}
    console = Console(file=io.StringIO(), width=200)
    console.print(write_summary(tmp_path, rows, "val/loss"))
    shown = console.file.getvalue()
    assert "│ [attn,swa] " in shown and "│ [attn]     " in shown, shown
    assert "failed: model.layers=[attn] has [no] swa" in shown
    assert "(every trial: +model.swa.window=16)" in shown


@pytest.mark.slow
@pytest.mark.parametrize(
    "sweep",
    [
        "-m model.depth=1,2 debug=tiny",
        # a sweep its config asks for, without -m (new user 39: "before training started:
        # stopped, nothing saved", no table)
        "hparams_search=optuna debug=tiny hydra.sweeper.n_trials=2",
    ],
)
def test_a_signal_between_trials_stops_the_sweep_with_its_table(
    project: Project, sweep: str
) -> None:
    # SIGTERM as trial 0 has ended: while Hydra composes trial 1, or as it starts
    wait = "until [ -f outputs/multiruns/*/0/result.json ]; do sleep 0.02; done"
    stopped = project.shell(f"python train.py {sweep} & pid=$!; {wait}; kill -TERM $pid; wait $pid")
    assert stopped.rc == 143 and "Traceback" not in stopped.output, stopped.output[-3000:]
    assert stopped.output.rstrip().endswith(
        "SIGTERM received: sweep stopped (its trials keep what they saved); rerun the same "
        "command with ckpt_path=auto to go on"
    )
    (row,) = summary_rows(stopped.sweep_dir)  # trial 0, done; trial 1 not begun
    assert row["trial"] == "0" and row["status"] == "ok", row
    assert not (stopped.sweep_dir / "1").exists()


@pytest.mark.slow
def test_a_signal_lets_a_parallel_sweeps_running_trials_save(project: Project) -> None:
    """`hydra/launcher=local_parallel`: joblib's own stop SIGKILLs its workers mid-step or
    mid-save, and the trials record nothing. SIGTERM to the launcher once a trial has a
    checkpoint: every trial that began saves and records its row, none starts after, and the
    sweep stops with its table (the rerun from those checkpoints: the kill -9 test below)."""
    sweep = "python train.py -m hydra/launcher=local_parallel model.depth=1,2,3 debug=tiny"
    wait = "until ls outputs/multiruns/*/*/checkpoints/last.ckpt 2>/dev/null; do sleep 0.05; done"
    stopped = project.shell(f"{sweep} & pid=$!; {wait}; kill -TERM $pid; wait $pid")
    assert stopped.rc == 143 and "Traceback" not in stopped.output, stopped.output[-3000:]
    assert "SIGTERM received: the running trials save and stop, then the sweep" in stopped.output
    assert stopped.output.rstrip().endswith(
        "SIGTERM received: sweep stopped (its trials keep what they saved); rerun the same "
        "command with ckpt_path=auto to go on"
    )
    assert_rows_of_stopped_trials(stopped.sweep_dir, "SIGTERM")
    assert not (stopped.sweep_dir / ".stop_requested").exists()


def assert_rows_of_stopped_trials(sweep_dir: Path, name: str) -> None:
    """Every trial of a stopped sweep has its row, finished or stopped by signal `name`, and
    at least one saved its checkpoint while training (it was stopped once one had one)."""
    rows = {row["trial"]: row for row in summary_rows(sweep_dir)}
    begun = sorted(p.name for p in sweep_dir.iterdir() if p.name.isdigit())
    assert begun and sorted(rows) == begun, (begun, rows)  # every trial begun has its row
    saved = 0
    for trial, row in rows.items():
        assert row["status"] == "ok" or row["status"].startswith(f"interrupted: {name} "), row
        found = re.fullmatch(f"interrupted: {name} at step \\d+: saved (.+)", row["status"])
        if found:  # (else stopped before training or in its final test: nothing to go on)
            assert Path(found[1]) == sweep_dir / trial / "checkpoints" / "last.ckpt"
            saved += 1
    assert saved, rows


def a_trial_saved(project: Project, launcher: int) -> bool:
    """Whether a trial of the sweep has written its checkpoint."""
    return bool(list(project.root.glob("outputs/multiruns/*/*/checkpoints/last.ckpt")))


def a_worker_starting(project: Project, launcher: int) -> bool:
    """Whether a worker process of the sweep's pool exists (it is in its first moments: its
    interpreter starting, before its stop-signal handlers are in)."""
    found = subprocess.run(["pgrep", "-f", "-g", str(launcher), "popen_loky_posix"],
                           stdout=subprocess.DEVNULL)  # fmt: skip
    return found.returncode == 0


@contextlib.contextmanager
def parallel_sweep(
    project: Project, sweep: list[str], ready: Callable[[Project, int], bool] = a_trial_saved
) -> Iterator[subprocess.Popen]:
    """`sweep` started in a group of its own (as a terminal's job: its workers are in it, cold,
    so they are its children), yielded once `ready` (by default: once a trial has a
    checkpoint); the group is killed after. Its output goes to `sweep.txt` beside the project
    (a pipe nobody reads would fill)."""
    with (project.root.parent / "sweep.txt").open("w") as output:
        launcher = subprocess.Popen(  # noqa: S603
            sweep, cwd=project.root, env=project.env(warm=False), stdout=output,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not ready(project, launcher.pid):
            assert launcher.poll() is None, (project.root.parent / "sweep.txt").read_text()
            assert time.monotonic() < deadline, f"not {ready.__name__} in 180 s"
            time.sleep(0.005)
        yield launcher
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


@pytest.mark.slow
def test_ctrl_c_stops_a_parallel_sweep_with_an_idle_worker(project: Project) -> None:
    """Ctrl-C reaches every process of the group: the launcher, its trial and its idle worker
    (one trial, two workers), which died of it and broke the pool (joblib then killed the
    trial). As typed in the README (its smoke switch and enough steps to stop it midway)."""
    sweep = ["python", "train.py", "-m", "hydra/launcher=local_parallel", "debug=tiny",
             "trainer.max_steps=60"]  # fmt: skip
    with parallel_sweep(project, sweep) as launcher:
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C
        launcher.wait(timeout=120)
    output = (project.root.parent / "sweep.txt").read_text()
    assert launcher.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "BrokenProcessPool" not in output, output[-3000:]
    (sweep_dir,) = project.sweeps()
    assert_rows_of_stopped_trials(sweep_dir, "SIGINT")


@pytest.mark.slow
def test_ctrl_c_as_a_parallel_sweeps_workers_start_stops_it_in_one_line(project: Project) -> None:
    """Ctrl-C while the pool's workers start (their interpreters, before their handlers are
    in): a worker died of it (KeyboardInterrupt), the pool broke, and the sweep ended in a
    `BrokenProcessPool` traceback. Workers now start with stop signals blocked, unblocked
    once their handlers are in, so it is one stop like any other."""
    sweep = ["python", "train.py", "-m", "hydra/launcher=local_parallel", "model.depth=1,2",
             "debug=tiny"]  # fmt: skip
    with parallel_sweep(project, sweep, ready=a_worker_starting) as launcher:
        os.killpg(launcher.pid, signal.SIGINT)  # Ctrl-C
        launcher.wait(timeout=120)
    output = (project.root.parent / "sweep.txt").read_text()
    assert launcher.returncode == 130, output[-3000:]
    assert "Traceback" not in output and "BrokenProcessPool" not in output, output[-3000:]
    assert output.rstrip().endswith(
        "SIGINT received: sweep stopped (its trials keep what they saved); rerun the same "
        "command with ckpt_path=auto to go on"
    ), output[-3000:]
    (sweep_dir,) = project.sweeps()
    assert not [p for p in sweep_dir.iterdir() if p.name.isdigit()]  # no trial began


@pytest.mark.slow
def test_kill_9_of_a_parallel_sweep_leaves_no_trial_training(project: Project) -> None:
    """kill -9 of a `hydra/launcher=local_parallel` sweep (tester 33 F5): its workers went on
    training as orphans, holding the trials' folders (the rerun was refused "in use by another
    run"), then waited for work forever. Now each notices, saves as on SIGTERM, records its
    row and ends, and none starts a queued trial; the rerun with ckpt_path=auto goes on from
    those checkpoints."""
    # 3 trials, 2 workers: one queued
    sweep = ["python", "train.py", "-m", "hydra/launcher=local_parallel", "model.depth=1,2,3",
             "debug=tiny", "trainer.max_steps=24"]  # fmt: skip
    with parallel_sweep(project, sweep) as launcher:
        launcher.kill()
        launcher.wait(timeout=60)
        deadline = time.monotonic() + 60
        while subprocess.run(["pgrep", "-g", str(launcher.pid)], stdout=subprocess.DEVNULL
                             ).returncode == 0:  # fmt: skip
            assert time.monotonic() < deadline, "its workers still run 60 s after kill -9"
            time.sleep(0.2)
    (sweep_dir,) = project.sweeps()
    saved = {}
    for result in sorted(sweep_dir.glob("*/result.json")):
        row = json.loads(result.read_text())
        assert row["status"] in ("ok", "interrupted"), row
        if row["status"] == "interrupted" and "at step" in row["error"]:
            saved[result.parent] = int(re.search(r"at step (\d+)", row["error"])[1])
    assert saved, list(sweep_dir.iterdir())
    again = project.shell(shlex.join([*sweep, "ckpt_path=auto"])).check()
    for trial, step in saved.items():
        ckpt = trial / "checkpoints" / "last.ckpt"
        assert f"ckpt_path=auto: resuming {ckpt} (step {step}," in again.output, again.output
    assert not (sweep_dir / "2" / "result.json").exists()  # (the queued one never ran)
    assert [r["status"] for r in summary_rows(again.sweep_dir)] == ["ok", "ok", "ok"]


@pytest.mark.slow
def test_a_rerun_of_an_interrupted_sweep_with_ckpt_path_auto_goes_on(project: Project) -> None:
    sweep = "python train.py -m model.depth=1,2 debug=tiny"
    # SIGTERM once trial 0 has written a checkpoint (it saves and the sweep stops: 143)
    wait = "until [ -f outputs/multiruns/*/0/checkpoints/last.ckpt ]; do sleep 0.05; done"
    stopped = project.shell(f"{sweep} & pid=$!; {wait}; kill -TERM $pid; wait $pid")
    assert stopped.rc == 143, stopped.output[-3000:]
    first = stopped.sweep_dir / "0" / "checkpoints" / "last.ckpt"
    # the table of the trials so far, and how to go on (it ended on the checkpoint's line)
    assert "sweep stopped: rerun the same command with ckpt_path=auto to go on" in stopped.output
    table = (stopped.sweep_dir / "summary.md").read_text()
    assert "| interrupted: SIGTERM at step " in table and f"saved {first} |" in table, table
    assert "ckpt_path=<that file>" not in table  # (a trial goes on with its sweep, not alone)
    # a newer single run of the run name, as trial 1 but for max_steps (another LR schedule):
    # trial 1 resumed it
    project.shell("python train.py debug=tiny trainer.max_steps=9").check()
    again = project.shell(f"{sweep} ckpt_path=auto").check()
    assert "outputs/runs/" not in again.output  # (nothing resumed from single runs)
    found = re.search(
        f"ckpt_path=auto: resuming {re.escape(str(first))} \\(step (\\d)", again.output
    )
    assert found, again.output[-3000:]
    trials = again.sweep_dir
    carried = series(read_metrics(stopped.sweep_dir / "0"), "train/loss")[: int(found[1])]
    resumed = series(read_metrics(trials / "0"), "train/loss")
    assert len(resumed) == 6 and resumed[: len(carried)] == carried  # steps before: its CSV's
    assert len(series(read_metrics(trials / "1"), "train/loss")) == 6  # it never ran: fresh


@pytest.mark.slow
def test_a_parallel_sweep_of_one_job_at_a_time_trains_with_stop_signals_unblocked(
    project: Project,
) -> None:
    # review35 F3: with hydra.launcher.n_jobs=1 joblib runs the trials in the launcher itself,
    # whose stop signals `spawned_with_signals_blocked` blocks for the whole launch: the trials
    # trained with SIGINT, SIGTERM, SIGUSR1 and SIGUSR2 blocked, and every process they start
    # (DDP's other ranks, DataLoader workers, W&B's service) inherited the mask
    record = project.root.parent / "blocked.txt"
    result = project.run("-m", "hydra/launcher=local_parallel", "hydra.launcher.n_jobs=1",
                         "debug=tiny", "trainer.max_steps=1",
                         "+callbacks.mask._target_=tests.helpers.RecordBlockedSignals",
                         f"+callbacks.mask.path={record}")  # fmt: skip
    assert result.rc == 0, result.output[-3000:]
    assert record.read_text().splitlines() == [""]  # one trial, nothing blocked
    assert "[HYDRA] 1 trial in this process, one at a time (hydra.launcher.n_jobs=1)\n" in (
        result.output)  # fmt: skip


@pytest.mark.skipif(bool(shutil.which("sbatch") and shutil.which("srun")), reason="on a cluster")
def test_the_slurm_sweep_off_a_cluster_is_one_line(project: Project) -> None:
    # (submitit stopped in a 25-line traceback, "Could not detect srun", and left a sweep folder)
    readme = (
        "python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu hydra."
        "launcher.signal_delay_s=120 experiment=ewc_permuted_digits ckpt_path=auto"
    )
    res = project.shell(f"{readme} debug=tiny")
    assert res.rc == 1 and "Traceback" not in res.output, res.output[-3000:]
    assert res.stderr.strip().splitlines() == [
        "error: hydra/launcher=slurm submits to a SLURM cluster, and this machine has no sbatch "
        "on PATH: run it on the cluster's login node, or here without it "
        "(hydra/launcher=local_parallel runs the trials side by side)"
    ]
    assert not project.sweeps() and not res.new_runs  # (no folder)
