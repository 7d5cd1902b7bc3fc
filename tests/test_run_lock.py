"""The run lock: one live run per folder, even when runs and `holder` probes meet."""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path

import pytest

from advarch import run_lock
from advarch.run_lock import LOCK_FILE, FolderInUse, holder, process_rank, run_folder_lock


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
