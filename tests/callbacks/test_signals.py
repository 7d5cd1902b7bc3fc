"""Signals outside the training loop: testing stops with the signal's exit code and one line,
a second Ctrl-C stops at once (exit 130), eval.py stops the same way, and Ctrl-C while
starting up is one line."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from advarch.callbacks.signals import Interrupted, SignalCheckpoint
from advarch.eval import evaluate
from advarch.slurm import STOP_SIGNALS
from advarch.stop_signals import (
    HELD,
    PHASE,
    Stopped,
    hold_between_trials,
    requested_stop,
    stop_on_signals,
    stop_request_file,
    stop_requests_by_file,
    stopped_line,
    trial_running,
)
from advarch.train import run
from tests.cli import read_metrics
from tests.conftest import ROOT, TINY, TrainedRun


def test_sigterm_while_testing_stops_with_143_and_keeps_the_trained_weights(
    make_cfg, capsys: pytest.CaptureFixture[str]
) -> None:
    # (Lightning's own handler ended such a run with exit code 0, no metrics and no word)
    signal_test = ["+callbacks.stop._target_=tests.helpers.SignalAtTestBatch",
                   f"+callbacks.stop.signum={int(signal.SIGTERM)}"]  # fmt: skip
    cfg = make_cfg([*TINY, "trainer.limit_test_batches=4", *signal_test, "logger=wandb"])
    with pytest.raises(Interrupted) as stopped:
        run(cfg)
    assert stopped.value.exit_code == 143
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (Path(cfg.paths.output_dir) / "summary.json").exists()
    line = "SIGTERM received: testing stopped, no testing metrics written; the trained "
    out = capsys.readouterr().out
    assert line + f"weights are in {last}" in out
    (offline,) = Path(cfg.paths.output_dir).glob("wandb/offline-run-*")  # (it said nothing)
    assert out.rstrip().endswith(f"sync to W&B later: wandb sync {offline}")
    handler = signal.getsignal(signal.SIGTERM)
    assert not isinstance(getattr(handler, "__self__", None), SignalCheckpoint)  # restored


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_between_sweep_trials_stops_the_sweep_as_the_next_trial_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], signum: int
) -> None:
    # raised inside Hydra as it composed the next trial, it wrote no table and could end in
    # Hydra's own error
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    monkeypatch.setitem(PHASE, "between_trials", False)
    monkeypatch.setattr("advarch.stop_signals.HELD", held := [])
    try:
        stop_on_signals()
        hold_between_trials()
        os.kill(os.getpid(), signum)  # (Python runs the handler before the next line)
        assert held == [signum]
        name = signal.Signals(signum).name
        assert capsys.readouterr().err == (
            f"{name} received: the sweep stops as its next trial starts (again: at once)\n"
        )
        stop = KeyboardInterrupt if signum == signal.SIGINT else Stopped
        with pytest.raises(stop):  # a second one: at once (Hydra may hang there)
            os.kill(os.getpid(), signum)
        with pytest.raises(stop), trial_running():
            pytest.fail("the trial started")
        assert PHASE["between_trials"]  # (its own stop signals acted at once)
        held.clear()
        with trial_running(), pytest.raises(Stopped):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    assert not HELD


def test_a_parallel_sweeps_launcher_holds_a_signal_and_asks_its_trials_to_stop(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the launcher's first signal is written for the trials (in other processes) and raised as
    # the block ends; a second acts at once; a request file left by a killed launcher is gone
    # as the next one starts (it turned a rerun into that folder into a silent no-op)
    request = stop_request_file(tmp_path)
    request.write_text("SIGTERM")
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with pytest.raises(Stopped) as stopped, stop_requests_by_file(request):
        assert requested_stop(request) is None
        os.kill(os.getpid(), signal.SIGUSR1)  # (the handler runs before the next line)
        assert requested_stop(request) == signal.SIGUSR1
        assert "SIGUSR1 received: the running trials save and stop" in capsys.readouterr().err
    assert stopped.value.signum == signal.SIGUSR1 and not request.exists()
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    with pytest.raises(KeyboardInterrupt), stop_requests_by_file(request):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # (raised here)
        pytest.fail("a second signal waited")


@pytest.mark.parametrize("parallel_trial", [False, True])
def test_only_a_parallel_sweeps_launcher_requeues_a_slurm_job(
    parallel_trial: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `scontrol requeue` ends the whole job: a parallel trial that saved first would end the
    # others mid-save. Each trial saves and stops; its launcher requeues once they all have.
    asked: list[int] = []
    monkeypatch.setattr("advarch.callbacks.signals.requeue", asked.append)
    request = stop_request_file(tmp_path) if parallel_trial else None
    callback = SignalCheckpoint(tmp_path / "last.ckpt", stop_request=request)
    trainer = SimpleNamespace(save_checkpoint=lambda path: None, is_global_zero=True,
                              global_step=3)  # fmt: skip
    with pytest.raises(Interrupted):
        callback._save_and_stop(trainer, signal.SIGUSR1)
    assert asked == ([] if parallel_trial else [signal.SIGUSR1])


def test_a_run_puts_back_every_handler_it_found(make_cfg) -> None:
    # Lightning's teardown put back the handlers it found at fit's start, ours, after ours
    # had been restored: the next Ctrl-C (a sweep's next trial, a notebook) went to a callback
    # whose run was over, and did nothing
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    run(make_cfg(TINY))
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before


HANGUP = pytest.param(signal.SIGHUP, marks=pytest.mark.skipif(
    signal.SIGHUP not in STOP_SIGNALS, reason="SIGHUP is ignored here (nohup): it stops nothing"
))  # fmt: skip


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, HANGUP])
def test_a_signal_before_the_first_step_stops_with_its_exit_code(make_cfg, capsys,
                                                                signum) -> None:  # fmt: skip
    # during fit's start: SIGTERM ended with exit code 0 (Lightning), SIGINT with 1
    # (KeyboardInterrupt), SIGUSR1 by the default action, each without a word
    sanity = [
        "+callbacks.stop._target_=tests.helpers.SignalAtSanityCheck",
        f"+callbacks.stop.signum={int(signum)}",
        "trainer.num_sanity_val_steps=2",
    ]
    cfg = make_cfg([*TINY, *sanity])
    before = signal.getsignal(signum)
    with pytest.raises(Interrupted) as stopped:
        run(cfg)
    assert stopped.value.exit_code == 128 + signum
    name = signal.Signals(signum).name
    line = f"{name} received before training started: nothing trained, nothing saved"
    assert line in capsys.readouterr().out
    assert signal.getsignal(signum) == before  # restored


def test_a_second_ctrl_c_stops_at_once_with_130(make_cfg, capsys) -> None:
    twice = ["+callbacks.stop._target_=tests.helpers.SignalAtStep", "+callbacks.stop.step=2",
             f"+callbacks.stop.signum={int(signal.SIGINT)}", "+callbacks.stop.times=2"]  # fmt: skip
    cfg = make_cfg([*TINY, *twice])
    with pytest.raises(Interrupted) as stopped:
        run(cfg)
    assert stopped.value.exit_code == 130
    assert "SIGINT again: stopped at once, without saving" in capsys.readouterr().out


def test_a_second_ctrl_c_after_the_save_says_it_is_saved(make_cfg, capsys) -> None:
    # while the run winds down (its loggers finish) after the first saved: it said "without
    # saving" under the line naming the checkpoint
    first = ["+callbacks.stop._target_=tests.helpers.SignalAtStep", "+callbacks.stop.step=2",
             f"+callbacks.stop.signum={int(signal.SIGINT)}"]  # fmt: skip
    second = ["+callbacks.again._target_=tests.helpers.SignalOnException",
              f"+callbacks.again.signum={int(signal.SIGINT)}"]  # fmt: skip
    cfg = make_cfg([*TINY, *first, *second])
    with pytest.raises(Interrupted) as stopped:
        run(cfg)
    assert stopped.value.exit_code == 130
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    out = capsys.readouterr().out
    assert f"SIGINT received: saved {last} at step 2" in out
    assert f"SIGINT again: stopped at once, {last} is saved" in out
    # the metrics of the step the signal ended are in the CSV (Lightning logs them after the
    # hook that stopped): a run stopped at its second step kept only the first's
    steps = [row["step"] for row in read_metrics(last.parent.parent) if "train/loss" in row]
    assert steps == [0, 1], steps


def test_a_ctrl_c_in_a_long_step_is_heard_at_once(make_cfg, capsys, tmp_path: Path,
                                                   monkeypatch) -> None:  # fmt: skip
    # new-user 37 F8: nothing was said until the step ended (5 s for 8 accumulated batches): a
    # user pressed Ctrl-C again and lost the save. A stop saved before the timer says nothing
    ctrl_c = ["+callbacks.stop._target_=tests.helpers.SignalAtStep", "+callbacks.stop.step=2",
              f"+callbacks.stop.signum={int(signal.SIGINT)}"]  # fmt: skip
    heard = "SIGINT received: saving when this step ends (Ctrl-C again: at once, without saving)"
    # (a step that ends 2 s after the signal: heard at 0.5 s; one that ends at once, before a
    # timer of 60 s even on a busy machine: nothing said)
    for idle, after, said in ((0.0, 60.0, False), (2.0, 0.5, True)):
        monkeypatch.setattr("advarch.callbacks.signals.ACKNOWLEDGE_AFTER_S", after)
        slow = ["+callbacks.idle._target_=tests.helpers.IdleSteps",
                f"+callbacks.idle.seconds={idle}"]  # fmt: skip
        cfg = make_cfg([*TINY, *ctrl_c, *slow], output_dir=tmp_path / f"idle-{idle}")
        with pytest.raises(Interrupted):
            run(cfg)
        out = capsys.readouterr().out
        assert (heard in out) is said, out
        saved = f"SIGINT received: saved {cfg.paths.output_dir}/checkpoints/last.ckpt"
        assert saved in out and (not said or out.index(heard) < out.index(saved)), out


def test_eval_stops_on_sigterm_without_metrics(
    make_cfg, trained: dict[str, TrainedRun], monkeypatch: pytest.MonkeyPatch
) -> None:
    original = SignalCheckpoint.on_test_batch_end

    def signalled(self, trainer, *args) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        original(self, trainer, *args)

    monkeypatch.setattr(SignalCheckpoint, "on_test_batch_end", signalled)
    cfg = make_cfg([f"ckpt_path={trained['lm'].ckpt}"], config_name="eval")
    with pytest.raises(Interrupted, match="SIGTERM received: testing stopped") as stopped:
        evaluate(cfg)
    assert stopped.value.exit_code == 143


@pytest.mark.parametrize(  # in torch's imports, which call C++ (each signal, each phase:
    ("delay", "signum"),  # the handlers are the same for both, so not every pair)
    [(0.2, signal.SIGINT), (0.5, signal.SIGTERM), (1.0, signal.SIGINT)],
)
def test_a_signal_while_starting_is_one_line_and_leaves_no_run_folder(project, delay,
                                                                      signum) -> None:  # fmt: skip
    # Hydra has made the run folder and its log (train.py's job starts right after, and its
    # imports of torch and Lightning take seconds; a Ctrl-C inside them aborted the process,
    # and a SIGTERM before fit ended it silently with exit code -15)
    proc = subprocess.Popen(
        ["python", "train.py", "debug=tiny"],
        cwd=project.root,
        env=project.env(warm=False),
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip  (the imports are what it interrupts)
    runs = project.root / "outputs" / "runs"
    deadline = time.monotonic() + 60
    while not list(runs.glob("*/*/train.log")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(delay)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err[-2000:]
    name = signal.Signals(signum).name
    assert err.strip() == f"{name} received before training started: stopped, nothing saved"
    assert not list(runs.glob("*/*"))


@pytest.mark.parametrize(("script", "what", "signum"), [
    ("eval.py", "evaluation", signal.SIGINT), ("scripts/generate.py", "generation", signal.SIGTERM),
])  # fmt: skip
def test_a_signal_while_eval_or_generate_starts_is_one_line(project, trained, script, what,
                                                             signum) -> None:  # fmt: skip
    # new-user 37 F4: a Ctrl-C as they started was a 56-61-line traceback, a SIGTERM an exit
    # without a word, and each left its run folder (and an empty W&B run) behind
    extra = ["max_new_tokens=64"] if script != "eval.py" else []
    proc = subprocess.Popen(
        ["python", script, f"ckpt_path={trained['lm'].ckpt}", *extra], cwd=project.root,
        env=project.env(warm=False), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    runs = project.root / "outputs" / "runs"
    deadline = time.monotonic() + 60
    while not list(runs.glob("*/*/*.log")) and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(1.0)  # (in torch's and Lightning's imports)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum and "Traceback" not in err, err[-2000:]
    assert err.strip() == f"{signal.Signals(signum).name} received: {what} stopped"
    assert not list(runs.glob("*/*"))


def test_a_second_ctrl_c_stops_at_once_inside_a_long_native_call(project) -> None:
    # the handlers run between bytecodes: in one long native op (an attention backward over
    # 100k tokens) neither Ctrl-C was acted on for 14 minutes, until kill -9
    ready = project.root / "stuck"
    stuck = ["+callbacks.stuck._target_=tests.helpers.StuckInNativeCode",
             f"+callbacks.stuck.ready={ready}"]  # fmt: skip
    env = {**project.env(), "PYTHONPATH": f"{project.root}:{ROOT}"}  # (and tests.helpers)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    proc = subprocess.Popen(["python", "train.py", "debug=tiny", *stuck], cwd=project.root,
                            env=env, **pipes)  # fmt: skip
    deadline = time.monotonic() + 120
    while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)  # (waits for the op: nothing to save before it ends)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    second = time.monotonic()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert time.monotonic() - second < 10  # (the call alone takes about a minute)
    assert out.rstrip().endswith("SIGINT again: stopped at once, without saving"), out[-2000:]
    (log,) = (project.root / "outputs" / "runs").glob("*/*/train.log")
    assert "[advarch.console][INFO] - SIGINT again: stopped at once, without saving" in (
        log.read_text()
    )


def test_a_signal_as_fit_starts_says_nothing_was_trained(make_cfg, monkeypatch) -> None:
    # before `SignalCheckpoint` installs its handlers (DDP start, prepare_data, wandb.init) the
    # entry point's handler stops the run: its line said "after training … checkpoints are
    # written" for a run that never trained
    from lightning.pytorch.trainer.connectors.data_connector import _DataConnector

    original = _DataConnector.prepare_data

    def signalled(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)
        original(self)

    monkeypatch.setattr(_DataConnector, "prepare_data", signalled)
    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        stop_on_signals()
        with pytest.raises(Stopped):
            run(make_cfg(TINY))
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert stopped_line(signal.SIGTERM) == (
        "SIGTERM received before training started: stopped, nothing saved"
    )
    # a parallel sweep's launching process: its trials were training and saved (it said
    # "before training started: stopped, nothing saved")
    assert stopped_line(signal.SIGINT, sweep=True) == (
        "SIGINT received: sweep stopped (its trials keep what they saved); rerun the same "
        "command with ckpt_path=auto to go on"
    )


@pytest.mark.parametrize(
    "signal_at",
    [["SignalInValidation"], ["SignalAtBatch", "+callbacks.stop.batch=5"]],
    ids=["last-validation", "last-step"],
)
def test_a_signal_at_fits_last_step_or_validation_stops_before_the_test(
    make_cfg, capsys, signal_at
) -> None:
    # no training batch ends after it: the signal waited, then the test's start forgot it and
    # the run went on to exit 0 (a first Ctrl-C there did nothing); one at the last step
    # (debug=tiny's 6th, batch 5) validates the final weights first, as the run would
    last = [f"+callbacks.stop._target_=tests.helpers.{signal_at[0]}", *signal_at[1:],
            f"+callbacks.stop.signum={int(signal.SIGTERM)}"]  # fmt: skip
    cfg = make_cfg([*TINY, *last])
    with pytest.raises(Interrupted) as stopped:
        run(cfg)
    assert stopped.value.exit_code == 143
    saved = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    line = "SIGTERM received at the end of training: testing not run; the trained weights are in"
    assert f"{line} {saved}" in capsys.readouterr().out
    assert torch.load(saved, weights_only=False)["global_step"] == cfg.trainer.max_steps
    validated = [
        row["step"] for row in read_metrics(Path(cfg.paths.output_dir)) if "val/loss" in row
    ]
    assert validated == [2, 5]  # (steps 3 and 6, logged 0-based)


def test_a_second_ctrl_c_within_the_second_is_not_followed_by_saving(tmp_path: Path,
                                                                      capfd) -> None:  # fmt: skip
    # review 37b: the acknowledgement's timer is not cancelled by a second Ctrl-C: a second
    # after `SIGINT again: stopped at once, without saving` (the process still winding down:
    # W&B, teardown) came `SIGINT received: saving when this step ends`, which it never does
    from advarch.callbacks.signals import ACKNOWLEDGE_AFTER_S

    callback = SignalCheckpoint(tmp_path / "last.ckpt")
    callback._acknowledges = True  # (as on_train_start sets it in the first process)
    callback._handle(signal.SIGINT, None)
    with pytest.raises(Interrupted):
        callback._handle(signal.SIGINT, None)
    time.sleep(ACKNOWLEDGE_AFTER_S + 0.5)  # (the process winding down)
    out, err = capfd.readouterr()
    assert "stopped at once, without saving" in out + err
    assert "saving when this step ends" not in err, err


def test_a_sweep_trials_acknowledgement_names_the_trial(capsys) -> None:
    # review 37b F14: a terminal Ctrl-C reaches every trial of a parallel sweep, and each said
    # the same `SIGINT received: saving when this step ends` with no word of which it was
    from advarch.console_log import NamesItsRun

    callback = SignalCheckpoint(Path("last.ckpt"))
    assert isinstance(callback, NamesItsRun)  # (train.py gives it the trial's label)
    callback.run_label, callback._acknowledges = "trial 1 (model.depth=4)", True
    callback._acknowledge(signal.SIGTERM)
    out = capsys.readouterr().out
    assert out == "trial 1 (model.depth=4) · SIGTERM received: saving when this step ends\n"
