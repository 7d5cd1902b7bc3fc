"""Fused CPU kernel for Mamba's selective scan (Gu & Dao 2023, eq. 2a-2b with the eq. 4
discretisation), a C++ source built with torch.utils.cpp_extension at first use.

Per batch row b and channel e the kernel walks time once with the state h (N,) in cache:

    h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t,    y_t = (C_t · h_t + D u_t) · SiLU(z_t),

so no (B, T, E, N) tensor is ever materialised (every such eager op costs a full memory pass,
which is what makes the loop and the parallel scan slow on CPU). Channels are processed in
SIMD-width blocks (16 float32 / 8 float64 lanes; `exp` is an inlined polynomial the compiler
vectorises) and (b, channel-block) pairs are spread over OpenMP threads. With gradients the
forward also stores h every `CHUNK` steps, (B, T/CHUNK, N, E); the backward walks time in
reverse one chunk at a time, recomputing that chunk's states from its checkpoint into a small
buffer, so the backward costs about two forwards and O(B·T·N·E / CHUNK) extra memory. dB and
dC (sums over channels) and dA, dD (sums over batch and time) go to per-thread buffers that are
added up at the end, so threads never race. Asked for it (`return_last_state`, what
`SelectiveSSM.prefill` needs to decode on from a prompt), the forward also writes the state
after the last step, (B, N, E); it carries no gradient.

Build: the C++ source `csrc/selective_scan_cpu.cpp` (shipped with the package) is compiled with
`-O3 -march=native -ffast-math -fopenmp` by `torch.utils.cpp_extension.load` on first use and
cached in torch's extension folder, under a name keyed by the source and CPU; later processes
load it in milliseconds. The library has plain C entry points loaded with ctypes (no Python or
torch headers, a few seconds to build), called inside the operators `advarch::selective_scan_cpu`
and its backward (`torch.library.custom_op`), which torch.compile keeps whole in the graph.
`load_library()` returns None (after one warning line) when there is no compiler or the build
fails; callers then use the pure-PyTorch parallel scan.

Shape legend: B batch, T time, E inner channels, N state size.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
from torch import Tensor
from torch.utils import cpp_extension

CHUNK = 64  # time steps between saved states; must equal kChunk in csrc/selective_scan_cpu.cpp

SOURCE = Path(__file__).with_name("csrc") / "selective_scan_cpu.cpp"
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
LDFLAGS = ["-fopenmp"]  # -ffast-math stays off the link line (see `load_library`)
log = logging.getLogger(__name__)


def _build_key() -> str:
    """Short hash of the source and the CPU model and flags, naming the build folder.

    -march=native code is only valid on this CPU (a home folder may be shared between machines),
    and torch keeps one build per name: with the source in the name, checkouts with different
    kernels never rebuild over each other's library.
    """
    cpu = platform.processor() + platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu += "".join(x for x in lines if x.startswith(("model name", "flags")))[:4096]
    return hashlib.sha256(SOURCE.read_bytes() + cpu.encode()).hexdigest()[:12]


def _build() -> str:
    """Build SOURCE with torch.utils.cpp_extension (quietly) and return the library's path.

    torch caches the build in its extension folder (`TORCH_EXTENSIONS_DIR`, default
    ~/.cache/torch_extensions), rebuilds when the flags change, and serialises concurrent first
    uses (pytest-xdist workers) with a lock file. Compile and link are separate
    ninja steps, so -ffast-math never reaches the link: gcc < 13 would link crtfastmath.o and
    switch the whole process to flush-to-zero.
    """
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set CXX)")
    with warnings.catch_warnings():  # torch warns about compiler versions/ABI: not our message
        warnings.simplefilter("ignore")
        torch_log = logging.getLogger("torch.utils.cpp_extension")
        level = torch_log.level
        torch_log.setLevel(logging.CRITICAL)
        try:
            return cpp_extension.load(
                name=f"advarch_selective_scan_{_build_key()}",
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                extra_ldflags=LDFLAGS,
                is_python_module=False,
                verbose=False,
            )
        finally:
            torch_log.setLevel(level)


@functools.cache
def load_library() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use, then cached on disk), or None if unavailable.

    A failed build (no compiler, no ninja, a compile error) logs one warning line and returns
    None; callers then use the pure-PyTorch parallel scan. Set ADVARCH_NO_CPU_KERNEL=1 to force
    that fallback.
    """
    if os.environ.get("ADVARCH_NO_CPU_KERNEL") == "1":
        return None
    try:
        lib = ctypes.CDLL(_build())
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning(
            "advarch: fused CPU selective scan unavailable, using the parallel scan: %s", reason
        )
        log.debug("kernel build failed:\n%s", err)
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.ssm_chunk.restype = i64
    if lib.ssm_chunk() != CHUNK:
        raise RuntimeError(f"kernel chunk {lib.ssm_chunk()} != CHUNK={CHUNK}")
    for suffix in ("f32", "f64"):
        getattr(lib, f"ssm_forward_{suffix}").argtypes = [ptr] * 10 + [i64] * 4 + [ctypes.c_int]
        getattr(lib, f"ssm_backward_{suffix}").argtypes = [ptr] * 16 + [i64] * 4 + [ctypes.c_int]
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _suffix(t: torch.Tensor) -> str:
    return {torch.float32: "f32", torch.float64: "f64"}[t.dtype]


@torch.compiler.assume_constant_result
def kernel_available() -> bool:
    """Whether the fused kernel loaded here (`load_library()` is not None); a constant of the
    graph under torch.compile, which cannot trace the loader."""
    return load_library() is not None


@torch.library.custom_op("advarch::selective_scan_cpu", mutates_args=())
def _scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                  z: Tensor | None, save_states: bool,
                  last_state: bool = False) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """y = (C·h + D u)·SiLU(z) by the fused kernel; with ``save_states`` h every CHUNK
    steps (B, ceil(T / CHUNK), N, E) for the backward, with ``last_state`` the state after
    the last step (B, N, E) for decoding (each an empty tensor otherwise). An operator, so
    that torch.compile keeps a model with this scan in one graph."""
    y, ckpt, last = _scan_outputs(u, A, save_states, last_state)
    lib, (batch, length, inner), state = load_library(), u.shape, A.shape[1]
    getattr(lib, f"ssm_forward_{_suffix(u)}")(
        *map(_ptr, (u, delta, A, B, C, D, z, y, ckpt if save_states else None,
                    last if last_state else None)),
        batch, length, inner, state, torch.get_num_threads(),
    )  # fmt: skip
    return y, ckpt, last


@_scan_forward.register_fake
def _(u, delta, A, B, C, D, z, save_states, last_state=False):
    return _scan_outputs(u, A, save_states, last_state)


def _scan_outputs(
    u: Tensor, A: Tensor, save_states: bool, last_state: bool
) -> tuple[Tensor, Tensor, Tensor]:
    batch, length, inner = u.shape
    ckpt_shape = (batch, -(-length // CHUNK), A.shape[1], inner) if save_states else (0,)
    last_shape = (batch, A.shape[1], inner) if last_state else (0,)
    return torch.empty_like(u), u.new_empty(ckpt_shape), u.new_empty(last_shape)


@torch.library.custom_op("advarch::selective_scan_cpu_backward", mutates_args=())
def _scan_backward(grad_y: Tensor, u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
                   D: Tensor, z: Tensor | None, ckpt: Tensor) -> list[Tensor]:  # fmt: skip
    """Gradients of `_scan_forward` for grad_y: du, dΔ, dA, dB, dC, dD and, with z, dz."""
    du, ddelta, dA, dB, dC, dD, dz = _scan_grads(u, delta, A, B, C, D, z)
    getattr(load_library(), f"ssm_backward_{_suffix(u)}")(
        *map(_ptr, (u, delta, A, B, C, D, z, ckpt, grad_y)),
        *map(_ptr, (du, ddelta, dA, dB, dC, dD, dz)),
        *u.shape, A.shape[1], torch.get_num_threads(),
    )  # fmt: skip
    return [du, ddelta, dA, dB, dC, dD, *([] if dz is None else [dz])]


@_scan_backward.register_fake
def _(grad_y, u, delta, A, B, C, D, z, ckpt):
    return [g for g in _scan_grads(u, delta, A, B, C, D, z) if g is not None]


def _scan_grads(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor,
                z: Tensor | None) -> list[Tensor | None]:  # fmt: skip
    """The kernel's gradient buffers: the summed ones (dA, dB, dC, dD) start at zero."""
    dz = None if z is None else torch.empty_like(z)
    return [torch.empty_like(u), torch.empty_like(delta),
            *(torch.zeros_like(t) for t in (A, B, C, D)), dz]  # fmt: skip


def _scan_setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, *_ = inputs
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)  # no zero gradients for the outputs only kept
    ctx.save_for_backward(u, delta, A, B, C, D, z, output[1])


def _scan_backward_autograd(ctx, grad_y: Tensor | None, _grad_ckpt: None, _grad_last: None):
    if grad_y is None:  # nothing flowed back into y (grads are not materialised)
        return (None,) * 9
    u, delta, A, B, C, D, z, ckpt = ctx.saved_tensors
    grads = _scan_backward(grad_y.contiguous(), u, delta, A, B, C, D, z, ckpt)
    return *grads, *([None] if z is None else []), None, None


_scan_forward.register_autograd(_scan_backward_autograd, setup_context=_scan_setup_context)


def fused_selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor | None = None,
    return_last_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Selective scan by the fused kernel (CPU, float32/float64, `load_library()` not None).

    Same arguments and result as `advarch.models.blocks.ssm.selective_scan_reference`; every
    input is cast to the dtype of `u` and made contiguous.
    """
    dtype = u.dtype
    u, delta, A, B, C, D = (t.to(dtype).contiguous() for t in (u, delta, A, B, C, D))
    z = None if z is None else z.to(dtype).contiguous()
    inputs = (u, delta, A, B, C, D, z)
    save = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    y, _, last = _scan_forward(*inputs, save, return_last_state)
    return (y, last.transpose(1, 2)) if return_last_state else y
