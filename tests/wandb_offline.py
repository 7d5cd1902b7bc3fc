"""Reading an offline W&B run back as `wandb sync` does: its `run-<id>.wandb` record log.

The file is a LevelDB-style log (a 7-byte `:W&B` header, then 32 KiB blocks of records with
a 7-byte header: CRC32, length, type FULL/FIRST/MIDDLE/LAST) of `wandb_internal_pb2.Record`
protobufs; wandb ≥ 0.31 ships no Python reader, so the tests carry this small one.
"""

from __future__ import annotations

import json
import struct
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


def offline_run(run_dir: Path) -> dict[str, Any]:
    """The run record (name, group, tags, job type), merged config and summary of a run folder."""
    (log,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    run: dict[str, Any] = {"config": {}, "summary": {}}
    for record in records(log):
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
