"""advarch's Triton kernels (MoE routing and token moves, the selective scan) compile for an
H100/H200 (sm_90) on a machine without a GPU, at the tile shapes they launch with, and ptxas
spills no registers.

The interpreter tests check what the kernels compute; this checks what only the GPU compiler
sees (types, constexpr branches, layouts, register pressure). Triton compiles ahead of time
for a given target with its bundled ptxas, in a subprocess: the test package runs Triton's
interpreter, which replaces the kernels' compiler.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
pytest.importorskip("triton.backends.nvidia.compiler")

ROOT = Path(__file__).resolve().parents[3]

COMPILE = """
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import advarch.models.blocks.moe_permute_triton as permute
import advarch.models.blocks.moe_routing_triton as routing
import advarch.models.blocks.selective_scan_triton as scan
for module, name, signature, constexprs, warps in json.loads(sys.argv[1]):
    fn = getattr({"routing": routing, "permute": permute, "scan": scan}[module], name)
    print("== kernel", name, constexprs, flush=True)
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
"""


def _specs() -> list[tuple]:
    """(module, kernel, signature, constexprs, num_warps) of every launch shape family."""
    from advarch.models.blocks import moe_permute_triton as permute
    from advarch.models.blocks import moe_routing_triton as routing
    from advarch.models.blocks import selective_scan_triton as scan

    specs = []
    ptr = "*fp32"
    for experts, top_k in ((8, 2), (64, 1), (512, 3)):
        block_n, block_e = routing._tiles(experts)
        block_k = triton.next_power_of_2(top_k)
        tiles = {"BLOCK_N": block_n, "BLOCK_E": block_e}
        specs += [
            ("routing", "_route_fwd_kernel",
             {"logits_ptr": ptr, "bias_ptr": ptr, "expert_ptr": "*i64", "gates_ptr": ptr,
              "lse_ptr": ptr, "block_counts_ptr": "*i32", "partial_ptr": ptr, "N": "i32",
              "E": "i32", "K": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_N": "constexpr",
              "BLOCK_E": "constexpr", "BLOCK_K": "constexpr"},
             {"K": top_k, "HAS_BIAS": True, "BLOCK_K": block_k, **tiles}, 4),
            ("routing", "_route_finish_kernel",
             {"partial_ptr": ptr, "block_counts_ptr": "*i32", "block_start_ptr": "*i32",
              "counts_ptr": "*i32", "offsets_ptr": "*i32", "out_ptr": ptr, "blocks": "i32",
              "N": "i32", "E": "i32", "slots": "i32", "balance_weight": "fp32",
              "z_weight": "fp32", "BLOCK_B": "constexpr", "BLOCK_E": "constexpr"},
             {"BLOCK_B": max(2, routing.TILE // block_e), "BLOCK_E": block_e}, 4),
            ("routing", "_route_place_kernel",
             {"expert_ptr": "*i64", "block_start_ptr": "*i32", "counts_ptr": "*i32",
              "offsets_ptr": "*i32", "order_ptr": "*i64", "inverse_ptr": "*i64", "N": "i32",
              "E": "i32", "K": "constexpr", "BLOCK_N": "constexpr", "BLOCK_S": "constexpr",
              "BLOCK_E": "constexpr"},
             {"K": top_k, "BLOCK_S": block_n * block_k, **tiles}, 4),
            ("routing", "_route_bwd_kernel",
             {"logits_ptr": ptr, "lse_ptr": ptr, "expert_ptr": "*i64", "gates_ptr": ptr,
              "grad_gates_ptr": ptr, "grad_aux_ptr": ptr, "load_ptr": ptr,
              "grad_logits_ptr": ptr, "N": "i32", "E": "i32", "balance_scale": "fp32",
              "z_scale": "fp32", "K": "constexpr", "HAS_GATES": "constexpr",
              "HAS_AUX": "constexpr", "BLOCK_N": "constexpr", "BLOCK_E": "constexpr"},
             {"K": top_k, "HAS_GATES": True, "HAS_AUX": True, **tiles}, 4),
        ]  # fmt: skip
    rows = {"K": 2, "BLOCK_R": permute.BLOCK_R, "BLOCK_D": permute.BLOCK_D}
    for x, dtype in (("*fp32", "*bf16"), ("*fp32", "*fp32")):
        specs += [
            ("permute", "_gather_rows_kernel",
             {"x_ptr": x, "order_ptr": "*i64", "xs_ptr": dtype, "S": "i32", "D": "i32",
              "K": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
             rows, permute.NUM_WARPS),
            ("permute", "_combine_kernel",
             {"out_ptr": dtype, "inverse_ptr": "*i64", "gates_ptr": ptr, "y_ptr": dtype,
              "N": "i32", "D": "i32", "K": "constexpr", "HAS_GATES": "constexpr",
              "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
             {**rows, "HAS_GATES": True}, permute.NUM_WARPS),
            ("permute", "_combine_backward_kernel",
             {"grad_y_ptr": dtype, "out_ptr": dtype, "gates_ptr": ptr, "order_ptr": "*i64",
              "grad_out_ptr": dtype, "grad_gates_ptr": ptr, "S": "i32", "D": "i32",
              "K": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"},
             rows, permute.NUM_WARPS),
        ]  # fmt: skip
    tiles = {"CHUNK": scan.CHUNK, "BLOCK_E": scan.BLOCK_E, "BLOCK_N": 16}  # state 16
    for x in ("*fp32", "*bf16"):
        inputs = {"u_ptr": x, "dt_ptr": x, "A_ptr": ptr, "B_ptr": x, "C_ptr": x}
        sizes = {"T": "i32", "E": "i32", "N": "i32", "n_chunks": "i32"}
        specs += [
            ("scan", "_fwd_kernel",
             {**inputs, "y_ptr": ptr, "hs_ptr": ptr, "last_ptr": ptr, **sizes,
              "SAVE": "constexpr", "LAST": "constexpr", "CHUNK": "constexpr",
              "BLOCK_E": "constexpr", "BLOCK_N": "constexpr"},
             {"SAVE": True, "LAST": True, **tiles}, scan.NUM_WARPS),
            ("scan", "_bwd_kernel",
             {**inputs, "dy_ptr": ptr, "hs_ptr": ptr, "du_ptr": ptr, "ddt_ptr": ptr,
              "dA_ptr": ptr, "dB_ptr": ptr, "dC_ptr": ptr, **sizes, "CHUNK": "constexpr",
              "BLOCK_E": "constexpr", "BLOCK_N": "constexpr"},
             tiles, scan.NUM_WARPS),
        ]  # fmt: skip
    return specs


def test_triton_kernels_compile_for_sm90_without_spills(tmp_path: Path) -> None:
    specs = _specs()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_DUMP_PTXAS_LOG="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(specs)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    logs = done.stdout.split("== kernel ")[1:]
    assert len(logs) == len(specs)
    for log in logs:
        spills = re.findall(r"(\d+) bytes spill stores", log)
        assert spills and all(n == "0" for n in spills), log
