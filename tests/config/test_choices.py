"""Config-group choices checked before Hydra: one line for a misspelt option, nothing else
stopped (own config folders, Hydra's groups, edits, sweeps)."""

from __future__ import annotations

from pathlib import Path

import pytest

from advarch.config.choices import check_group_choices
from advarch.config.validate import ConfigError


@pytest.mark.parametrize("argv", [
    ["model=moe", "strategy=naive,ewc", "debug=tiny", "model.dim=64", "-m"],
    ["hydra/launcher=joblib", "hydra/sweeper=optuna"],  # Hydra's plugins' groups
    ["+model=anything", "~logger", "model@extra=moe", "model=glob(*)"],
    ["hydra.searchpath=[file:///elsewhere]", "model=from_elsewhere"],
])  # fmt: skip
def test_valid_or_unknowable_choices_pass(argv: list[str]) -> None:
    check_group_choices(argv)


def test_own_config_folder_options_count(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "mine.yaml").write_text("dim: 8\n")
    (tmp_path / "model" / "sub").mkdir()
    (tmp_path / "model" / "sub" / "deep.yaml").write_text("dim: 8\n")
    for argv in (["--config-dir", str(tmp_path)], [f"--config-dir={tmp_path}"]):
        check_group_choices([*argv, "model=mine", "model=sub/deep"])
    with pytest.raises(ConfigError, match=r"model=mien is not a model config \(did you mean "
                       r"model=mine\? options: hybrid, .*mine"):  # fmt: skip
        check_group_choices(["-cd", str(tmp_path), "model=mien"])


def test_null_choice_says_how_to_leave_a_group_out() -> None:
    with pytest.raises(ConfigError, match="logger=null is not a choice: write ~logger to leave"):
        check_group_choices(["logger=null"])


def test_group_names_read_as_english() -> None:
    with pytest.raises(ConfigError, match=r"optimizer=sgdd is not an optimizer config \(did you"):
        check_group_choices(["optimizer=sgdd"])
