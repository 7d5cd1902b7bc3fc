"""The console leaves out announcements that say nothing about the run (the log file keeps them)."""

from __future__ import annotations

import logging

import pytest

from advarch.console_log import ConsoleNoise

BANNER = "-" * 100 + "\ndistributed_backend=gloo\nAll distributed processes registered. Starting"


@pytest.mark.parametrize(
    "message",
    ["Seed set to 42", "[rank: 1] Seed set to 42",  # (each DDP process's)
     "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2", BANNER],
)  # fmt: skip
def test_announcements_stay_off_the_console(message: str) -> None:
    record = logging.LogRecord("lightning", logging.INFO, __file__, 1, message, None, None)
    assert not ConsoleNoise().filter(record)
    record.levelno = logging.WARNING  # a warning always shows
    assert ConsoleNoise().filter(record)
