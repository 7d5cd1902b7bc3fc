"""What a resume's CSV curves carry from the run it continues (end to end: test_resume)."""

from __future__ import annotations

import csv
from pathlib import Path
from types import SimpleNamespace

from advarch.callbacks.resumed_curves import ResumedCurves
from advarch.csv_logger import CSVLogger


def test_a_checkpoint_flushes_the_rows_logged_before_it(tmp_path: Path) -> None:
    # new-user 37 F6: a kill -9 right after a checkpoint, before the logger's periodic flush,
    # lost its step's validation row; the resume starts after that step and never logs it
    logger = CSVLogger(save_dir=tmp_path, name="csv", version=0)
    logger.log_metrics({"val/loss": 2.5}, step=29)  # (held in memory until a flush)
    metrics = Path(logger.experiment.metrics_file_path)
    assert not metrics.exists() or "2.5" not in metrics.read_text()
    trainer = SimpleNamespace(loggers=[logger])
    ResumedCurves(None, tmp_path).on_save_checkpoint(trainer, None, {})
    with metrics.open() as file:
        assert [row["val/loss"] for row in csv.DictReader(file)] == ["2.5"]
