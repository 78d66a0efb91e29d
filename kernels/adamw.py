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
Python floats), and bias corrections are computed in-kernel in fp64 from the device step count:
an lr changing every step costs a 40-byte host-to-device copy, never a sync or a recompile.
Clipping: one launch writes per-block fp32 sums of squares, one torch sum reduces them
(deterministic), and the update reads the norm from device memory.
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


@triton.jit
def _block_of(block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK: tl.constexpr):
    """This program's tensor index, element offsets and mask."""
    pid = tl.program_id(0)
    tensor = tl.load(block_tensor_ptr + pid)
    offsets = tl.load(block_start_ptr + pid) + tl.arange(0, BLOCK).to(tl.int64)
    return tensor, offsets, offsets < tl.load(numel_ptr + tensor)


@triton.jit
def _grad_sq_norm_kernel(
    # tables
    grad_addr_ptr,  # (n_tensors,) int64 addresses of the gradients
    numel_ptr,  # (n_tensors,) int64 elements per tensor
    block_tensor_ptr,  # (n_blocks,) int32 tensor index of each program's block
    block_start_ptr,  # (n_blocks,) int64 first element of each program's block
    # out
    partial_ptr,  # (n_blocks,) fp32 sum of squares of each block
    # meta
    GRAD_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tensor, offsets, mask = _block_of(block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
    grad_ptr = tl.load(grad_addr_ptr + tensor).to(tl.pointer_type(GRAD_DTYPE))
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    tl.store(partial_ptr + tl.program_id(0), tl.sum(g * g, axis=0))


@triton.jit
def _adamw_kernel(
    # tables
    param_addr_ptr, grad_addr_ptr, exp_avg_addr_ptr, exp_avg_sq_addr_ptr,  # (n_tensors,) int64 addresses
    step_addr_ptr,  # (n_tensors,) int64 addresses of each tensor's fp32 step count (already incremented)
    numel_ptr,  # (n_tensors,) int64 elements per tensor
    group_ptr,  # (n_tensors,) int32 parameter group of each tensor
    block_tensor_ptr,  # (n_blocks,) int32 tensor index of each program's block
    block_start_ptr,  # (n_blocks,) int64 first element of each program's block
    hyper_ptr,  # (n_groups, 5) fp64: lr, weight_decay, beta1, beta2, eps
    norm_ptr,  # (1,) fp32 global gradient norm, read when CLIP
    # meta
    max_norm,
    GRAD_DTYPE: tl.constexpr,
    CLIP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    tensor, offsets, mask = _block_of(block_tensor_ptr, block_start_ptr, numel_ptr, BLOCK)
    hyper = hyper_ptr + tl.load(group_ptr + tensor) * 5
    lr = tl.load(hyper)
    weight_decay = tl.load(hyper + 1)
    beta1 = tl.load(hyper + 2)
    beta2 = tl.load(hyper + 3)
    eps = tl.load(hyper + 4).to(tl.float32)
    step = tl.load(tl.load(step_addr_ptr + tensor).to(tl.pointer_type(tl.float32))).to(tl.float64)
    # Scalars in fp64, as torch computes them from Python floats, then rounded once to fp32.
    bias_correction1 = 1.0 - tl.exp(step * tl.log(beta1))
    bias_correction2_sqrt = tl.sqrt(1.0 - tl.exp(step * tl.log(beta2)))
    step_size = (lr / bias_correction1).to(tl.float32)
    decay = (1.0 - lr * weight_decay).to(tl.float32)
    one_minus_beta1 = (1.0 - beta1).to(tl.float32)
    one_minus_beta2 = (1.0 - beta2).to(tl.float32)
    beta2_f = beta2.to(tl.float32)
    bc2_sqrt = bias_correction2_sqrt.to(tl.float32)

    param_ptr = tl.load(param_addr_ptr + tensor).to(tl.pointer_type(tl.float32))
    grad_ptr = tl.load(grad_addr_ptr + tensor).to(tl.pointer_type(GRAD_DTYPE))
    exp_avg_ptr = tl.load(exp_avg_addr_ptr + tensor).to(tl.pointer_type(tl.float32))
    exp_avg_sq_ptr = tl.load(exp_avg_sq_addr_ptr + tensor).to(tl.pointer_type(tl.float32))
    g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    if CLIP:
        norm = tl.load(norm_ptr)
        g = g * tl.minimum(max_norm / (norm + 1e-6), 1.0)
    p = tl.load(param_ptr + offsets, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offsets, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offsets, mask=mask, other=0.0)
    p = p * decay
    m = m + one_minus_beta1 * (g - m)
    v = v * beta2_f + one_minus_beta2 * (g * g)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p - step_size * (m / denom)
    tl.store(param_ptr + offsets, p, mask=mask)
    tl.store(exp_avg_ptr + offsets, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offsets, v, mask=mask)


TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def block_size(device: torch.device) -> int:
    """Elements per program: 2048 fp32 elements is 8 KB per tensor stream on a GPU; the
    interpreter, paying per program, takes 64k."""
    return 65536 if interpreted(device) else 2048


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


def grad_sq_norm_partials(grads: list[torch.Tensor], table: BlockTable) -> torch.Tensor:
    """(n_blocks,) fp32 sums of squares of the gradients, one launch; their sum is ||g||^2."""
    device = grads[0].device
    partials = torch.empty(table.n_blocks, dtype=torch.float32, device=device)
    if table.n_blocks:
        _grad_sq_norm_kernel[(table.n_blocks,)](
            addresses(grads, device), table.numels, table.block_tensor, table.block_start, partials,
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
    _adamw_kernel[(table.n_blocks,)](
        addresses(params, device), addresses(grads, device), addresses(exp_avgs, device),
        addresses(exp_avg_sqs, device), addresses(steps, device),
        table.numels, groups, table.block_tensor, table.block_start, hyper,
        grad_norm if clip else None, float(max_grad_norm) if clip else 0.0,
        GRAD_DTYPE=TL_DTYPES[grad_dtype], CLIP=clip, BLOCK=table.block,
        num_warps=8 if device.type == "cuda" else 1,
    )
