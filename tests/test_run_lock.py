"""The run lock: one live run per folder, even when runs and `holder` probes meet."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from advarch import run_lock
from advarch.errors import ConfigError
from advarch.run_lock import (
    LOCK_FILE,
    FolderInUse,
    check_new_folder,
    holder,
    process_rank,
    run_folder_lock,
)
from tests.conftest import TINY


def test_a_second_run_is_refused_and_names_the_key_to_change(tmp_path: Path) -> None:
    with run_folder_lock(tmp_path):
        assert holder(tmp_path) == str(os.getpid())
        refused = pytest.raises(FolderInUse, match=r"\(another hydra.sweep.dir, or leave it out\)")
        with refused, run_folder_lock(tmp_path, "hydra.sweep.dir"):
            pass
    assert holder(tmp_path) is None and not (tmp_path / LOCK_FILE).exists()


def test_a_lock_on_a_file_its_run_unlinked_is_taken_again(tmp_path, monkeypatch) -> None:
    # run A releases (unlinks the file, then unlocks) between run B's open and B's flock: B
    # held a lock on a file no longer there, and run C created and locked a new one beside it
    path, real_flock, calls = tmp_path / LOCK_FILE, fcntl.flock, []

    def released_meanwhile(file, operation) -> None:
        if not calls:
            path.unlink()  # (A's release)
        calls.append(operation)
        real_flock(file, operation)

    monkeypatch.setattr(run_lock.fcntl, "flock", released_meanwhile)
    with run_folder_lock(tmp_path):
        monkeypatch.setattr(run_lock.fcntl, "flock", real_flock)
        assert len(calls) == 2  # taken again, on the file now at the path
        assert holder(tmp_path) == str(os.getpid())
        with pytest.raises(FolderInUse), run_folder_lock(tmp_path):
            pass


def test_a_probe_neither_refuses_a_run_nor_another_probe(tmp_path: Path) -> None:
    # a probe held the lock exclusively: a run starting meanwhile was refused, naming the
    # probe's process (a stale pid), and two probes refused one another
    (tmp_path / LOCK_FILE).write_text("12345")
    with (tmp_path / LOCK_FILE).open() as probe:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        assert holder(tmp_path) is None  # another probe's view
        release = threading.Timer(0.1, fcntl.flock, (probe, fcntl.LOCK_UN))
        release.start()
        with run_folder_lock(tmp_path):
            assert holder(tmp_path) == str(os.getpid())
        release.join()


@pytest.mark.parametrize(
    ("environment", "rank"),
    [({}, 0), ({"LOCAL_RANK": "1"}, 1), ({"SLURM_PROCID": "3"}, 3), ({"NODE_RANK": "1"}, 1)],
)
def test_the_process_rank_is_read_as_lightning_reads_it(monkeypatch, environment, rank) -> None:
    # the first process of a second node has no rank of its own yet: it is not rank 0
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    assert process_rank() == rank


def test_a_new_run_in_a_folder_holding_another_is_one_line(project) -> None:
    # `hydra.run.dir=x` typed twice: the second run appended its rows to the first's CSV,
    # added last-v1.ckpt beside its checkpoints and rewrote its .hydra/ before any check
    folder = project.root / "fixed run"
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "config.yaml").write_text("the first run's")
    again = project.run("debug=tiny", f"hydra.run.dir={folder}")
    assert again.rc == 1 and "Traceback" not in again.output, again.output[-2000:]
    assert again.stderr.strip() == (
        f"error: hydra.run.dir={folder} already holds a run (checkpoints/last.ckpt): a new one "
        "there would add to its CSV and checkpoints; choose an empty folder, or resume that run "
        f"with ckpt_path={folder}/checkpoints/last.ckpt"
    )
    assert (folder / ".hydra" / "config.yaml").read_text() == "the first run's"  # untouched


def test_a_refused_resume_typed_into_a_runs_folder_keeps_its_record(project) -> None:
    # fault pass 42c: `hydra.run.dir=<a finished run> ckpt_path=auto seed=99` was refused in one
    # line after Hydra had rewritten the folder's .hydra/: it said seed=99, trained with 42
    folder = project.root / "finished"
    project.run("debug=tiny", f"hydra.run.dir={folder}").check()
    before = {p.name: p.read_bytes() for p in folder.glob(".hydra/*")}
    again = project.run("debug=tiny", f"hydra.run.dir={folder}", "ckpt_path=auto", "seed=99")
    assert again.rc == 1 and "found no checkpoint of this configuration" in again.stderr
    assert {p.name: p.read_bytes() for p in folder.glob(".hydra/*")} == before


def test_the_readmes_grid_sweep_twice_as_written_gets_two_folders(project) -> None:
    # by default (no hydra.sweep.dir typed) a rerun is a new sweep beside the first
    first, second = (project.run("-m", "model.depth=2,4", "debug=tiny").check() for _ in "ab")
    assert first.sweep_dir != second.sweep_dir
    for res in (first, second):  # both trials of each finished, in their own sweep's folder
        assert sorted(p.parent.name for p in res.sweep_dir.glob("*/summary.json")) == ["0", "1"]


def test_a_sweep_into_a_folder_holding_one_is_one_line(project) -> None:
    # the README's grid sweep with the folder chosen (README: hydra.sweep.dir=<folder>) twice
    folder = project.root / "grid"
    (folder / "0").mkdir(parents=True)
    (folder / "0" / "summary.json").write_text("{}")
    again = project.run("-m", "model.depth=2,4", f"hydra.sweep.dir={folder}", "debug=tiny")
    assert again.rc == 1 and "Traceback" not in again.output, again.output[-2000:]
    assert again.stderr.strip() == (
        f"error: hydra.sweep.dir={folder} already holds a run (0/summary.json): a new one "
        "there would add to its CSV and checkpoints; choose an empty folder, or rerun the same "
        "grid with ckpt_path=auto to resume its trials"
    )
    assert sorted(p.name for p in folder.iterdir()) == ["0"]  # (no trial folder made)


def test_choosing_the_folder_through_paths_is_refused() -> None:
    with pytest.raises(ConfigError) as err:
        check_new_folder(["paths.output_dir=elsewhere"])
    assert str(err.value) == (
        "paths.output_dir=elsewhere: a run's folder is the one Hydra makes for its .hydra/ and "
        "train.log too; choose it with hydra.run.dir=<folder> (hydra.sweep.dir=<folder> with -m)"
    )


def test_a_resume_goes_on_in_its_own_folder(tmp_path: Path) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    last = tmp_path / "checkpoints" / "last.ckpt"
    for resume in ("ckpt_path=auto", f"ckpt_path={last}"):  # (a requeued job takes it back)
        check_new_folder([f"hydra.run.dir={tmp_path}", resume])
    check_new_folder(["-m", f"hydra.sweep.dir={tmp_path}"])  # (no trial's run in it)
    check_new_folder([f"hydra.run.dir={tmp_path / 'new'}"])
    check_new_folder(["hydra.run.dir=outputs/${now:%H}"])  # (decided by Hydra: left to it)
    with pytest.raises(ConfigError, match="choose an empty folder, or resume that run"):
        check_new_folder([f"hydra.run.dir={tmp_path}", f"ckpt_path={tmp_path}/../x.ckpt"])


def test_commands_that_only_print_and_a_tilde_are_left_to_hydra(
    tmp_path: Path, monkeypatch
) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"ckpt")
    for flag in (["--cfg", "job"], ["--help"], ["--info"], ["-c", "hydra"]):
        check_new_folder([f"hydra.run.dir={tmp_path}", *flag])  # (nothing written there)
    # Hydra makes `./~/…` of a `~` (the shell leaves it in `key=~/x`): not the home folder
    monkeypatch.setenv("HOME", str(tmp_path.parent))
    monkeypatch.chdir(tmp_path.parent)
    check_new_folder([f"hydra.run.dir=~/{tmp_path.name}"])


def test_ckpt_path_auto_starting_fresh_in_a_folder_holding_another_run_is_refused(
    make_cfg, tmp_path: Path
) -> None:
    # `check_new_folder` lets ckpt_path=auto through; finding none of this configuration, it
    # started fresh there, on top of the other run's CSV and checkpoints
    from advarch.train import run

    folder = tmp_path / "run"
    (folder / "csv" / "version_0").mkdir(parents=True)
    (folder / "csv" / "version_0" / "metrics.csv").write_text("step\n0\n")
    cfg = make_cfg([*TINY, "ckpt_path=auto"], output_dir=tmp_path)  # (its folder: run/)
    with pytest.raises(ConfigError) as err:
        run(cfg)
    assert str(err.value) == (
        f"{folder} holds another run (csv/version_0/metrics.csv) and ckpt_path=auto found no "
        "checkpoint of this configuration: a fresh run there would add to its CSV and "
        "checkpoints; give it an empty folder"
    )
    assert (folder / "csv" / "version_0" / "metrics.csv").read_text() == "step\n0\n"
