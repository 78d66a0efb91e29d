"""Fused LayerNorm and RMSNorm, each also with the residual add before it, forward and backward.

Math (over the last dimension, C elements per row, Ba et al. 2016):
    s = x + residual                      (add_* only; s is returned in residual's dtype)
    mean = sum(s) / C,  rstd = 1 / sqrt(sum((s - mean)^2) / C + eps)
    xhat = (s - mean) * rstd,  y = xhat * weight + bias
Backward, with g = dy * weight:
    ds = rstd * (g - mean(g) - xhat * mean(g * xhat)) + ds_in
    dweight = sum_rows(dy * xhat),  dbias = sum_rows(dy)
where ds_in is the gradient arriving at the returned sum s (the residual stream); dx = dresidual = ds.
RMSNorm (Zhang & Sennrich 2019) is the same kernel with the RMS flag: no centring (mean = 0, so
rstd = 1 / sqrt(mean(s^2) + eps)), no bias, and ds = rstd * (g - xhat * mean(g * xhat)) + ds_in.

Reference: torch.nn.functional.layer_norm / rms_norm. Mean and rstd are computed and kept in fp32.
x in float32, bfloat16 or float16. The residual stream may be wider than x (mixed precision keeps
it in fp32 while the branch outputs are bf16): s takes residual's dtype, and y takes `out_dtype`
(default: s's dtype), so y can be written directly in the dtype the next matmul reads. weight and
bias in float32 or s's dtype. One row is held in registers: C up to 16384 (GPT-2 uses 768 to 1600).
The dweight/dbias reduction is deterministic and lock-free: each backward program sums its rows
into an fp32 partial (dW and dB interleaved in one buffer), then one torch sum reduces both; the same inputs give the same bits
on every run on a given device.
Memory traffic, b bytes per element: layer_norm forward reads x and writes y (2 * b * N * C, plus
8 B per row of stats); add_layer_norm forward reads x and residual and writes s and y
(4 * b * N * C); backward reads dy and s and writes ds (3 * b * N * C), plus ds_in when present and
a second dx when x's dtype differs from the stream's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import as_rows, cast_rtne, check_tensors, interpreted, row_block_settings, sm_count

# Backward programs per SM: enough rows in flight to hide latency, few enough partials to sum.
BWD_PROGRAMS_PER_SM = 4


def bwd_block_settings(n_cols: int, s_bytes: int, dy_bytes: int, device: torch.device) -> tuple[int, int, int]:
    """Backward's (BLOCK_SIZE, BLOCK_ROWS, num_warps): warps sized by the narrowest tensor it moves
    (a bf16 dy beside an fp32 stream), so that one too is read 16 B a thread, not 8 (the wider
    ones take two 16 B accesses)."""
    return row_block_settings(n_cols, min(s_bytes, dy_bytes), device)


def bwd_stages(block: int) -> int:
    """Stages of backward's software-pipelined row loop: the next tile's s, dy and ds_in copied to
    shared memory (cp.async) while this one is computed. Two up to 2048-wide rows (10 KB of shared
    memory a program at C = 768 with an fp32 stream and bf16 dy: four programs fit an Ada SM's
    100 KB); wider rows are not pipelined (at 8192 the extra registers spill)."""
    return 2 if block <= 2048 else 1


@triton.jit
def _layer_norm_fwd_kernel(
    # data ptrs
    x_ptr,  # (n_rows, n_cols) input
    res_ptr,  # (n_rows, n_cols) residual, read when HAS_RESIDUAL
    s_ptr,  # (n_rows, n_cols) out: x + residual, written when HAS_RESIDUAL
    y_ptr,  # (n_rows, n_cols) out: normalised output
    w_ptr,  # (n_cols,) weight
    b_ptr,  # (n_cols,) bias, read when HAS_BIAS
    mean_ptr,  # (n_rows,) out: fp32 row mean
    rstd_ptr,  # (n_rows,) out: fp32 row 1/std
    # strides
    stride_x_row, stride_res_row, stride_s_row, stride_y_row,
    # shapes
    n_rows, n_cols,
    # meta
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,  # RMSNorm: no centring, no mean written
    BLOCK_ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    # Each program normalises BLOCK_ROWS whole rows held in registers.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # (R,)
    cols = tl.arange(0, BLOCK_SIZE)  # (C,)
    row_mask = rows < n_rows
    col_mask = cols < n_cols
    mask = row_mask[:, None] & col_mask[None, :]  # (R, C)
    x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows[:, None] * stride_res_row + cols[None, :], mask=mask, other=0.0)
        # Round the sum to the stream's dtype before normalising, so y = layer_norm(s) exactly for
        # the s handed back, as the unfused `s = x + r; layer_norm(s)` computes it.
        s = cast_rtne(x + res.to(tl.float32), s_ptr.dtype.element_ty, INTERPRETED)
        tl.store(s_ptr + rows[:, None] * stride_s_row + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    if RMS:
        centred = x  # masked columns were loaded as 0
    else:
        mean = tl.sum(x, axis=1) / n_cols  # (R,)
        centred = tl.where(mask, x - mean[:, None], 0.0)
        tl.store(mean_ptr + rows, mean, mask=row_mask)
    var = tl.sum(centred * centred, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)  # (R,)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    y = centred * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_y_row + cols[None, :], cast_rtne(y, y_ptr.dtype.element_ty, INTERPRETED),
             mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(
    # data ptrs
    dy_ptr,  # (n_rows, n_cols) gradient of y
    ds_in_ptr,  # (n_rows, n_cols) gradient arriving at s, read when HAS_DS_IN
    s_ptr,  # (n_rows, n_cols) the normalised input (x, or x + residual)
    w_ptr,  # (n_cols,) weight
    mean_ptr,  # (n_rows,) fp32 row mean from the forward, read unless RMS
    rstd_ptr,  # (n_rows,) fp32 row 1/std from the forward
    ds_ptr,  # (n_rows, n_cols) out: gradient of s (= of the residual; of x when dtypes agree)
    dx_ptr,  # (n_rows, n_cols) out: the same gradient in x's dtype, written when HAS_DX
    dw_partial_ptr,  # (n_programs, n_cols), row stride stride_partial_row, out: fp32 per-program sums of dy * xhat
    db_partial_ptr,  # (n_programs, n_cols), row stride stride_partial_row, out: fp32 per-program sums of dy, when HAS_BIAS
    # strides
    stride_dy_row, stride_ds_in_row, stride_s_row, stride_ds_row, stride_dx_row, stride_partial_row,
    # shapes
    n_rows, n_cols, rows_per_program,
    # meta
    HAS_DS_IN: tl.constexpr,
    HAS_DX: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    NUM_STAGES: tl.constexpr,
):
    # Each program walks its rows_per_program rows in tiles of BLOCK_ROWS, keeping fp32 partial
    # sums for dweight / dbias in registers; the partials are summed once after the launch. The
    # loop is pipelined (NUM_STAGES).
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)  # (C,)
    col_mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for tile in tl.range(row_start, row_end, BLOCK_ROWS, num_stages=NUM_STAGES):
        rows = tile + tl.arange(0, BLOCK_ROWS)  # (R,)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]  # (R, C)
        s = tl.load(s_ptr + rows[:, None] * stride_s_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
        if RMS:
            xhat = s * rstd[:, None]  # masked elements were loaded as 0
        else:
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            xhat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :]
        if RMS:
            c1 = tl.sum(xhat * g, axis=1) / n_cols  # (R,)
            ds = (g - xhat * c1[:, None]) * rstd[:, None]
        else:
            c1 = tl.sum(xhat * g, axis=1) / n_cols  # (R,)
            c2 = tl.sum(g, axis=1) / n_cols  # (R,)
            ds = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS_IN:
            ds += tl.load(ds_in_ptr + rows[:, None] * stride_ds_in_row + cols[None, :], mask=mask,
                          other=0.0).to(tl.float32)
        tl.store(ds_ptr + rows[:, None] * stride_ds_row + cols[None, :],
                 cast_rtne(ds, ds_ptr.dtype.element_ty, INTERPRETED), mask=mask)
        if HAS_DX:
            tl.store(dx_ptr + rows[:, None] * stride_dx_row + cols[None, :],
                     cast_rtne(ds, dx_ptr.dtype.element_ty, INTERPRETED), mask=mask)
        dw_acc += tl.sum(dy * xhat, axis=0)
        if HAS_BIAS:
            db_acc += tl.sum(dy, axis=0)
    tl.store(dw_partial_ptr + pid * stride_partial_row + cols, dw_acc, mask=col_mask)
    if HAS_BIAS:
        tl.store(db_partial_ptr + pid * stride_partial_row + cols, db_acc, mask=col_mask)


def _check_params(op: str, ln_dtype: torch.dtype, n_cols: int, weight: torch.Tensor,
                  bias: torch.Tensor | None) -> None:
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if p.shape != (n_cols,):
            raise ValueError(f"{op}: {name} must have shape ({n_cols},), got {tuple(p.shape)}")
        if p.dtype not in (torch.float32, ln_dtype):
            raise TypeError(f"{op}: {name} must be float32 or {ln_dtype} (the normalised input's dtype), "
                            f"got {p.dtype}")


FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
                   residual: torch.Tensor | None = None, out_dtype: torch.dtype | None = None, *,
                   rms: bool = False, y: torch.Tensor | None = None, s: torch.Tensor | None = None,
                   mean: torch.Tensor | None = None, rstd: torch.Tensor | None = None):
    """Launch the forward kernel. Returns (y, s, mean, rstd): y shaped like x in `out_dtype`
    (default: the normalised input's dtype), s = x + residual in residual's dtype (None without a
    residual), mean and rstd fp32 of shape (n_rows,) (with `rms`, RMSNorm: mean is an empty
    tensor, and bias must be None). Outputs may be passed in preallocated (tests poison them to
    catch unwritten elements)."""
    op = ("add_" if residual is not None else "") + ("rms_norm" if rms else "layer_norm")
    if rms and bias is not None:
        raise ValueError(f"{op}: RMSNorm has no bias")
    check_tensors(op, x, residual, weight, bias)
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be float32, bfloat16 or float16, got {t.dtype}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual must match x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
    ln_dtype = residual.dtype if residual is not None else x.dtype
    out_dtype = out_dtype or ln_dtype
    if out_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    n_cols = x.shape[-1]
    _check_params(op, ln_dtype, n_cols, weight, bias)
    x_rows = as_rows(x, n_cols)
    n_rows = x_rows.shape[0]
    y = torch.empty(x.shape, dtype=out_dtype, device=x.device) if y is None else y
    if mean is None:
        mean = torch.empty(0 if rms else n_rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device) if rstd is None else rstd
    res_rows = s_rows = None
    if residual is not None:
        res_rows = as_rows(residual, n_cols)
        s = torch.empty(x.shape, dtype=ln_dtype, device=x.device) if s is None else s
        s_rows = s.view(-1, n_cols)
    else:
        s = None
    if n_rows == 0:
        return y, s, mean, rstd
    y_rows = y.view(-1, n_cols)
    block, block_rows, num_warps = row_block_settings(n_cols, torch.finfo(ln_dtype).bits // 8, x.device)
    _layer_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](
        x_rows, res_rows, s_rows, y_rows, weight, bias, mean, rstd,
        x_rows.stride(0), res_rows.stride(0) if res_rows is not None else 0,
        s_rows.stride(0) if s_rows is not None else 0, y_rows.stride(0),
        n_rows, n_cols, eps,
        HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None, RMS=rms, BLOCK_ROWS=block_rows,
        BLOCK_SIZE=block, INTERPRETED=interpreted(x.device), num_warps=num_warps,
    )
    return y, s, mean, rstd


def backward_programs(n_rows: int, device: torch.device) -> int:
    """Programs of the backward launch: each writes one row of the dW/dB partials."""
    return min(n_rows, BWD_PROGRAMS_PER_SM * sm_count(device))


def layer_norm_bwd(dy: torch.Tensor, s: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                   mean: torch.Tensor, rstd: torch.Tensor, ds_in: torch.Tensor | None = None,
                   x_dtype: torch.dtype | None = None, *, ds: torch.Tensor | None = None,
                   dx: torch.Tensor | None = None, dw_partial: torch.Tensor | None = None,
                   db_partial: torch.Tensor | None = None, stacked: bool = False, rms: bool = False):
    """Launch the backward kernel (RMSNorm's with `rms`: `mean` unread, no bias). `s` is the
    forward's normalised input. Returns
    (ds, dx, dweight, dbias): ds in s's dtype; dx, the same gradient in `x_dtype`, only when that
    differs from s's dtype (else None); dweight, dbias in weight's dtype (dbias None without a bias).
    Output buffers may be passed in (the tests poison them); the fp32 dW/dB partials are
    (backward_programs(n_rows, device), C). With `stacked` (and no partial buffers passed) dweight
    and dbias come back as one (2, C) tensor (1 row without a bias) in the third place, None fourth."""
    check_tensors("layer_norm backward", dy, s, weight, ds_in)
    n_cols = s.shape[-1]
    s_rows, dy_rows = as_rows(s, n_cols), as_rows(dy, n_cols)
    ds_in_rows = as_rows(ds_in, n_cols) if ds_in is not None else None
    n_rows = s_rows.shape[0]
    ds = torch.empty(s.shape, dtype=s.dtype, device=s.device) if ds is None else ds
    has_dx = x_dtype is not None and x_dtype != s.dtype
    if has_dx:
        dx = torch.empty(s.shape, dtype=x_dtype, device=s.device) if dx is None else dx
    else:
        dx = None
    if n_rows == 0:
        if stacked:
            return ds, dx, weight.new_zeros((2 if has_bias else 1, n_cols)), None
        return ds, dx, torch.zeros_like(weight), torch.zeros_like(weight) if has_bias else None
    ds_rows = ds.view(-1, n_cols)
    dx_rows = dx.view(-1, n_cols) if has_dx else None
    n_programs = backward_programs(n_rows, s.device)
    rows_per_program = triton.cdiv(n_rows, n_programs)
    partials = None
    if dw_partial is None and db_partial is None:
        # dW and dB partials interleaved in one buffer, (n_programs, 2, C rounded up to 4): one sum
        # reduces both, and the dB row of the sum starts 16-byte aligned (the fused AdamW reads the
        # gradients with 128-bit accesses)
        width = triton.cdiv(n_cols, 4) * 4
        partials = torch.empty((n_programs, 2 if has_bias else 1, width), dtype=torch.float32, device=s.device)
        dw_partial, db_partial = partials[:, 0, :n_cols], partials[:, 1, :n_cols] if has_bias else None
    elif db_partial is None and has_bias:
        db_partial = torch.empty((n_programs, n_cols), dtype=torch.float32, device=s.device)
    db_partial = db_partial if has_bias else None
    if has_bias and db_partial.stride(0) != dw_partial.stride(0):
        raise ValueError("layer_norm backward: the dW and dB partial buffers must share their row stride")
    block, block_rows, num_warps = bwd_block_settings(n_cols, s.element_size(), dy.element_size(), s.device)
    _layer_norm_bwd_kernel[(n_programs,)](
        dy_rows, ds_in_rows, s_rows, weight, mean, rstd, ds_rows, dx_rows, dw_partial, db_partial,
        dy_rows.stride(0), ds_in_rows.stride(0) if ds_in_rows is not None else 0, s_rows.stride(0),
        ds_rows.stride(0), dx_rows.stride(0) if has_dx else 0, dw_partial.stride(0),
        n_rows, n_cols, rows_per_program,
        HAS_DS_IN=ds_in is not None, HAS_DX=has_dx, HAS_BIAS=has_bias, RMS=rms, BLOCK_ROWS=block_rows,
        BLOCK_SIZE=block, INTERPRETED=interpreted(s.device), NUM_STAGES=bwd_stages(block), num_warps=num_warps,
    )
    if partials is not None:  # one launch sums both
        sums = partials.sum(0).to(weight.dtype)[:, :n_cols]  # (2, C)
        if stacked:
            return ds, dx, sums, None
        return ds, dx, sums[0], sums[1] if has_bias else None
    dw = dw_partial.sum(0).to(weight.dtype)
    db = db_partial.sum(0).to(weight.dtype) if has_bias else None
    return ds, dx, dw, db


# ------------------------------------------------------------------------------------------------
# torch custom ops: opaque to torch.compile (no graph break), with autograd registered on them.
# custom_op outputs may not alias inputs or each other, so an absent output is an empty tensor.


@torch.library.custom_op("gptfast::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor | None, eps: float, out_dtype: torch.dtype | None, rms: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    y, s, mean, rstd = layer_norm_fwd(x, weight, bias, eps, residual, out_dtype, rms=rms)
    return y, s if s is not None else x.new_empty(0), mean, rstd


@_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, out_dtype, rms):
    n_rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    ln_dtype = residual.dtype if residual is not None else x.dtype
    rstd = x.new_empty(n_rows, dtype=torch.float32)
    mean = x.new_empty(0 if rms else n_rows, dtype=torch.float32)
    s = torch.empty_like(x, dtype=ln_dtype) if residual is not None else x.new_empty(0)
    return torch.empty_like(x, dtype=out_dtype or ln_dtype), s, mean, rstd


@torch.library.custom_op("gptfast::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(dy: torch.Tensor, ds_in: torch.Tensor | None, s: torch.Tensor, weight: torch.Tensor,
                       has_bias: bool, mean: torch.Tensor, rstd: torch.Tensor, x_dtype: torch.dtype, rms: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ds, dx, dweight and dbias stacked (2, C) or (1, C)): one tensor, as outputs may not alias."""
    ds, dx, dwb, _ = layer_norm_bwd(dy, s, weight, has_bias, mean, rstd, ds_in, x_dtype, stacked=True, rms=rms)
    return ds, dx if dx is not None else s.new_empty(0), dwb


@_layer_norm_bwd_op.register_fake
def _(dy, ds_in, s, weight, has_bias, mean, rstd, x_dtype, rms):
    dx = torch.empty_like(s, dtype=x_dtype) if x_dtype != s.dtype else s.new_empty(0)
    n_cols = weight.shape[0]  # the real output is a (k, C) view of a (k, C rounded up to 4) sum
    return torch.empty_like(s), dx, weight.new_empty_strided((2 if has_bias else 1, n_cols),
                                                             (triton.cdiv(n_cols, 4) * 4, 1))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, out_dtype, rms = inputs
    y, s, mean, rstd = output
    ctx.has_residual, ctx.has_bias, ctx.x_dtype, ctx.rms = residual is not None, bias is not None, x.dtype, rms
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)


def _backward(ctx, dy, ds, dmean, drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    ds_in = ds if ctx.has_residual and ds is not None else None
    if dy is None:
        dy = torch.zeros_like(s)
    ds, dx, dwb = _layer_norm_bwd_op(dy, ds_in, s, weight, ctx.has_bias, mean, rstd, ctx.x_dtype, ctx.rms)
    dw, db = dwb[0], dwb[1] if ctx.has_bias else None
    # s = x + residual, so both receive ds, each in its own dtype; where the dtypes agree they share
    # one tensor, which is safe because autograd never writes into a gradient it did not allocate.
    if ctx.x_dtype == s.dtype:
        dx = ds
    return dx, ds if ctx.has_residual else None, dw, db if ctx.has_bias else None, None, None, None


_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """LayerNorm over the last dimension of `x` (any leading shape); the same result as
    `F.layer_norm(x, (C,), weight, bias, eps)`, written in `out_dtype` (default x's dtype).
    Differentiable, and a torch custom op, so torch.compile keeps it in one graph."""
    return _layer_norm_fwd_op(x, None, weight, bias, eps, out_dtype, False)[0]


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None, eps: float = 1e-5,
                   out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual; y = layer_norm(s)` in one pass: reads x and residual once, writes s and y
    once. Returns (y, s): s, in residual's dtype, continues the residual stream; y is in
    `out_dtype` (default s's dtype). Differentiable in x, residual, weight and bias."""
    y, s, _, _ = _layer_norm_fwd_op(x, residual, weight, bias, eps, out_dtype, False)
    return y, s


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
             out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """RMSNorm over the last dimension of `x`: the same result as `F.rms_norm(x, (C,), weight, eps)`,
    written in `out_dtype` (default x's dtype). Differentiable; a torch custom op."""
    return _layer_norm_fwd_op(x, None, weight, None, eps, out_dtype, True)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
                 out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`s = x + residual; y = rms_norm(s)` in one pass, as add_layer_norm. Returns (y, s)."""
    y, s, _, _ = _layer_norm_fwd_op(x, residual, weight, None, eps, out_dtype, True)
    return y, s
