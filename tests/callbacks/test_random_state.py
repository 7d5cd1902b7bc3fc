"""The global random states a checkpoint keeps come back as they were saved."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from advarch.callbacks.random_state import RandomStateCheckpoint, random_states, set_random_states


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random(), np.random.randn()


def test_saved_states_load_as_plain_tensors_and_repeat_the_draws() -> None:
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn()  # (numpy's cached Gaussian is part of its state)
    buffer = io.BytesIO()
    torch.save(random_states(), buffer)
    expected = draws()
    buffer.seek(0)
    set_random_states(torch.load(buffer, weights_only=True))  # (no numpy types in it)
    assert draws() == expected


def test_a_checkpoint_written_before_the_first_batch_keeps_the_loaded_states() -> None:
    # review35 F1: a resumed run writes last.ckpt before it trains a batch (train.py's final
    # save when the checkpoint had reached max_steps: a rerun of a finished command with
    # ckpt_path=auto). That checkpoint held the fresh seed's states, not the loaded ones, and
    # the run extended from it later drew other dropout masks.
    torch.manual_seed(1)
    torch.rand(5)
    saved = random_states()
    callback = RandomStateCheckpoint()
    callback.load_state_dict(saved)
    torch.manual_seed(0)  # the resumed run is seeded anew as it starts
    assert torch.equal(callback.state_dict()["torch"], saved["torch"])


class _FakeCuda:
    """Per-device CUDA generator states of one process of single-node multi-GPU DDP."""

    def __init__(self, states: list[torch.Tensor], device: int) -> None:
        self.states, self.device = [s.clone() for s in states], device

    def install(self, monkeypatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: len(self.states))
        monkeypatch.setattr(cuda, "current_device", lambda: self.device)
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [s.clone() for s in self.states])
        monkeypatch.setattr(cuda, "set_rng_state_all", lambda states: self._set_all(states))
        monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": self._get(device))
        monkeypatch.setattr(
            cuda, "set_rng_state", lambda state, device="cuda": self._set(state, device)
        )

    def _index(self, device) -> int:
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return self.device if device.index is None else device.index

    def _get(self, device) -> torch.Tensor:
        return self.states[self._index(device)].clone()

    def _set(self, state: torch.Tensor, device) -> None:
        self.states[self._index(device)] = state.clone()

    def _set_all(self, states: list[torch.Tensor]) -> None:
        self.states = [s.clone() for s in states]


def test_each_ddp_process_gets_back_the_state_of_its_own_gpu(monkeypatch) -> None:
    # review35 F2: under single-node multi-GPU DDP every process sees every GPU and draws on
    # its own (process r on cuda:r). Process 0's checkpoint holds cuda:0's advanced state and
    # cuda:1's state as seeded; process 1 set back all of them, so its cuda:1 drew the first
    # steps' dropout masks again (what the callback exists to prevent).
    seeded, advanced = torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)
    rank0 = _FakeCuda([advanced, seeded], device=0)
    rank0.install(monkeypatch)
    saved = random_states()
    rank1 = _FakeCuda([seeded, advanced], device=1)  # process 1 drew alike, on cuda:1
    rank1.install(monkeypatch)
    set_random_states(saved)
    assert torch.equal(rank1.states[1], advanced)  # cuda:1 as the uninterrupted run's
