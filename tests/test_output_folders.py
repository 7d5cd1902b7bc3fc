"""Output and cache folders checked before any work (`advarch.output_folders`)."""

from __future__ import annotations

from pathlib import Path

import pytest

import advarch.output_folders as output_folders
from advarch.errors import ConfigError
from advarch.output_folders import check_writable


def test_a_cache_folder_another_starting_run_removes_is_made_again(tmp_path, monkeypatch):
    # CI 42: two runs started at once in a fresh project; both found no outputs/cache, one
    # made, probed and removed it (keep=False) while the other probed it: "cannot write
    # paths.cache_dir=…/outputs/cache: No such file or directory"
    folder = tmp_path / "outputs" / "cache"
    real_probe, calls = output_folders._write_probe, []

    def other_run_removes_it_first(where: Path) -> None:
        calls.append(where)
        if len(calls) == 1:  # the other run's cleanup lands between mkdir and the probe
            where.rmdir()
            where.parent.rmdir()
        real_probe(where)

    monkeypatch.setattr(output_folders, "_write_probe", other_run_removes_it_first)
    check_writable(folder, "paths.cache_dir", keep=False)
    assert len(calls) == 2 and not (tmp_path / "outputs").exists()  # (none left behind)


def test_a_folder_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "outputs").write_text("a file")
    with pytest.raises(ConfigError, match=r"cannot write paths.cache_dir=.*: it is inside .*file"):
        check_writable(tmp_path / "outputs" / "cache", "paths.cache_dir", keep=False)
