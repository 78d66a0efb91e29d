"""Compile every Triton kernel variant the model launches for NVIDIA targets without a GPU (Triton's
own compiler and ptxas), specialised as the launchers' real calls are (dtypes, constexprs, and
the 16-divisibility Triton gives aligned pointers and integers such as C = 768 or the padded
vocabulary 50304), and check what it compiles to:

- 128-bit global loads and stores (`ld.global.v4` / `st.global.v4`) where a kernel streams a
  large tensor (the whole point of aligned layouts);
- no fp64 instruction in a per-element kernel (a consumer card runs fp64 at 1/64 of fp32);
- the hardware's FP8 conversion (`cvt...e4m3x2` / `e5m2x2`, sm_89 and later) where a kernel casts
  to FP8, not a software emulation;
- no local-memory spills, and registers per thread within the ceiling stated per kernel.

Run by tests/test_gpu_compile.py in a process without TRITON_INTERPRET; a broken property fails CI.

    python tests/gpu_compile.py        # one line per kernel, target and variant
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
fp8 = importlib.import_module("kernels.fp8")
from kernels._utils import row_block_settings  # noqa: E402

CUDA = torch.device("cuda")  # launch settings as the launchers choose them on a GPU
TARGETS = {"sm_89 (RTX 40xx)": GPUTarget("cuda", 89, 32), "sm_90 (H100/H200)": GPUTarget("cuda", 90, 32)}


def expect(vector_loads: bool, vector_stores: bool, fp64_allowed: bool = False, max_registers: int = 128,
           fp8_convert: str | None = None, only_wide_loads: bool = False, pipelined: bool = False,
           max_barriers: int | None = None) -> dict:
    return {"vector_loads": vector_loads, "vector_stores": vector_stores, "fp64_allowed": fp64_allowed,
            "max_registers": max_registers, "fp8_convert": fp8_convert, "only_wide_loads": only_wide_loads,
            "pipelined": pipelined, "max_barriers": max_barriers}


# LayerNorm backward's barriers (bar.sync) up to 2048 wide, all of them (Triton 3.9, sm_89 and
# sm_90): a guard against a change that adds a shared-memory round trip to the row loop. (One
# joint reduction of the row's two sums would make it 10, but Triton's interpreter runs a tuple
# reduction ~250x slower than tl.sum, which the CPU suite cannot afford.)
BWD_BARRIERS = 11


def pointers_and(signature: dict, *ints: str) -> list[str]:
    """The arguments a launch specialises as divisible by 16: every pointer (torch allocates at 512
    bytes) and the named integers (strides and widths that are multiples of 16 in the model)."""
    return [k for k, v in signature.items() if isinstance(v, str) and v.startswith("*")] + list(ints)


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
        for block, rms in ((1024, False), (2048, False), (8192, False), (1024, True), (2048, True)):
            meta = {"HAS_RESIDUAL": residual, "HAS_BIAS": not rms, "RMS": rms, "BLOCK_ROWS": 1, "BLOCK_SIZE": block,
                    "INTERPRETED": False}
            constexprs = dict(meta) if residual else dict(meta, res_ptr=None, s_ptr=None)
            sig = dict(signature, **{k: "constexpr" for k in meta})
            if rms:  # RMSNorm has no bias: the launcher passes None
                sig["b_ptr"], constexprs["b_ptr"] = "constexpr", None
            _, _, num_warps = row_block_settings(block, 4 if stream_ty == "fp32" else 2, CUDA)
            yield (f"{'rms' if rms else 'layer'}_norm fwd x={x_ty} stream={stream_ty} C<={block} warps={num_warps}",
                   layernorm._layer_norm_fwd_kernel, sig, constexprs, num_warps,
                   pointers_and(signature, "stride_x_row", "stride_res_row", "stride_s_row", "stride_y_row", "n_cols"),
                   expect(True, True, max_registers=128))
    for dy_ty, s_ty, x_ty in (("bf16", "fp32", "bf16"), ("fp32", "fp32", "fp32"), ("bf16", "bf16", "bf16")):
        has_dx = x_ty != s_ty
        signature = {
            "dy_ptr": f"*{dy_ty}", "ds_in_ptr": f"*{s_ty}", "s_ptr": f"*{s_ty}", "w_ptr": "*fp32",
            "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "ds_ptr": f"*{s_ty}",
            "dx_ptr": f"*{x_ty}" if has_dx else "constexpr", "dw_partial_ptr": "*fp32", "db_partial_ptr": "*fp32",
            "stride_dy_row": "i64", "stride_ds_in_row": "i64", "stride_s_row": "i64", "stride_ds_row": "i64",
            "stride_dx_row": "i64", "stride_partial_row": "i64", "n_rows": "i32", "n_cols": "i32",
            "rows_per_program": "i32",
        }
        for block, rms in ((1024, False), (2048, False), (8192, False), (1024, True), (2048, True)):
            meta = {"HAS_DS_IN": True, "HAS_DX": has_dx, "HAS_BIAS": not rms, "RMS": rms, "BLOCK_ROWS": 1,
                    "BLOCK_SIZE": block, "INTERPRETED": False, "NUM_STAGES": layernorm.bwd_stages(block)}
            constexprs = dict(meta) if has_dx else dict(meta, dx_ptr=None)
            sig = dict(signature, **{k: "constexpr" for k in meta})
            if rms:  # no bias: no dB partials
                sig["db_partial_ptr"], constexprs["db_partial_ptr"] = "constexpr", None
            size = {"bf16": 2, "fp32": 4}
            _, _, num_warps = layernorm.bwd_block_settings(block, size[s_ty], size[dy_ty], CUDA)
            yield (f"{'rms' if rms else 'layer'}_norm bwd dy={dy_ty} s={s_ty} C<={block} warps={num_warps}",
                   layernorm._layer_norm_bwd_kernel, sig, constexprs, num_warps,
                   pointers_and(signature, "stride_dy_row", "stride_ds_in_row", "stride_s_row", "stride_ds_row",
                                "stride_dx_row", "stride_partial_row", "n_cols"),
                   # every streamed access 128-bit (the bf16 dy too); up to 2048 wide the row loop
                   # pipelined through cp.async, and no more barriers than BWD_BARRIERS
                   expect(True, True, max_registers=168, only_wide_loads=True, pipelined=block <= 2048,
                          max_barriers=BWD_BARRIERS if block <= 2048 else None))


def cross_entropy_cases():
    signature = {
        "logits_ptr": None, "targets_ptr": "*i64", "lse_ptr": "*fp32", "loss_ptr": "*fp32", "grad_ptr": None,
        "grad_output_ptr": "*fp32", "n_valid_ptr": "*fp32", "stride_logits_row": "i64", "stride_grad_row": "i64",
        "n_cols": "i32", "n_classes": "i32", "ignore_index": "i64", "softcap": "fp32", "inv_softcap": "fp32",
    }
    for dtype in ("bf16", "fp32", "fp16"):
        for has_lse, write_loss, grad, per_row, mean, cap in (
                (False, True, False, False, False, False),  # forward
                (True, False, True, False, True, False),  # backward, mean
                (True, False, True, True, False, False),  # backward, none
                (False, True, True, False, True, False),  # fused, in place
                (False, True, True, False, True, True),  # fused, in place, soft cap (the modern arch)
                (True, False, True, True, False, True)):  # backward, none, soft cap
            meta = {"HAS_LSE": has_lse, "WRITE_LOSS": write_loss, "COMPUTE_GRAD": grad,
                    "GRAD_OUTPUT_PER_ROW": per_row, "MEAN": mean, "SOFTCAP": cap, "BLOCK_V": 4096,
                    "INTERPRETED": False}
            sig = dict(signature, logits_ptr=f"*{dtype}", grad_ptr=f"*{dtype}" if grad else "constexpr",
                       **{k: "constexpr" for k in meta})
            constexprs = dict(meta) if grad else dict(meta, grad_ptr=None)
            # the model's call: rows of the padded vocabulary (50304 = 16 x 3144), so the row
            # stride and width specialise as divisible by 16; n_classes (50257) does not
            yield (f"cross_entropy {dtype} lse_given={has_lse} loss={write_loss} grad={grad} per_row={per_row} "
                   f"softcap={cap}",
                   cross_entropy._cross_entropy_kernel, sig, constexprs, 8,
                   pointers_and(sig, "stride_logits_row", "stride_grad_row", "n_cols"),
                   expect(True, grad, max_registers=96))


def adamw_cases():
    import triton.language as tl

    tables = {"block_tensor_ptr": "*i32", "block_start_ptr": "*i64", "numel_ptr": "*i64"}
    for grad_ty, tl_ty in (("fp32", tl.float32), ("bf16", tl.bfloat16), ("fp16", tl.float16)):
        meta = {"GRAD_DTYPE": tl_ty, "BLOCK": 4096}
        signature = dict({"grad_addr_ptr": "*i64", "partial_ptr": "*fp32"}, **tables, **{k: "constexpr" for k in meta})
        yield (f"grad_sq_norm grads={grad_ty}", adamw._grad_sq_norm_kernel, signature, meta, 8,
               pointers_and(signature), expect(True, False, max_registers=128))
        meta = {"GRAD_DTYPE": tl_ty, "FACTORS": adamw.FACTORS, "BLOCK": 4096}
        signature = {
            "param_addr_ptr": "*i64", "grad_addr_ptr": "*i64", "exp_avg_addr_ptr": "*i64",
            "exp_avg_sq_addr_ptr": "*i64", **tables, "factors_ptr": "*fp32", **{k: "constexpr" for k in meta},
        }
        yield (f"adamw grads={grad_ty}", adamw._adamw_kernel, signature, meta, 8, pointers_and(signature),
               expect(True, True, max_registers=128))
    for clip in (False, True):
        meta = {"CLIP": clip, "FACTORS": adamw.FACTORS, "BLOCK_T": 256}
        signature = {"step_addr_ptr": "*i64", "group_ptr": "*i32", "hyper_ptr": "*fp64",
                     "norm_ptr": "*fp32" if clip else "constexpr", "factors_ptr": "*fp32", "n_tensors": "i32",
                     "max_norm": "fp32", **{k: "constexpr" for k in meta}}
        # one program per step, once: its fp64 is the point (bias corrections as torch computes them)
        yield (f"adamw prep clip={clip}", adamw._adamw_prep_kernel, signature,
               dict(meta) if clip else dict(meta, norm_ptr=None), 4, pointers_and(signature),
               expect(False, False, fp64_allowed=True, max_registers=255))


def fp8_cases():
    block_m, block_n, num_warps = fp8.cast_blocks(CUDA)
    for x_ty in ("bf16", "fp32"):
        signature = {"x_ptr": f"*{x_ty}", "amax_ptr": "*fp32", "n_rows": "i32", "n_cols": "i32",
                     "stride_row": "i64", "stride_col": "i64", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr"}
        yield (f"fp8 amax x={x_ty}", fp8._amax_kernel, signature, {"BLOCK_M": block_m, "BLOCK_N": block_n,
                                                                    "stride_col": 1}, num_warps,
               pointers_and(signature, "n_cols", "stride_row"), expect(True, False, max_registers=64))
        for dtype, fmt, convert in ((torch.float8_e4m3fn, "fp8e4nv", "e4m3x2"), (torch.float8_e5m2, "fp8e5", "e5m2x2")):
            for transpose in (False, True):
                mbits, min_exp = fp8.FORMATS[dtype]
                meta = {"FP8_MAX": torch.finfo(dtype).max, "MBITS": mbits, "MIN_EXP": min_exp, "TRANSPOSE": transpose,
                        "INTERPRETED": False, "BLOCK_M": block_m, "BLOCK_N": block_n}
                signature = {"x_ptr": f"*{x_ty}", "amax_ptr": "*fp32", "out_ptr": f"*{fmt}",
                             "out_t_ptr": f"*{fmt}" if transpose else "constexpr", "inv_ptr": "*fp32",
                             "n_rows": "i32", "n_cols": "i32", "stride_row": "i64", "stride_col": "constexpr",
                             **{k: "constexpr" for k in meta}}
                constexprs = dict(meta, stride_col=1, **({} if transpose else {"out_t_ptr": None}))
                # the model's shapes: rows and widths multiples of 16 (768, 3072, 50304, micro-batch x 1024)
                yield (f"fp8 cast x={x_ty} to {convert[:4]} transpose={transpose}", fp8._cast_kernel, signature,
                       constexprs, num_warps, pointers_and(signature, "n_rows", "n_cols", "stride_row"),
                       expect(True, True, max_registers=128, fp8_convert=convert))


def ptxas_report(ptx: str, arch: int) -> tuple[int, int]:
    """(registers per thread, spill bytes), as ptxas reports them for this PTX."""
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
    return int(regs.group(1)) if regs else -1, int(spills.group(1)) if spills else -1


def ptx_properties(ptx: str) -> dict:
    """What a kernel's PTX does: 128-bit global accesses, fp64 instructions."""
    return {"vector_loads": bool(re.search(r"\bld\.global(\.\w+)*\.v4\.", ptx)),
            "vector_stores": bool(re.search(r"\bst\.global(\.\w+)*\.v4\.", ptx)),
            "fp64": len(re.findall(r"^\s*[a-z][\w.]*\.f64\b", ptx, re.M)),
            "fp8_converts": set(re.findall(r"\bcvt\.rn\.satfinite\.(e4m3x2|e5m2x2)\.f32\b", ptx)),
            # 64-bit vector global loads, or 8-byte asynchronous copies (a pipelined loop's loads): a
            # streamed tensor read in narrower pieces than 16 B (per-row scalars are 4-byte copies)
            "narrow_vector_loads": len(re.findall(r"\bld\.global(\.\w+)*\.v2\.", ptx))
            + len(re.findall(r"\bcp\.async\.\w+\.shared\.global\s*\[[^]]*\],\s*\[[^]]*\],\s*0x8\b", ptx)),
            "async_copies": len(re.findall(r"\bcp\.async\.(ca|cg)\.shared\.global\b", ptx)),
            "barriers": len(re.findall(r"\bbar\.sync\b|\bbarrier\.sync\b", ptx))}


def violations(props: dict, registers: int, spills: int, expected: dict) -> list[str]:
    found = []
    if expected["vector_loads"] and not props["vector_loads"]:
        found.append("no 128-bit global loads")
    if expected["vector_stores"] and not props["vector_stores"]:
        found.append("no 128-bit global stores")
    if props["fp64"] and not expected["fp64_allowed"]:
        found.append(f"{props['fp64']} fp64 instructions")
    if expected["fp8_convert"] and expected["fp8_convert"] not in props["fp8_converts"]:
        found.append(f"no hardware {expected['fp8_convert']} conversion")
    if expected["only_wide_loads"] and props["narrow_vector_loads"]:
        found.append(f"{props['narrow_vector_loads']} 64-bit loads (ld.global.v2 or 8-byte cp.async)")
    if expected["pipelined"] and not props["async_copies"]:
        found.append("the row loop is not pipelined (no cp.async)")
    if expected["max_barriers"] is not None and props["barriers"] > expected["max_barriers"]:
        found.append(f"{props['barriers']} barriers > {expected['max_barriers']}")
    if spills != 0:
        found.append(f"{spills} bytes spilled")
    if registers > expected["max_registers"]:
        found.append(f"{registers} registers > ceiling {expected['max_registers']}")
    return found


def compile_case(fn, signature, constexprs, num_warps, divisible, target):
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible
             if signature.get(name) != "constexpr"}
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=target, options={"num_warps": num_warps})


def main() -> int:
    failures = 0
    for target_name, target in TARGETS.items():
        for name, fn, signature, constexprs, num_warps, divisible, expected in (
                *layer_norm_cases(), *cross_entropy_cases(), *adamw_cases(), *fp8_cases()):
            try:
                compiled = compile_case(fn, signature, constexprs, num_warps, divisible, target)
            except Exception as e:  # report every failing variant, not only the first
                failures += 1
                print(f"FAIL  {target_name:18s} {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                continue
            ptx = compiled.asm["ptx"]
            registers, spills = ptxas_report(ptx, target.arch)
            props = ptx_properties(ptx)
            problems = violations(props, registers, spills, expected)
            summary = (f"{registers} registers, {spills} B spilled, v4 ld/st {props['vector_loads']:d}/"
                       f"{props['vector_stores']:d}, fp64 {props['fp64']}")
            if problems:
                failures += 1
                print(f"FAIL  {target_name:18s} {name} ({summary}): {'; '.join(problems)}")
            else:
                print(f"ok    {target_name:18s} {name} ({summary})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
