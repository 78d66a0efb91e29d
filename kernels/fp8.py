"""Tensorwise FP8 casts for `torch._scaled_mm`: a 2-D tensor's absolute maximum, then its copy in
e4m3 or e5m2 scaled so that maximum maps to the format's largest value, with the fp32 inverse scale
the matmul takes (and, in the same pass, the transposed copy a backward matmul wants).

Math (the reference is gptfast.fp8.reference_to_fp8): amax = max |x| (at least AMAX_FLOOR, so an
all-zero tensor has a finite scale), scale = fp8_max / amax, fp8 = round_to_nearest_even(clamp(x *
scale, -fp8_max, fp8_max)), inverse = 1 / scale, every operation in fp32 as torch rounds it: the
result is bitwise the reference's.

Two passes, since a dynamic scale needs the whole tensor's amax before the first element is cast:
- `_amax_kernel` reads x once; each program reduces its tile and folds it into one fp32 with an
  atomic max (order-independent, so deterministic);
- `_cast_kernel` reads x again and writes the FP8 copy, row-major (M, N), and with TRANSPOSE also
  row-major (N, M): a column-major operand for `_scaled_mm` without a second pass over the copy.
A bf16 tensor costs 2 + 2 B read and 1 (+ 1) B written per element. PyTorch's eager ops for the same
cast (abs, amax, multiply, clamp, convert, transpose copy) move ~30 B per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import check_tensors, interpreted

AMAX_FLOOR = tl.constexpr(1e-12)  # as gptfast.fp8's reference: the scale of an all-zero tensor stays finite
FORMATS = {torch.float8_e4m3fn: (3, -6), torch.float8_e5m2: (2, -14)}  # (mantissa bits, smallest normal exponent)


@triton.jit
def _round_to_fp8_grid(x, MBITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """x (fp32, within the format's range) rounded to the nearest value the FP8 format holds, ties to
    even, still in fp32: normal values keep MBITS mantissa bits (the carry into the exponent is
    the integer add's), subnormal ones are multiples of 2^(MIN_EXP - MBITS) (rounded by the fp32
    add of 2^23, exact in that range). Only the interpreter needs it: its own fp32 -> fp8
    conversion rounds wrongly where the mantissa carries into the exponent."""
    a = tl.abs(x)
    shift: tl.constexpr = 23 - MBITS
    bits = a.to(tl.uint32, bitcast=True)
    bits = ((bits + ((1 << (shift - 1)) - 1) + ((bits >> shift) & 1)) >> shift) << shift
    normal = bits.to(tl.float32, bitcast=True)
    step: tl.constexpr = 2.0 ** (MIN_EXP - MBITS)
    inv_step: tl.constexpr = 2.0 ** (MBITS - MIN_EXP)
    sub = ((a * inv_step + 8388608.0) - 8388608.0) * step
    r = tl.where(a < 2.0 ** MIN_EXP, sub, normal).to(tl.uint32, bitcast=True)
    sign = x.to(tl.uint32, bitcast=True) & 0x80000000  # -0.0 stays -0.0
    return (r | sign).to(tl.float32, bitcast=True)


@triton.jit
def _amax_kernel(x_ptr, amax_ptr, n_rows, n_cols, stride_row, stride_col,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    tl.atomic_max(amax_ptr, tl.max(tl.max(tl.abs(x.to(tl.float32)), axis=1), axis=0))


@triton.jit
def _cast_kernel(x_ptr, amax_ptr, out_ptr, out_t_ptr, inv_ptr, n_rows, n_cols, stride_row, stride_col,
                 FP8_MAX: tl.constexpr, MBITS: tl.constexpr, MIN_EXP: tl.constexpr, TRANSPOSE: tl.constexpr,
                 INTERPRETED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    fp8_max = tl.full((), FP8_MAX, tl.float32)
    scale = tl.math.div_rn(fp8_max, tl.maximum(tl.load(amax_ptr), AMAX_FLOOR))  # IEEE division, as torch's
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_row + cols[None, :] * stride_col, mask=mask, other=0.0)
    y = tl.minimum(tl.maximum(x.to(tl.float32) * scale, -fp8_max), fp8_max)
    if INTERPRETED:
        y = _round_to_fp8_grid(y, MBITS, MIN_EXP)
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None].to(tl.int64) * n_cols + cols[None, :], y, mask=mask)
    if TRANSPOSE:
        tl.store(out_t_ptr + cols[:, None].to(tl.int64) * n_rows + rows[None, :], tl.trans(y), mask=tl.trans(mask))
    if (pid_m == 0) & (pid_n == 0):
        tl.store(inv_ptr, tl.math.div_rn(tl.full((), 1.0, tl.float32), scale))


def cast_blocks(device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): 64 x 128 tiles on a GPU (16 KiB of bf16, 16 B per thread per
    access at 8 warps); the interpreter runs programs one after another, so there tiles are larger."""
    if interpreted(device):
        return 128, 256, 1
    return 64, 128, 8


@torch.library.custom_op("gptfast::fp8_cast", mutates_args=())
def _fp8_cast_op(x: torch.Tensor, dtype: torch.dtype, transpose: bool
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_tensors("to_fp8", x)
    n_rows, n_cols = x.shape
    device = x.device
    amax = torch.zeros((), dtype=torch.float32, device=device)
    out = torch.empty(n_rows, n_cols, dtype=dtype, device=device)
    out_t = torch.empty((n_cols, n_rows) if transpose else (0,), dtype=dtype, device=device)
    inverse = torch.empty((), dtype=torch.float32, device=device)
    block_m, block_n, num_warps = cast_blocks(device)
    grid = (triton.cdiv(max(n_rows, 1), block_m), triton.cdiv(max(n_cols, 1), block_n))
    _amax_kernel[grid](x, amax, n_rows, n_cols, x.stride(0), x.stride(1), BLOCK_M=block_m, BLOCK_N=block_n,
                       num_warps=num_warps)
    mbits, min_exp = FORMATS[dtype]
    _cast_kernel[grid](x, amax, out, out_t if transpose else None, inverse, n_rows, n_cols, x.stride(0), x.stride(1),
                       FP8_MAX=torch.finfo(dtype).max, MBITS=mbits, MIN_EXP=min_exp, TRANSPOSE=transpose,
                       INTERPRETED=interpreted(device), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps)
    return out, out_t, inverse


@_fp8_cast_op.register_fake
def _(x, dtype, transpose):
    n_rows, n_cols = x.shape
    return (x.new_empty((n_rows, n_cols), dtype=dtype),
            x.new_empty((n_cols, n_rows) if transpose else (0,), dtype=dtype),
            x.new_empty((), dtype=torch.float32))


def to_fp8(x: torch.Tensor, dtype: torch.dtype, transpose: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(x (M, N) in `dtype` scaled tensorwise, row-major; its transpose (N, M) row-major when
    `transpose`, else None; the fp32 inverse scale, shape ()). x may be any float dtype and strided.
    Not differentiable: the FP8 matmuls' autograd (gptfast.fp8) calls it in forward and backward."""
    if dtype not in FORMATS:
        raise ValueError(f"to_fp8: dtype must be float8_e4m3fn or float8_e5m2, got {dtype}")
    if x.dim() != 2:
        raise ValueError(f"to_fp8: x must be 2-D, got shape {tuple(x.shape)}")
    out, out_t, inverse = _fp8_cast_op(x, dtype, transpose)
    return out, out_t if transpose else None, inverse
