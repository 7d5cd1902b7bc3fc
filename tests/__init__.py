"""advarch's test suite.

Triton reads TRITON_INTERPRET once, when it is imported, and Lightning imports it: the switch is
set here, before conftest imports anything, so Triton kernels run in its interpreter on machines
without a CUDA GPU.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
