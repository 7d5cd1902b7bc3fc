"""The W&B id a resumed run continues: a bad id file is skipped with a warning, never a crash."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from advarch.config.runs import WANDB_ID_FILE, previous_wandb_id


@pytest.mark.parametrize(
    ("content", "reason"),
    [(b"abc123\n", None), (b"", "empty"), (b"bad id/x", "has ' /'"), (b"\xff\xfe", "unreadable")],
)
def test_previous_wandb_id(tmp_path: Path, caplog, content: bytes, reason: str | None) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / WANDB_ID_FILE).write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="advarch"):
        run_id = previous_wandb_id(tmp_path / "checkpoints" / "last.ckpt")
    if reason is None:
        assert run_id == "abc123" and not caplog.records
    else:
        assert run_id is None
        assert f"{tmp_path / WANDB_ID_FILE} is not a W&B run id ({reason}" in caplog.text
