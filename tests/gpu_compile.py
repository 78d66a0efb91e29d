"""Compile every Triton kernel for NVIDIA targets without a GPU (Triton's own compiler and ptxas),
catching what the interpreter cannot: type errors in compiled-only paths, unsupported ops,
register-file overflow. Run by tests/test_gpu_compile.py in a process without TRITON_INTERPRET.

    python tests/gpu_compile.py        # prints one line per kernel, target and variant
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run without TRITON_INTERPRET: the interpreter replaces the compiler")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

import torch  # noqa: E402

import importlib  # noqa: E402

# importlib, because `kernels.cross_entropy` as an attribute is the function the package exports
cross_entropy = importlib.import_module("kernels.cross_entropy")
layernorm = importlib.import_module("kernels.layernorm")
adamw = importlib.import_module("kernels.adamw")
from kernels._utils import row_block_settings  # noqa: E402

CUDA = torch.device("cuda")  # launch settings as the launchers choose them on a GPU
TARGETS = {"sm_89 (RTX 40xx)": GPUTarget("cuda", 89, 32), "sm_90 (H100/H200)": GPUTarget("cuda", 90, 32)}


def layer_norm_cases():
    for x_ty, stream_ty, y_ty, residual in (("bf16", "fp32", "bf16", True), ("fp32", "fp32", "fp32", True),
                                            ("bf16", "bf16", "bf16", False), ("fp16", "fp16", "fp16", True)):
        signature = {
            "x_ptr": f"*{x_ty}", "res_ptr": f"*{stream_ty}" if residual else "constexpr",
            "s_ptr": f"*{stream_ty}" if residual else "constexpr", "y_ptr": f"*{y_ty}",
            "w_ptr": "*fp32", "b_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32",
            "stride_x_row": "i64", "stride_res_row": "i64", "stride_s_row": "i64", "stride_y_row": "i64",
            "n_rows": "i32", "n_cols": "i32", "eps": "fp32",
        }
        for block in (1024, 2048, 8192):
            meta = {"HAS_RESIDUAL": residual, "HAS_BIAS": True, "BLOCK_ROWS": 1, "BLOCK_SIZE": block,
                    "INTERPRETED": False}
            constexprs = dict(meta) if residual else dict(meta, res_ptr=None, s_ptr=None)
            _, _, num_warps = row_block_settings(block, 4 if stream_ty == "fp32" else 2, CUDA)
            yield (f"layer_norm fwd x={x_ty} stream={stream_ty} C<={block} warps={num_warps}",
                   layernorm._layer_norm_fwd_kernel, dict(signature, **{k: "constexpr" for k in meta}),
                   constexprs, num_warps)
    for dy_ty, s_ty, x_ty in (("bf16", "fp32", "bf16"), ("fp32", "fp32", "fp32"), ("bf16", "bf16", "bf16")):
        has_dx = x_ty != s_ty
        signature = {
            "dy_ptr": f"*{dy_ty}", "ds_in_ptr": f"*{s_ty}", "s_ptr": f"*{s_ty}", "w_ptr": "*fp32",
            "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "ds_ptr": f"*{s_ty}",
            "dx_ptr": f"*{x_ty}" if has_dx else "constexpr", "dw_partial_ptr": "*fp32", "db_partial_ptr": "*fp32",
            "stride_dy_row": "i64", "stride_ds_in_row": "i64", "stride_s_row": "i64", "stride_ds_row": "i64",
            "stride_dx_row": "i64", "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32",
        }
        for block in (1024, 2048, 8192):
            meta = {"HAS_DS_IN": True, "HAS_DX": has_dx, "HAS_BIAS": True, "BLOCK_ROWS": 1, "BLOCK_SIZE": block,
                    "INTERPRETED": False}
            constexprs = dict(meta) if has_dx else dict(meta, dx_ptr=None)
            _, _, num_warps = row_block_settings(block, 4 if s_ty == "fp32" else 2, CUDA)
            yield (f"layer_norm bwd dy={dy_ty} s={s_ty} C<={block} warps={num_warps}",
                   layernorm._layer_norm_bwd_kernel, dict(signature, **{k: "constexpr" for k in meta}),
                   constexprs, num_warps)


def cross_entropy_cases():
    signature = {
        "logits_ptr": None, "targets_ptr": "*i64", "lse_ptr": "*fp32", "loss_ptr": "*fp32", "grad_ptr": None,
        "grad_output_ptr": "*fp32", "n_valid_ptr": "*fp32", "stride_logits_row": "i64", "stride_grad_row": "i64",
        "n_cols": "i32", "ignore_index": "i64",
    }
    for dtype in ("bf16", "fp32", "fp16"):
        for has_lse, write_loss, grad, per_row, mean in ((False, True, False, False, False),  # forward
                                                         (True, False, True, False, True),  # backward, mean
                                                         (True, False, True, True, False),  # backward, none
                                                         (False, True, True, False, True)):  # fused, in place
            meta = {"HAS_LSE": has_lse, "WRITE_LOSS": write_loss, "COMPUTE_GRAD": grad,
                    "GRAD_OUTPUT_PER_ROW": per_row, "MEAN": mean, "BLOCK_V": 4096, "INTERPRETED": False}
            sig = dict(signature, logits_ptr=f"*{dtype}", grad_ptr=f"*{dtype}" if grad else "constexpr",
                       **{k: "constexpr" for k in meta})
            constexprs = dict(meta) if grad else dict(meta, grad_ptr=None)
            yield (f"cross_entropy {dtype} lse_given={has_lse} loss={write_loss} grad={grad} per_row={per_row}",
                   cross_entropy._cross_entropy_kernel, sig, constexprs, 8)


def adamw_cases():
    import triton.language as tl

    tables = {"block_tensor_ptr": "*i32", "block_start_ptr": "*i64", "numel_ptr": "*i64"}
    for grad_ty, tl_ty in (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)):
        meta = {"GRAD_DTYPE": tl_ty, "BLOCK": 2048}
        yield (f"grad_sq_norm grads={grad_ty}", adamw._grad_sq_norm_kernel,
               dict({"grad_addr_ptr": "*i64", "partial_ptr": "*fp32"}, **tables, **{k: "constexpr" for k in meta}),
               meta, 8)
        for clip in (False, True):
            meta = {"GRAD_DTYPE": tl_ty, "CLIP": clip, "BLOCK": 2048}
            signature = {
                "param_addr_ptr": "*i64", "grad_addr_ptr": "*i64", "exp_avg_addr_ptr": "*i64",
                "exp_avg_sq_addr_ptr": "*i64", "step_addr_ptr": "*i64", "group_ptr": "*i32", "hyper_ptr": "*fp64",
                "norm_ptr": "*fp32" if clip else "constexpr", "max_norm": "fp32", **tables,
                **{k: "constexpr" for k in meta},
            }
            yield (f"adamw grads={grad_ty} clip={clip}", adamw._adamw_kernel, signature,
                   dict(meta) if clip else dict(meta, norm_ptr=None), 8)


def ptxas_report(ptx: str, arch: int) -> str:
    """Registers per thread and spill bytes, as ptxas reports them for this PTX."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path if hasattr(get_ptxas(arch), "path") else get_ptxas(arch)[0]
    target = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)  # sm_90a on Hopper, not sm_90
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(ptx)
        f.flush()
        out = subprocess.run([ptxas, f"-arch={target}", "-v", "-o", os.devnull, f.name],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", out)
    spills = re.search(r"(\d+) bytes spill stores", out)
    return f"{regs.group(1) if regs else '?'} registers, {spills.group(1) if spills else '?'} B spilled"


def main() -> int:
    failures = 0
    for target_name, target in TARGETS.items():
        for name, fn, signature, constexprs, num_warps in (*layer_norm_cases(), *cross_entropy_cases(),
                                                                    *adamw_cases()):
            source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs)
            try:
                compiled = triton.compile(source, target=target, options={"num_warps": num_warps})
                print(f"ok    {target_name:18s} {name} ({ptxas_report(compiled.asm['ptx'], target.arch)})")
            except Exception as e:  # report every failing variant, not only the first
                failures += 1
                print(f"FAIL  {target_name:18s} {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
