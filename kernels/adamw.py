"""AdamW over many tensors in a constant number of launches, with fused global-norm clipping.

Update (Loshchilov & Hutter 2019, as torch.optim.AdamW computes it), per element, at step t:
    g = grad * clip,  clip = min(1, max_norm / (||all grads||_2 + 1e-6))  (1 without clipping)
    p = p * (1 - lr * wd)
    m = m + (1 - beta1) * (g - m)              (torch's lerp)
    v = v * beta2 + (1 - beta2) * g * g
    p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
Reference: torch.optim.AdamW(foreach=False) with torch.nn.utils.clip_grad_norm_ before it.

Tensors are reached through device-side tables of their addresses (one int64 per tensor for the
parameter, gradient, moments and step count), and a table mapping each program to a (tensor,
offset) block, so one launch covers every tensor whatever their sizes. Hyperparameters live in a
device table per parameter group (lr, weight decay, betas, eps, in fp64 as torch keeps them in
Python floats): an lr changing every step costs a 40-byte host-to-device copy, never a sync or a
recompile.

Launches per step: the clipping norm (one launch writes per-block fp32 sums of squares, one torch
sum reduces them: deterministic); one single-program prep kernel that turns, per tensor, the
hyperparameters, the device step count and the norm into FACTORS = 8 fp32 factors (bias corrections
and lr scaling in fp64, as torch computes them, rounded once; the clip coefficient last); and the element-wise update, which
reads those factors and does fp32 arithmetic only, four loads and three stores per element.

Alignment, so the element-wise kernels use 128-bit accesses: each base pointer read from a table
is declared 16-byte aligned (`tl.multiple_of`; the launcher checks that every tensor is, and
torch's allocator gives 512), blocks start at multiples of BLOCK, and a block that lies wholly inside its tensor
takes an unmasked path (only each tensor's last block is masked).
Parameters and moments fp32; gradients fp32, bf16 or fp16 (one launch per gradient dtype).
Traffic per parameter: read p, g, m, v and write p, m, v: 28 bytes with fp32 gradients
(24 + 2 with bf16), plus the gradient read again for the norm when clipping.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from kernels._utils import check_tensors, interpreted

GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HYPER_FIELDS = 5  # lr, weight_decay, beta1, beta2, eps
FACTORS = 8  # per tensor and step, from the prep kernel
ALIGNMENT = 16  # bytes: every tensor's address, for 128-bit accesses


@triton.jit
def _block_of(block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK: tl.constexpr):
    """This program's tensor index, element offsets, whether the block is whole (no mask needed)
    and the mask for the last, partial block of a tensor."""
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(block_start_ptr + pid), BLOCK)
    offsets = start + tl.arange(0, BLOCK).to(tl.int64)
    numel = tl.load(numel_ptr + tensor)
    return tensor, offsets, start + BLOCK <= numel, offsets < numel


@triton.jit
def _aligned(addr_ptr, tensor, DTYPE: tl.constexpr):
    """A tensor's base pointer from a table of addresses, declared 16-byte aligned (checked by the
    launcher): without the hint the compiler must assume any address and emits 32-bit accesses."""
    return tl.multiple_of(tl.load(addr_ptr + tensor).to(tl.pointer_type(DTYPE)), 16)


@triton.jit
def _grad_sq_norm_kernel(
    # tables
    grad_addr_ptr,  # (n_tensors,) int64 addresses of the gradients (16-byte aligned)
    numel_ptr,  # (n_tensors,) int64 elements per tensor
    block_tensor_ptr,  # (n_blocks,) int32 tensor index of each program's block
    block_start_ptr,  # (n_blocks,) int64 first element of each program's block
    # out
    partial_ptr,  # (n_blocks,) fp32 sum of squares of each block
    # meta
    GRAD_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tensor, offsets, whole, mask = _block_of(block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
    grad_ptr = _aligned(grad_addr_ptr, tensor, GRAD_DTYPE)
    if whole:
        g = tl.load(grad_ptr + offsets).to(tl.float32)
    else:
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


@triton.jit
def _adamw_prep_kernel(
    step_addr_ptr,  # (n_tensors,) int64 addresses of each tensor's fp32 step count (already incremented)
    group_ptr,  # (n_tensors,) int32 parameter group of each tensor
    hyper_ptr,  # (n_groups, 5) fp64: lr, weight_decay, beta1, beta2, eps
    norm_ptr,  # (1,) fp32 global gradient norm, read when CLIP
    factors_ptr,  # (n_tensors, FACTORS) fp32 out, see _adamw_kernel
    n_tensors,
    max_norm,
    CLIP: tl.constexpr,
    FACTORS: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    """One program: every tensor's per-step factors, in fp64 as torch computes them from Python
    floats, rounded once to fp32. Cost: a few hundred threads' fp64 work per step, not every element's."""
    t = tl.arange(0, BLOCK_T)
    valid = t < n_tensors
    hyper = hyper_ptr + tl.load(group_ptr + t, mask=valid, other=0) * 5
    lr = tl.load(hyper, mask=valid, other=0.0)
    weight_decay = tl.load(hyper + 1, mask=valid, other=0.0)
    beta1 = tl.load(hyper + 2, mask=valid, other=0.5)
    beta2 = tl.load(hyper + 3, mask=valid, other=0.5)
    eps = tl.load(hyper + 4, mask=valid, other=1.0)
    step_ptr = tl.load(step_addr_ptr + t, mask=valid, other=0).to(tl.pointer_type(tl.float32))
    step = tl.load(step_ptr, mask=valid, other=1.0).to(tl.float64)
    bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
    if CLIP:
        norm = tl.load(norm_ptr)
        # a NaN norm gives a NaN coefficient, as torch.nn.utils.clip_grad_norm_ does (min(nan, 1) would
        # silently step unclipped); the trainer never steps on a NaN norm: its health guard skips the step
        clip = tl.where(norm == norm, tl.minimum(max_norm / (norm + 1e-6), 1.0), norm)
    else:
        clip = 1.0
    row = factors_ptr + t * FACTORS
    tl.store(row + 0, (lr / bias_correction1).to(tl.float32), mask=valid)  # step size
    tl.store(row + 1, (1.0 - lr * weight_decay).to(tl.float32), mask=valid)  # decay
    tl.store(row + 2, (1.0 - beta1).to(tl.float32), mask=valid)
    tl.store(row + 3, beta2.to(tl.float32), mask=valid)
    tl.store(row + 4, (1.0 - beta2).to(tl.float32), mask=valid)
    tl.store(row + 5, bias_correction2_sqrt.to(tl.float32), mask=valid)
    tl.store(row + 6, eps.to(tl.float32), mask=valid)
    tl.store(row + 7, tl.zeros_like(step).to(tl.float32) + clip, mask=valid)


@triton.jit
def _adamw_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, factors, MASKED: tl.constexpr):
    """The update of one block, fp32 only. MASKED: the last, partial block of a tensor."""
    if MASKED:
        g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(param_ptr + offsets, mask=mask, other=0.0)
        m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
        v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    else:
        g = tl.load(grad_ptr + offsets).to(tl.float32)
        p = tl.load(param_ptr + offsets)
        m = tl.load(exp_avg_ptr + offsets)
        v = tl.load(exp_avg_sq_ptr + offsets)
    step_size = tl.load(factors)
    decay = tl.load(factors + 1)
    one_minus_beta1 = tl.load(factors + 2)
    beta2 = tl.load(factors + 3)
    one_minus_beta2 = tl.load(factors + 4)
    bc2_sqrt = tl.load(factors + 5)
    eps = tl.load(factors + 6)
    g = g * tl.load(factors + 7)  # the clipping factor (1 without clipping)
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2 + one_minus_beta2 * (g * g)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)
    if MASKED:
        tl.store(param_ptr + offsets, p, mask=mask)
        tl.store(exp_avg_ptr + offsets, m, mask=mask)
        tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)
    else:
        tl.store(param_ptr + offsets, p)
        tl.store(exp_avg_ptr + offsets, m)
        tl.store(exp_avg_sq_ptr + offsets, v)


@triton.jit
def _adamw_kernel(
    # tables
    param_addr_ptr, grad_addr_ptr, exp_avg_addr_ptr, exp_avg_sq_addr_ptr,  # (n_tensors,) int64 addresses, 16-byte aligned
    numel_ptr,  # (n_tensors,) int64 elements per tensor
    block_tensor_ptr,  # (n_blocks,) int32 tensor index of each program's block
    block_start_ptr,  # (n_blocks,) int64 first element of each program's block
    factors_ptr,  # (n_tensors, FACTORS) fp32 from _adamw_prep_kernel: step size, decay, 1 - beta1,
    #              beta2, 1 - beta2, sqrt(bias correction 2), eps, clip factor
    # meta
    GRAD_DTYPE: tl.constexpr,
    FACTORS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tensor, offsets, whole, mask = _block_of(block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
    param_ptr = _aligned(param_addr_ptr, tensor, tl.float32)
    grad_ptr = _aligned(grad_addr_ptr, tensor, GRAD_DTYPE)
    exp_avg_ptr = _aligned(exp_avg_addr_ptr, tensor, tl.float32)
    exp_avg_sq_ptr = _aligned(exp_avg_sq_addr_ptr, tensor, tl.float32)
    factors = factors_ptr + tensor * FACTORS
    if whole:
        _adamw_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, factors, False)
    else:
        _adamw_block(param_ptr, grad_ptr, exp_avg_ptr, exp_avg_sq_ptr, offsets, mask, factors, True)


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def block_size(device: torch.device) -> int:
    """Elements per program: 4096 at 8 warps is 16 elements per thread, four 128-bit accesses per
    fp32 stream; the interpreter, paying per program, takes 64k."""
    return 65536 if interpreted(device) else 4096


@dataclass
class BlockTable:
    """Which (tensor, offset) block each program handles, for one list of tensor sizes."""

    numels: torch.Tensor  # (n_tensors,) int64
    block_tensor: torch.Tensor  # (n_blocks,) int32
    block_start: torch.Tensor  # (n_blocks,) int64
    n_blocks: int
    block: int

    @classmethod
    def build(cls, numels: list[int], device: torch.device) -> "BlockTable":
        block = block_size(device)
        counts = np.array([triton.cdiv(n, block) for n in numels], dtype=np.int64)
        block_tensor = np.repeat(np.arange(len(numels), dtype=np.int32), counts)
        first_block = np.concatenate([[0], np.cumsum(counts)[:-1]])
        block_start = (np.arange(counts.sum(), dtype=np.int64) - np.repeat(first_block, counts)) * block
        return cls(_to_device(np.array(numels, dtype=np.int64), device), _to_device(block_tensor, device),
                   _to_device(block_start, device), int(counts.sum()), block)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array -> device tensor without a sync: pinned staging memory and an async copy."""
    host = torch.from_numpy(array)
    if device.type != "cuda":
        return host.clone()
    return host.pin_memory().to(device, non_blocking=True)


def addresses(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    return _to_device(np.array([t.data_ptr() for t in tensors], dtype=np.int64), device)


def aligned_addresses(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The address table of tensors the element-wise kernels declare 16-byte aligned: checked here."""
    pointers = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
    if (pointers % ALIGNMENT).any():
        raise ValueError(f"adamw: every tensor must be {ALIGNMENT}-byte aligned (torch's allocator gives 512; "
                         "a view into the middle of a tensor may not be)")
    return _to_device(pointers, device)


def grad_sq_norm_partials(grads: list[torch.Tensor], table: BlockTable) -> torch.Tensor:
    """(n_blocks,) fp32 sums of squares of the gradients, one launch; their sum is ||g||^2."""
    device = grads[0].device
    partials = torch.empty(table.n_blocks, dtype=torch.float32, device=device)
    if table.n_blocks:
        _grad_sq_norm_kernel[(table.n_blocks,)](
            aligned_addresses(grads, device), table.numels, table.block_tensor, table.block_start, partials,
            GRAD_DTYPE=TL_DTYPES[grads[0].dtype], BLOCK=table.block, num_warps=8 if device.type == "cuda" else 1,
        )
    return partials


def adamw_update(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], groups: torch.Tensor,
                 hyper: torch.Tensor, table: BlockTable, grad_norm: torch.Tensor | None = None,
                 max_grad_norm: float | None = None) -> None:
    """One AdamW step over every tensor in the lists (one launch; all gradients of one dtype).

    steps: per-tensor 0-dim fp32 step counts on the device, already incremented for this step.
    groups: (n_tensors,) int32 group index; hyper: (n_groups, 5) fp64 on the device.
    With max_grad_norm, gradients are scaled by min(1, max_grad_norm / (grad_norm + 1e-6)).
    """
    device = params[0].device
    check_tensors("adamw", *params, *grads, *exp_avgs, *exp_avg_sqs, *steps, groups, hyper)
    grad_dtype = grads[0].dtype
    if grad_dtype not in GRAD_DTYPES or any(g.dtype != grad_dtype for g in grads):
        raise TypeError(f"adamw: one launch takes gradients of one dtype among {GRAD_DTYPES}")
    for name, tensors in (("params", params), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)):
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in tensors):
            raise TypeError(f"adamw: {name} must be contiguous float32")
    if any(not g.is_contiguous() for g in grads):
        raise ValueError("adamw: gradients must be contiguous")
    if table.n_blocks == 0:
        return
    clip = max_grad_norm is not None
    n_tensors = len(params)
    factors = torch.empty(n_tensors, FACTORS, dtype=torch.float32, device=device)
    _adamw_prep_kernel[(1,)](
        addresses(steps, device), groups, hyper, grad_norm if clip else None, factors, n_tensors,
        float(max_grad_norm) if clip else 0.0,
        CLIP=clip, FACTORS=FACTORS, BLOCK_T=triton.next_power_of_2(n_tensors), num_warps=4 if device.type == "cuda" else 1,
    )
    _adamw_kernel[(table.n_blocks,)](
        aligned_addresses(params, device), aligned_addresses(grads, device), aligned_addresses(exp_avgs, device),
        aligned_addresses(exp_avg_sqs, device), table.numels, table.block_tensor, table.block_start, factors,
        GRAD_DTYPE=TL_DTYPES[grad_dtype], FACTORS=FACTORS, BLOCK=table.block,
        num_warps=8 if device.type == "cuda" else 1,
    )
