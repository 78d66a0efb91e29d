"""Cross-entropy over a large vocabulary, and linear + cross-entropy that never holds the logits.

Math, per row r with logits z (V entries) and target t (rows with t == ignore_index count for
nothing):
    lse_r = log(sum_j exp(z_j)) = m_r + log(sum_j exp(z_j - m_r)),  m_r = max_j z_j
    loss_r = lse_r - z_t
    dloss/dz_j = (softmax(z)_j - [j == t]) * scale_r
with scale_r = grad_output / n_valid for reduction "mean" (n_valid: rows not ignored),
grad_output for "sum", grad_output[r] for "none". Reference: torch.nn.functional.cross_entropy.
With a soft cap c > 0 (Gemma 2; modded-nanogpt), the loss sees z' = c * tanh(z / c) in place of z,
computed as the kernel reads each logit (the capped logits are never written), and the gradient
is taken back through the cap: dloss/dz_j = dloss/dz'_j * (1 - (z'_j / c)^2).

The kernel walks a row in blocks of BLOCK_V with an online log-sum-exp (Milakov & Gimelshein 2018),
so any V works; all arithmetic is fp32 whatever the logits' dtype (fp32, bf16, fp16).
The log-sum-exp is kept as its two fp32 parts (m_r, log s_r) and the loss formed as
log s_r - (z_t - m_r), the probabilities as exp((z_j - m_r) - log s_r): a confident row's loss
(lse ~ z_t) then keeps its relative precision, where lse - z_t would cancel it away.
- `cross_entropy`: forward reads the logits once and keeps the row's (m, log s); backward reads
  them again and writes the gradient (into the logits' own storage with inplace_backward=True).
- `linear_cross_entropy`: rows go in chunks sized by a memory budget; each chunk's logits come
  from a cuBLAS matmul, the kernel turns them into their gradient in place, and grad_hidden and an
  fp32 grad_weight are built chunk by chunk, during the forward. The (N, V) logits never exist,
  and chunks are large (hundreds to thousands of rows), so the (V, C) fp32 grad_weight is read and
  written a handful of times, not once per few rows.
Targets outside [0, V) other than ignore_index raise an error through an asynchronous device-side
check (`torch._assert_async`): no host sync on the hot path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._utils import cast_rtne, check_tensors, interpreted
from kernels.fp8 import to_fp8

REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _tanh(x):
    """tanh in fp32 from one exp (Triton has no portable tanh): sign(x) (1 - e) / (1 + e) with
    e = exp(-2|x|), which never overflows; the absolute error is a few fp32 ulps of 1."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _soft_cap(z, softcap, inv_softcap):
    return softcap * _tanh(z * inv_softcap)


@triton.jit
def _cross_entropy_kernel(
    # data ptrs
    logits_ptr,  # (n_rows, n_cols) logits, read
    targets_ptr,  # (n_rows,) int64 target ids
    lse_ptr,  # (n_rows, 2) fp32 (row max m, log s), the log-sum-exp in two parts: written when not HAS_LSE, else read
    loss_ptr,  # (n_rows,) fp32 out: per-row loss, written when WRITE_LOSS
    grad_ptr,  # (n_rows, n_cols) out: gradient of the logits (may be logits_ptr), when COMPUTE_GRAD
    grad_output_ptr,  # (1,) or (n_rows,) fp32 upstream gradient, when COMPUTE_GRAD
    n_valid_ptr,  # (1,) fp32 count of rows whose target is not ignore_index, for MEAN
    # strides
    stride_logits_row, stride_grad_row,
    # shapes
    n_cols,  # row length (a padded vocabulary: a multiple of 64, so rows stay 16-byte aligned)
    n_classes,  # columns < n_classes are classes; the rest are padding, excluded from the softmax
    # meta
    ignore_index,
    softcap,  # c of the soft cap c * tanh(z / c), read when SOFTCAP
    inv_softcap,  # 1 / c: a multiply per element, not a divide
    HAS_LSE: tl.constexpr,
    WRITE_LOSS: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    GRAD_OUTPUT_PER_ROW: tl.constexpr,
    MEAN: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
    INTERPRETED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_row = logits_ptr + row * stride_logits_row
    target = tl.load(targets_ptr + row)
    ignored = target == ignore_index
    cols = tl.arange(0, BLOCK_V)
    if HAS_LSE:
        m = tl.load(lse_ptr + 2 * row)
        log_s = tl.load(lse_ptr + 2 * row + 1)
    else:
        # Online log-sum-exp, per lane: each lane keeps a running max and a sum of exp(z - max),
        # rescaled as its max grows, with no block-wide reduction (and its barriers) inside the
        # loop; the lanes are combined once after it.
        m_lane = tl.full([BLOCK_V], float("-inf"), tl.float32)
        s_lane = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, n_cols, BLOCK_V):
            z = tl.load(logits_row + start + cols, mask=start + cols < n_cols, other=0.0).to(tl.float32)
            if SOFTCAP:
                z = _soft_cap(z, softcap, inv_softcap)
            z = tl.where(start + cols < n_classes, z, float("-inf"))  # padding columns are no class
            m_new = tl.maximum(m_lane, z)
            # while a lane has seen only -inf (a masked prefix), shift by 0: exp(-inf - -inf) is NaN
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            s_lane = s_lane * tl.exp(m_lane - shift) + tl.exp(z - shift)
            m_lane = m_new
        m = tl.max(m_lane, axis=0)
        shift = tl.where(m == float("-inf"), 0.0, m)
        log_s = tl.log(tl.sum(s_lane * tl.exp(m_lane - shift), axis=0))
        tl.store(lse_ptr + 2 * row, m)
        tl.store(lse_ptr + 2 * row + 1, log_s)
    if WRITE_LOSS:
        safe_target = tl.where(ignored, 0, target)
        z_target = tl.load(logits_row + safe_target).to(tl.float32)
        if SOFTCAP:
            z_target = _soft_cap(z_target, softcap, inv_softcap)
        tl.store(loss_ptr + row, tl.where(ignored, 0.0, log_s - (z_target - m)))
    if COMPUTE_GRAD:
        if GRAD_OUTPUT_PER_ROW:
            scale = tl.load(grad_output_ptr + row)
        else:
            scale = tl.load(grad_output_ptr)
        if MEAN:
            scale = scale / tl.maximum(tl.load(n_valid_ptr), 1.0)
        scale = tl.where(ignored, 0.0, scale)
        grad_row = grad_ptr + row * stride_grad_row
        for start in range(0, n_cols, BLOCK_V):
            mask = start + cols < n_cols
            z = tl.load(logits_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            if SOFTCAP:
                t = _tanh(z * inv_softcap)
                z = softcap * t
            p = tl.where(start + cols < n_classes, tl.exp((z - m) - log_s), 0.0)
            p = tl.where(start + cols == target, p - 1.0, p)
            if SOFTCAP:
                p = p * (1.0 - t * t)  # through the cap: d(c tanh(z / c)) / dz
            tl.store(grad_row + start + cols, cast_rtne(p * scale, grad_ptr.dtype.element_ty, INTERPRETED), mask=mask)


def _block_v(n_cols: int, device: torch.device) -> tuple[int, int]:
    """(BLOCK_V, num_warps): 4096 columns per step keeps 16 fp32 values per thread at 8 warps; the
    interpreter, which pays per step, takes the whole row (up to 64k columns) at once."""
    if interpreted(device):
        return min(65536, triton.next_power_of_2(n_cols)), 1
    return min(4096, triton.next_power_of_2(n_cols)), 8


def _check_targets(targets: torch.Tensor, n_rows: int, n_cols: int, ignore_index: int) -> None:
    if targets.dtype != torch.int64 or targets.shape != (n_rows,):
        raise ValueError(f"targets must be int64 of shape ({n_rows},), got {targets.dtype} {tuple(targets.shape)}")
    if n_rows:
        ok = ((targets >= 0) & (targets < n_cols)) | (targets == ignore_index)
        # Raised on the device, without waiting for it (synchronously on the CPU).
        torch._assert_async(ok.all(), f"cross_entropy: a target id is outside [0, {n_cols}) and is not "
                                      f"ignore_index ({ignore_index})")


def cross_entropy_launch(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, lse: torch.Tensor, *,
                         lse_given: bool = False, loss: torch.Tensor | None = None,
                         grad: torch.Tensor | None = None, grad_output: torch.Tensor | None = None,
                         reduction: str = "mean", n_valid: torch.Tensor | None = None,
                         n_classes: int | None = None, softcap: float = 0.0) -> None:
    """Launch the kernel over every row of (N, V) `logits`. It computes the fp32 log-sum-exp into
    `lse` (N, 2), as (row max, log of the shifted sum) (or reads it, with `lse_given`), per-row losses into `loss` when given, and, when `grad`
    is given (it may be `logits` itself), the gradient scaled by `grad_output` (one value, or one
    per row for "none") and by 1 / n_valid for "mean". Columns from `n_classes` on (default: none)
    are padding: left out of the softmax, given gradient 0. `softcap` > 0 caps the logits as the
    kernel reads them (the loss of c * tanh(z / c); the gradient is that of the raw logits)."""
    n_rows, n_cols = logits.shape
    if lse.shape != (n_rows, 2) or lse.dtype != torch.float32 or not lse.is_contiguous():
        raise ValueError(f"cross_entropy: lse must be float32 ({n_rows}, 2), contiguous; got {lse.dtype} "
                         f"{tuple(lse.shape)}")
    if n_rows == 0:
        return
    if targets.stride(0) != 1:  # the kernel reads targets_ptr + row: t[::2], t[:, 0] come in contiguous
        targets = targets.contiguous()
    block_v, num_warps = _block_v(n_cols, logits.device)
    compute_grad = grad is not None
    _cross_entropy_kernel[(n_rows,)](
        logits, targets, lse, loss, grad, grad_output, n_valid,
        logits.stride(0), grad.stride(0) if compute_grad else 0,
        n_cols, n_cols if n_classes is None else n_classes, ignore_index, float(softcap),
        1.0 / softcap if softcap > 0 else 0.0,
        HAS_LSE=lse_given, WRITE_LOSS=loss is not None, COMPUTE_GRAD=compute_grad,
        GRAD_OUTPUT_PER_ROW=compute_grad and reduction == "none", MEAN=reduction == "mean",
        SOFTCAP=softcap > 0, BLOCK_V=block_v, INTERPRETED=interpreted(logits.device), num_warps=num_warps,
    )


def _check_logits(op: str, logits: torch.Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be (N, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"{op}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.stride(-1) != 1:
        raise ValueError(f"{op}: logits must have unit stride along the vocabulary")


def _reduce(loss_rows: torch.Tensor, reduction: str, n_valid: torch.Tensor) -> torch.Tensor:
    if reduction == "none":
        return loss_rows
    total = loss_rows.sum()
    return total / n_valid if reduction == "mean" else total


# ------------------------------------------------------------------------------------------------
# cross_entropy: custom ops (forward, backward into a new buffer, backward in place)


@torch.library.custom_op("gptfast::cross_entropy_fwd", mutates_args=())
def _cross_entropy_fwd_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, reduction: str
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_tensors("cross_entropy", logits, targets)
    _check_logits("cross_entropy", logits)
    _check_targets(targets, logits.shape[0], logits.shape[1], ignore_index)
    n_rows = logits.shape[0]
    lse = torch.empty(n_rows, 2, dtype=torch.float32, device=logits.device)
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    cross_entropy_launch(logits, targets, ignore_index, lse, loss=loss_rows)
    n_valid = (targets != ignore_index).sum().float()
    return _reduce(loss_rows, reduction, n_valid), lse, n_valid


@_cross_entropy_fwd_op.register_fake
def _(logits, targets, ignore_index, reduction):
    n_rows = logits.shape[0]
    loss = logits.new_empty((n_rows,) if reduction == "none" else (), dtype=torch.float32)
    return loss, logits.new_empty((n_rows, 2), dtype=torch.float32), logits.new_empty((), dtype=torch.float32)


@torch.library.custom_op("gptfast::cross_entropy_bwd", mutates_args=())
def _cross_entropy_bwd_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, n_valid: torch.Tensor,
                          grad_output: torch.Tensor, ignore_index: int, reduction: str) -> torch.Tensor:
    grad = torch.empty_like(logits)
    cross_entropy_launch(logits, targets, ignore_index, lse, lse_given=True, grad=grad,
                         grad_output=grad_output.float().contiguous(), reduction=reduction, n_valid=n_valid)
    return grad


@_cross_entropy_bwd_op.register_fake
def _(logits, targets, lse, n_valid, grad_output, ignore_index, reduction):
    return torch.empty_like(logits)


@torch.library.custom_op("gptfast::cross_entropy_bwd_inplace", mutates_args=("logits",))
def _cross_entropy_bwd_inplace_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor,
                                  n_valid: torch.Tensor, grad_output: torch.Tensor, ignore_index: int,
                                  reduction: str) -> None:
    cross_entropy_launch(logits, targets, ignore_index, lse, lse_given=True, grad=logits,
                         grad_output=grad_output.float().contiguous(), reduction=reduction, n_valid=n_valid)


class _CrossEntropyFunction(torch.autograd.Function):
    """Autograd over the custom ops; a Function (not register_autograd) because the in-place
    backward hands back the logits' own storage as their gradient."""

    @staticmethod
    def forward(ctx, logits, targets, ignore_index, reduction, inplace_backward):
        loss, lse, n_valid = _cross_entropy_fwd_op(logits, targets, ignore_index, reduction)
        ctx.save_for_backward(logits, targets, lse, n_valid)
        ctx.ignore_index, ctx.reduction, ctx.inplace_backward = ignore_index, reduction, inplace_backward
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        logits, targets, lse, n_valid = ctx.saved_tensors
        args = (targets, lse, n_valid, grad_output, ctx.ignore_index, ctx.reduction)
        if ctx.inplace_backward:
            _cross_entropy_bwd_inplace_op(logits, *args)
            grad = logits
        else:
            grad = _cross_entropy_bwd_op(logits, *args)
        return grad, None, None, None, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100,
                  reduction: str = "mean", inplace_backward: bool = False) -> torch.Tensor:
    """`F.cross_entropy(logits, targets, ignore_index=..., reduction=...)` for (N, V) logits in
    fp32 / bf16 / fp16 (math in fp32) and int64 targets (N,). With `inplace_backward=True` the
    gradient is written over the logits (saving an (N, V) buffer): only for logits nothing else
    reads after the loss."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return _CrossEntropyFunction.apply(logits, targets, ignore_index, reduction, inplace_backward)


# ------------------------------------------------------------------------------------------------
# linear_cross_entropy


def chunk_rows(n_rows: int, vocab: int, element_size: int, chunk_bytes: int) -> int:
    """Rows per chunk: as many as `chunk_bytes` of logits hold, at least 128 (so grad_weight, read
    and written once per chunk, costs little next to the chunk's own logits), a multiple of 64 for
    the matmuls, and no more than needed."""
    rows = max(128, chunk_bytes // max(1, vocab * element_size)) // 64 * 64
    return max(1, min(n_rows, rows))


# Without a budget from the caller, a chunk's logits take at most this share of the device's free
# memory, and at least MIN_AUTO_CHUNK_BYTES: one chunk whenever the whole (N, V) logits fit.
AUTO_CHUNK_SHARE = 0.5
MIN_AUTO_CHUNK_BYTES = 64 * 2**20
CPU_AUTO_CHUNK_BYTES = 256 * 2**20
# Whether this torch has matmuls with an fp32 output for bf16 / fp16 inputs (CUDA only; recent torch).
FP32_OUTPUT_MATMUL = "dtype" in torch.ops.aten.mm.overloads() and "dtype_out" in torch.ops.aten.addmm.overloads()


def auto_chunk_bytes(device: torch.device) -> int:
    """A chunk budget from the memory free now (CUDA: cudaMemGetInfo, no synchronisation)."""
    if device.type != "cuda":
        return CPU_AUTO_CHUNK_BYTES
    free, _ = torch.cuda.mem_get_info(device)
    return max(MIN_AUTO_CHUNK_BYTES, int(free * AUTO_CHUNK_SHARE))


def _weight_grad_chunk(grad_weight: torch.Tensor | None, grad_logits: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """grad_weight (+)= grad_logits.T @ h with an fp32 result and accumulator. On CUDA the matmul
    writes fp32 directly (cuBLAS's fp32 output, `out_dtype`), accumulating in place: 8 bytes per
    V x C element per chunk. Where torch lacks that (older versions, the CPU), the bf16 product is
    widened: one chunk pays only the rounding the PyTorch path pays too; more chunks pay ~20 B."""
    if grad_logits.dtype != torch.float32 and grad_logits.is_cuda and FP32_OUTPUT_MATMUL:
        if grad_weight is None:
            return torch.mm(grad_logits.T, h, out_dtype=torch.float32)
        return torch.addmm(grad_weight, grad_logits.T, h, out_dtype=torch.float32, out=grad_weight)
    product = (grad_logits.T @ h).float()
    return product if grad_weight is None else grad_weight.add_(product)


def _linear_ce_chunks(hidden, weight, targets, ignore_index, reduction, compute_dtype, chunk_bytes,
                      grad_output_rows, want_grads, n_classes, softcap, grad_scale=1.0, grad_weight_into=None,
                      fp8_weight=None):
    """The chunk loop shared by forward (loss, and gradients scaled for mean/sum) and the
    reduction="none" backward (gradients scaled per row).
    Returns (loss_rows, n_valid, grad_hidden, grad_weight); the gradients are None without want_grads.
    grad_weight_into: an fp32 (V, C) buffer the weight's gradient is added into (and returned).
    fp8_weight: the weight's FP8 copies (e4m3 (V, C), its (C, V) transpose, the inverse scale): the
    three matmuls run in FP8 (each chunk's hidden rows cast to e4m3, its logits' gradient to e5m2,
    tensorwise per chunk), as gptfast.fp8's Linears."""
    n_rows, n_cols = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    # (V, C): one cast per call, as autocast would do for F.linear (FP8 has its own copies)
    w = weight.to(compute_dtype) if fp8_weight is None else None
    loss_rows = torch.empty(n_rows, dtype=torch.float32, device=device)
    lse = torch.empty(n_rows, 2, dtype=torch.float32, device=device)
    n_valid = (targets != ignore_index).sum().float()
    grad_hidden = torch.empty_like(hidden) if want_grads else None
    grad_weight = grad_weight_into
    grad_output = (grad_output_rows if grad_output_rows is not None
                   else torch.full((1,), grad_scale, dtype=torch.float32, device=device))
    if chunk_bytes <= 0:
        chunk_bytes = auto_chunk_bytes(device)
    step = chunk_rows(n_rows, vocab, torch.finfo(compute_dtype).bits // 8, chunk_bytes)
    for start in range(0, n_rows, step):
        end = min(start + step, n_rows)
        if fp8_weight is not None:  # e4m3 rows (and their transpose for grad_weight) and weight
            h8, h8_t, h_inv = to_fp8(hidden[start:end], torch.float8_e4m3fn, transpose=want_grads)
            logits = torch._scaled_mm(h8, fp8_weight[0].t(), scale_a=h_inv, scale_b=fp8_weight[2],
                                      out_dtype=compute_dtype)  # (n, V)
        else:
            h = hidden[start:end].to(compute_dtype)  # (n, C)
            logits = h @ w.T  # (n, V)
        go = grad_output[start:end] if grad_output_rows is not None else grad_output
        cross_entropy_launch(logits, targets[start:end], ignore_index, lse[start:end], loss=loss_rows[start:end],
                             grad=logits if want_grads else None, grad_output=go, reduction=reduction,
                             n_valid=n_valid, n_classes=n_classes, softcap=softcap)
        if want_grads and fp8_weight is not None:  # logits now hold their gradient: e5m2 operands
            g8, g8_t, g_inv = to_fp8(logits, torch.float8_e5m2, transpose=True)
            torch._scaled_mm(g8, fp8_weight[1].t(), scale_a=g_inv, scale_b=fp8_weight[2],
                             out_dtype=grad_hidden.dtype, out=grad_hidden[start:end])  # (n, C)
            product = torch._scaled_mm(g8_t, h8_t.t(), scale_a=g_inv, scale_b=h_inv, out_dtype=torch.float32)
            grad_weight = product if grad_weight is None else grad_weight.add_(product)  # (V, C) fp32
        elif want_grads:  # logits now hold their gradient
            if grad_hidden.dtype == logits.dtype:  # straight into the rows: no temporary, no copy
                torch.mm(logits, w, out=grad_hidden[start:end])  # (n, C)
            else:  # hidden in another dtype than the compute dtype (fp32 hidden, bf16 compute)
                grad_hidden[start:end] = logits @ w
            grad_weight = _weight_grad_chunk(grad_weight, logits, h)  # (V, C) fp32, across chunks
    if want_grads and grad_weight is None:  # no rows
        grad_weight = torch.zeros(vocab, n_cols, dtype=torch.float32, device=device)
    return loss_rows, n_valid, grad_hidden, grad_weight


@torch.library.custom_op("gptfast::linear_cross_entropy_fwd", mutates_args=())
def _linear_ce_fwd_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                      reduction: str, compute_dtype: torch.dtype, chunk_bytes: int, want_grads: bool,
                      n_classes: int, softcap: float, grad_scale: float, weight_fp8: torch.Tensor | None = None,
                      weight_fp8_t: torch.Tensor | None = None, weight_inv: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_tensors("linear_cross_entropy", hidden, weight, targets)
    _check_targets(targets, hidden.shape[0], n_classes, ignore_index)
    grads_now = want_grads and reduction != "none"  # "none" needs per-row grad_output: backward recomputes
    loss_rows, n_valid, grad_hidden, grad_weight = _linear_ce_chunks(
        hidden, weight, targets, ignore_index, reduction, compute_dtype, chunk_bytes, None, grads_now, n_classes,
        softcap, grad_scale or 1.0, fp8_weight=_fp8_triple(weight_fp8, weight_fp8_t, weight_inv))
    return (_reduce(loss_rows, reduction, n_valid), grad_hidden if grads_now else hidden.new_empty(0),
            grad_weight if grads_now else hidden.new_empty(0))


def _fp8_triple(w8, w8_t, w_inv):
    return None if w8 is None else (w8, w8_t, w_inv)


@_linear_ce_fwd_op.register_fake
def _(hidden, weight, targets, ignore_index, reduction, compute_dtype, chunk_bytes, want_grads, n_classes, softcap,
      grad_scale, weight_fp8=None, weight_fp8_t=None, weight_inv=None):
    grads_now = want_grads and reduction != "none"
    loss = hidden.new_empty((hidden.shape[0],) if reduction == "none" else (), dtype=torch.float32)
    grad_hidden = torch.empty_like(hidden) if grads_now else hidden.new_empty(0)
    grad_weight = weight.new_empty(weight.shape, dtype=torch.float32) if grads_now else hidden.new_empty(0)
    return loss, grad_hidden, grad_weight


@torch.library.custom_op("gptfast::linear_cross_entropy_bwd_rows", mutates_args=())
def _linear_ce_bwd_rows_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           grad_output: torch.Tensor, ignore_index: int, compute_dtype: torch.dtype,
                           chunk_bytes: int, n_classes: int, softcap: float) -> tuple[torch.Tensor, torch.Tensor]:
    _, _, grad_hidden, grad_weight = _linear_ce_chunks(
        hidden, weight, targets, ignore_index, "none", compute_dtype, chunk_bytes,
        grad_output.float().contiguous(), True, n_classes, softcap)
    return grad_hidden, grad_weight


@_linear_ce_bwd_rows_op.register_fake
def _(hidden, weight, targets, grad_output, ignore_index, compute_dtype, chunk_bytes, n_classes, softcap):
    return torch.empty_like(hidden), weight.new_empty(weight.shape, dtype=torch.float32)


def _linear_ce_setup(ctx, inputs, output):
    (hidden, weight, targets, ignore_index, reduction, compute_dtype, chunk_bytes, want_grads, n_classes, softcap,
     grad_scale, *_) = inputs
    _, grad_hidden, grad_weight = output
    # Only the loss is differentiated: the gradients of the two gradient outputs are never used,
    # and materialising them would zero-fill an (N, C) and a (V, C) fp32 buffer every step.
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.ignore_index, ctx.n_classes, ctx.softcap = reduction, ignore_index, n_classes, softcap
    ctx.compute_dtype, ctx.chunk_bytes, ctx.weight_dtype = compute_dtype, chunk_bytes, weight.dtype
    ctx.grad_scale = grad_scale
    if reduction == "none":
        ctx.save_for_backward(hidden, weight, targets)
    else:
        ctx.save_for_backward(grad_hidden, grad_weight)


def _linear_ce_backward(ctx, grad_loss, grad_grad_hidden, grad_grad_weight):
    if ctx.reduction == "none":
        hidden, weight, targets = ctx.saved_tensors
        grad_hidden, grad_weight = _linear_ce_bwd_rows_op(hidden, weight, targets, grad_loss, ctx.ignore_index,
                                                          ctx.compute_dtype, ctx.chunk_bytes, ctx.n_classes,
                                                          ctx.softcap)
    else:
        grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden.numel() == 0 and grad_weight.numel() == 0:
            raise RuntimeError("linear_cross_entropy: backward through a forward run without gradients")
        if ctx.grad_scale:
            # The forward computed the gradients for grad_output = grad_scale, the caller's promise:
            # kept, checked on the device (no host sync), not read and rewritten again.
            torch._assert_async(grad_loss == ctx.grad_scale, "linear_cross_entropy: the upstream gradient is not "
                                                               "the grad_scale promised to the forward")
        else:
            # The forward computed the gradients for grad_output = 1; scaling is a device op, no sync.
            grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype)
            grad_weight = grad_weight * grad_loss
    return (grad_hidden, grad_weight.to(ctx.weight_dtype)) + (None,) * 12


_linear_ce_fwd_op.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


@torch.library.custom_op("gptfast::linear_cross_entropy_fwd_into", mutates_args=("grad_weight_into",))
def _linear_ce_fwd_into_op(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                           grad_weight_into: torch.Tensor, ignore_index: int, reduction: str,
                           compute_dtype: torch.dtype, chunk_bytes: int, n_classes: int, softcap: float,
                           grad_scale: float, weight_fp8: torch.Tensor | None = None,
                           weight_fp8_t: torch.Tensor | None = None, weight_inv: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward with gradients, the weight's added into grad_weight_into (in place)."""
    check_tensors("linear_cross_entropy", hidden, weight, targets, grad_weight_into)
    _check_targets(targets, hidden.shape[0], n_classes, ignore_index)
    loss_rows, n_valid, grad_hidden, _ = _linear_ce_chunks(
        hidden, weight, targets, ignore_index, reduction, compute_dtype, chunk_bytes, None, True, n_classes, softcap,
        grad_scale, grad_weight_into, _fp8_triple(weight_fp8, weight_fp8_t, weight_inv))
    return _reduce(loss_rows, reduction, n_valid), grad_hidden


@_linear_ce_fwd_into_op.register_fake
def _(hidden, weight, targets, grad_weight_into, ignore_index, reduction, compute_dtype, chunk_bytes, n_classes,
      softcap, grad_scale, weight_fp8=None, weight_fp8_t=None, weight_inv=None):
    return hidden.new_empty((), dtype=torch.float32), torch.empty_like(hidden)


class _LinearCrossEntropyInto(torch.autograd.Function):
    """The loss whose forward adds the weight's gradient into a buffer (a mutating op has no
    registered autograd formula, so this Function carries it): backward returns grad_hidden alone,
    computed for the promised upstream gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, grad_weight_into, ignore_index, reduction, compute_dtype, chunk_bytes,
                n_classes, softcap, grad_scale, weight_fp8, weight_fp8_t, weight_inv):
        loss, grad_hidden = _linear_ce_fwd_into_op(hidden, weight, targets, grad_weight_into, ignore_index, reduction,
                                                   compute_dtype, chunk_bytes, n_classes, softcap, grad_scale,
                                                   weight_fp8, weight_fp8_t, weight_inv)
        ctx.save_for_backward(grad_hidden)
        ctx.grad_scale = grad_scale
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad_hidden,) = ctx.saved_tensors
        torch._assert_async(grad_loss == ctx.grad_scale, "linear_cross_entropy: the upstream gradient is not "
                                                           "the grad_scale promised to the forward")
        return (grad_hidden,) + (None,) * 13


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                         chunk_bytes: int | None, n_classes: int | None = None, ignore_index: int = -100,
                         reduction: str = "mean", compute_dtype: torch.dtype | None = None,
                         softcap: float = 0.0, grad_scale: float = 0.0,
                         grad_weight_into: torch.Tensor | None = None, fp8: bool = False,
                         fp8_weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`F.cross_entropy((hidden @ weight.T)[:, :n_classes], targets)` without the (N, V) logits;
    with `softcap` > 0 the logits are first capped, c * tanh(z / c), inside the kernel.

    hidden (N, C), weight (V, C) (a tied embedding works: the gradient lands in the parameter),
    targets (N,) int64 in [0, n_classes). Pass a vocabulary padded to a multiple of 64 whole, with
    `n_classes` the real vocabulary: the padding rows are masked inside the kernel (logit -inf,
    gradient 0), so the matmuls run on aligned shapes and the kernel's rows stay 16-byte aligned,
    where slicing the weight would give every row an odd length. The matmuls run in
    `compute_dtype` (default hidden's dtype; pass the autocast dtype under autocast); gradients
    come back in each input's own dtype, grad_weight accumulated in fp32. `chunk_bytes` bounds one
    chunk's logits (the caller's memory budget); None takes half the device's free memory, so
    the logits are one chunk whenever they fit. For "mean" and "sum" the gradients are computed
    during the forward (the logits exist only chunk by chunk, then); "none" computes its
    gradients in backward, recomputing each chunk's logits. `grad_scale` > 0 ("mean" and "sum"):
    the caller promises the loss's upstream gradient will be exactly this (the trainer's 1 /
    accumulation), so the forward computes the gradients already scaled and backward returns them
    as they are, instead of one more pass over the (V, C) fp32 gradient; a broken promise is a
    device-side assertion. `grad_weight_into` (with a grad_scale promise): an fp32 (V, C) buffer
    the forward adds the weight's gradient into, in place (the fp32-output matmul's epilogue on
    CUDA), instead of returning it for autograd to accumulate: the trainer's fused weight-gradient
    accumulation (gptfast.gradaccum), which passes `weight` as its once-per-step copy. The forward
    then always computes the gradients: call it only for a loss that backward will reach.
    `fp8` ("mean" and "sum"): the three matmuls take e4m3 operands (the hidden rows and the weight)
    and an e5m2 logits' gradient, tensorwise scaled (kernels/fp8.py's casts), with the weight's FP8
    copies `fp8_weight` (gptfast.fp8.cast_weight, made once per optimizer step) or cast here.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden (N, C) and weight (V, C) must share C, got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)}")
    n_classes = weight.shape[0] if n_classes is None else n_classes
    if not 0 < n_classes <= weight.shape[0]:
        raise ValueError(f"linear_cross_entropy: n_classes must be in [1, {weight.shape[0]}], got {n_classes}")
    if not softcap >= 0:
        raise ValueError(f"linear_cross_entropy: softcap must be >= 0 (0: off), got {softcap}")
    if chunk_bytes is not None and chunk_bytes <= 0:
        raise ValueError(f"linear_cross_entropy: chunk_bytes must be positive (or None), got {chunk_bytes}")
    compute_dtype = compute_dtype or hidden.dtype
    weight_fp8 = weight_fp8_t = weight_inv = None
    if fp8:
        if reduction == "none":
            raise ValueError("linear_cross_entropy: fp8 takes reduction mean or sum")
        weight_fp8, weight_fp8_t, weight_inv = fp8_weight or to_fp8(weight.detach(), torch.float8_e4m3fn, True)
    elif fp8_weight is not None:
        raise ValueError("linear_cross_entropy: fp8_weight is given without fp8")
    if grad_weight_into is not None:
        if not (grad_scale > 0 and reduction != "none"):
            raise ValueError("linear_cross_entropy: grad_weight_into needs a grad_scale promise and reduction "
                             "mean or sum")
        if grad_weight_into.shape != weight.shape or grad_weight_into.dtype != torch.float32:
            raise ValueError(f"linear_cross_entropy: grad_weight_into must be fp32 {tuple(weight.shape)}, got "
                             f"{grad_weight_into.dtype} {tuple(grad_weight_into.shape)}")
        return _LinearCrossEntropyInto.apply(hidden, weight, targets, grad_weight_into, ignore_index, reduction,
                                             compute_dtype, chunk_bytes or 0, n_classes, float(softcap),
                                             float(grad_scale), weight_fp8, weight_fp8_t, weight_inv)
    want_grads = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    return _linear_ce_fwd_op(hidden, weight, targets, ignore_index, reduction, compute_dtype, chunk_bytes or 0,
                             want_grads, n_classes, float(softcap), float(grad_scale), weight_fp8, weight_fp8_t,
                             weight_inv)[0]
