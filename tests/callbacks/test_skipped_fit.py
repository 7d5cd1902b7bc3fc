"""A resumed run with nothing left to train: advarch's line says so, Lightning's is left out."""

from __future__ import annotations

from pathlib import Path

import pytest

from advarch.train import run
from tests.conftest import TINY
from tests.strategies.test_ewc import STREAM

STREAM_OF_NAIVE = ["debug=tiny", *STREAM[:-2], "strategy=naive"]  # (no Fisher settings)


@pytest.mark.parametrize(
    ("overrides", "ours", "lightnings"),
    [
        (TINY, "nothing left to train", "`Trainer.fit` stopped: `max_steps=6` reached."),
        (STREAM_OF_NAIVE, "the checkpoint's stream finished all 2 tasks: nothing left to train",
         "`Trainer.fit` stopped: `max_epochs=2` reached."),
    ],
    ids=["max_steps", "stream"],
)  # fmt: skip
def test_resuming_a_finished_run_says_it_once(make_cfg, tmp_path: Path, caplog,
                                              overrides: list[str], ours: str,
                                              lightnings: str) -> None:  # fmt: skip
    with caplog.at_level("INFO"):
        cfg = make_cfg(overrides, output_dir=tmp_path / "run")
        run(cfg)
        assert lightnings in caplog.text  # a fit that trained: why it stopped
        caplog.clear()
        last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
        run(make_cfg([*overrides, f"ckpt_path={last}"], output_dir=tmp_path / "resumed"))
    assert ours in caplog.text and "`Trainer.fit` stopped" not in caplog.text
