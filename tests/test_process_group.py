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
    spawn = mp.get_context("spawn")
    for _ in range(3):  # without it, 3 rounds abort at least once ~90% of the time here
        port = _free_port()
        workers = [spawn.Process(target=_worker, args=(rank, port)) for rank in range(WORLD)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=120)
        assert [w.exitcode for w in workers] == [0] * WORLD  # −6: SIGABRT at shutdown
