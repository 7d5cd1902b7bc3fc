"""The global random states a checkpoint keeps come back as they were saved."""

from __future__ import annotations

import io
import random

import numpy as np
import torch

from advarch.callbacks.random_state import random_states, set_random_states


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
