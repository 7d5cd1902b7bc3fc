"""A DDP process ends its process group before the interpreter shuts down.

Lightning destroys the group at exit for NCCL only. A gloo process (`trainer=ddp_sim`, CPU
DDP) that exits with it alive can abort at interpreter shutdown ("terminate called without an
active exception", SIGABRT): gloo's threads still hold tensors whose release needs the
interpreter (pytorch/pytorch#190489; 8 of 15 four-process spawns aborted here, 0 of 30 with
the group destroyed at exit). It covers spawned workers (`ddp_spawn`) and the processes of
`trainer=ddp`; fork-started ones (`ddp_fork`) leave through `os._exit`, which runs no exit
handler. Torch only, so that spawned test workers stay light.
"""

from __future__ import annotations

import atexit

import torch


def _destroy_process_group() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def destroy_process_group_at_exit() -> None:
    """Registers the group's destruction at exit, once per process however often called."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        atexit.unregister(_destroy_process_group)
        atexit.register(_destroy_process_group)
