"""Reading an offline W&B run back as `wandb sync` does: its `run-<id>.wandb` record log.

The file is a LevelDB-style log (a 7-byte `:W&B` header, then 32 KiB blocks of records with
a 7-byte header: CRC32, length, type FULL/FIRST/MIDDLE/LAST) of `wandb_internal_pb2.Record`
protobufs; wandb ≥ 0.31 ships no Python reader, so the tests carry this small one.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list[pb.Record]:
    """Every record of an offline run's `.wandb` file, in order."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run log"
    out, pos, pending = [], HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def _items(update: Any) -> dict[str, Any]:
    return {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in update}


def _rows(update: Any) -> dict[str, Any]:
    """History items as a nested dict: a media value's fields (`nested_key` [metric, field])
    under its metric."""
    row: dict[str, Any] = {}
    for item in update:
        *path, leaf = [item.key] if item.key else list(item.nested_key)
        node = row
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = json.loads(item.value_json)
    return row


def run_log(run_dir: Path) -> Path:
    """The one offline run's `.wandb` record log under `run_dir` (W&B's save_dir)."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    return log


def finished_records(run_dir: Path, timeout: float = 60.0) -> list[pb.Record]:
    """The records of a run finished in this process: `run.finish()` can return before W&B's
    service has written the last rows, so wait (up to `timeout` s) for the final exit record."""
    deadline = time.monotonic() + timeout
    while True:
        out = records(run_log(run_dir))
        if (out and out[-1].HasField("exit")) or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def history(run_dir: Path) -> list[dict[str, Any]]:
    """Every `wandb.log` row of a finished run, in order (media rows hold the file's path
    under `<offline-run>/files/`)."""
    return [_rows(r.history.item) for r in finished_records(run_dir) if r.HasField("history")]


def offline_run(run_dir: Path) -> dict[str, Any]:
    """The run record (name, group, tags, job type), merged config and summary of a run folder."""
    run: dict[str, Any] = {"config": {}, "summary": {}}
    for record in records(run_log(run_dir)):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.update(
                id=r.run_id,
                name=r.display_name,
                group=r.run_group,
                job_type=r.job_type,
                tags=list(r.tags),
            )
            run["config"].update(_items(r.config.update))
        elif kind == "config":
            run["config"].update(_items(record.config.update))
        elif kind == "summary":
            run["summary"].update(_items(record.summary.update))
    return run
