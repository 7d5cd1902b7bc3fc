"""The W&B id a resumed run continues: a bad id file is skipped with a warning, never a crash."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from advarch.config.runs import (
    WANDB_ID_FILE,
    architecture_difference,
    config_mismatch,
    previous_wandb_id,
)


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


def test_a_block_option_a_saved_config_lacks_is_its_default(make_cfg) -> None:
    # model=hybrid's YAML listed 2 of the SSM's 7 options until it listed all: its checkpoints
    # then read "written by a run of another model (model.ssm.d_conv=None there, 4 now)", and
    # ckpt_path=auto started such a run afresh
    cfg = make_cfg(["model=hybrid"])
    saved = OmegaConf.to_container(cfg, resolve=True)
    saved["model"]["ssm"] = {"d_state": 16, "expand": 2}
    assert config_mismatch({"hyper_parameters": {"cfg": saved}}, cfg) is None
    assert architecture_difference(saved, cfg) is None
    saved["model"]["ssm"]["d_conv"] = 3  # a value other than the default still differs
    assert config_mismatch({"hyper_parameters": {"cfg": saved}}, cfg) == (
        "model.ssm.d_conv=3 there, 4 now"
    )
    assert architecture_difference(saved, cfg)[0] == "model.ssm"
