"""The console leaves out announcements that say nothing about the run (the log file keeps them);
the run's `train.log` keeps what the console printed besides its records (summary, stop line)."""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from advarch.callbacks.signals import Interrupted
from advarch.console_log import ConsoleFormatter, ConsoleNoise
from advarch.train import run
from tests.conftest import TINY, TrainedRun

BANNER = "-" * 100 + "\ndistributed_backend=gloo\nAll distributed processes registered. Starting"


@pytest.mark.parametrize(
    "message",
    ["Seed set to 42", "[rank: 1] Seed set to 42",  # (each DDP process's)
     "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2", BANNER,
     "`Trainer.fit` stopped: `max_steps=6` reached.",  # (the run summary follows)
     "`Trainer.fit` stopped: `max_epochs=4` reached.",
     "Running in `fast_dev_run` mode: will run the requested loop using 1 batch(es). Logging "
     "and checkpointing is suppressed.",  # (debug=fdr: advarch writes last.ckpt regardless)
     "Using bfloat16 Automatic Mixed Precision (AMP)"],  # (trainer.precision says it: new user 40b)
)  # fmt: skip
def test_announcements_stay_off_the_console(message: str) -> None:
    record = logging.LogRecord("lightning", logging.INFO, __file__, 1, message, None, None)
    assert not ConsoleNoise().filter(record)
    record.levelno = logging.WARNING  # a warning always shows
    assert ConsoleNoise().filter(record)


@contextlib.contextmanager
def run_logging(log_file: Path) -> Iterator[None]:
    """The handlers configs/hydra/default.yaml gives a run: every record into `log_file` with
    its time and logger, the console's own form and filter on stdout."""
    file = logging.FileHandler(log_file)
    file.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(ConsoleFormatter("%(message)s"))
    console.addFilter(ConsoleNoise())
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(file), root.addHandler(console)
    try:
        yield
    finally:
        root.removeHandler(file), root.removeHandler(console)
        root.setLevel(level)
        file.close()


@pytest.mark.parametrize(("signum", "times"), [(signal.SIGTERM, 1), (signal.SIGINT, 2)])
def test_a_stop_line_is_printed_once_and_kept_in_train_log(make_cfg, tmp_path: Path, capsys,
                                                           signum, times) -> None:  # fmt: skip
    # (train.log held Lightning's few lines: the line saying where the stopped run was saved
    # was on the console alone, and later the second Ctrl-C's line)
    stop = ["+callbacks.stop._target_=tests.helpers.SignalAtStep", "+callbacks.stop.step=2",
            f"+callbacks.stop.signum={int(signum)}", f"+callbacks.stop.times={times}"]  # fmt: skip
    cfg = make_cfg([*TINY, *stop])
    log_file = tmp_path / "train.log"
    with run_logging(log_file), pytest.raises(Interrupted):
        run(cfg)
    saved = f"SIGTERM received: saved {cfg.paths.output_dir}/checkpoints/last.ckpt at step 2"
    line = saved if times == 1 else "SIGINT again: stopped at once, without saving"
    assert capsys.readouterr().out.count(line) == 1  # printed, not logged again
    assert f"[advarch.console][INFO] - {line}\n" in log_file.read_text()


def test_train_log_keeps_the_run_summary(trained: dict[str, TrainedRun]) -> None:
    # (a user reading train.log found no summary: the run's result was on the console alone)
    run_dir = trained["lm"].run_dir
    log = (run_dir / "train.log").read_text()
    bpb = json.loads((run_dir / "summary.json").read_text())["metrics"]["val/bpb"]
    assert "[advarch.console][INFO] - advarch run summary\n" in log
    assert f"[advarch.console][INFO] - validation bits/byte {bpb:.3f} — " in log
    assert f"[advarch.console][INFO] - checkpoint: {run_dir.resolve()}/checkpoints/" in log
