"""gloo processes that exit with their process group alive abort at shutdown about half the
time (pytorch/pytorch#190489): every DDP process of a run ends it first."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from advarch.distributed import destroy_process_group_at_exit

WORLD = 4


def _worker(rank: int, port: int) -> None:
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    destroy_process_group_at_exit()  # as `DestroyProcessGroupAtExit.setup` does in a worker
    gathered = [torch.empty(1) for _ in range(WORLD)]
    dist.all_gather(gathered, torch.tensor([float(rank)]))
    dist.all_reduce(torch.ones(1), async_op=True).wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_processes_exit_cleanly() -> None:
    for _ in range(3):  # without it, 3 spawns abort at least once ~90% of the time here
        mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD)  # raises on a worker's SIGABRT
