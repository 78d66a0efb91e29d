"""Helpers shared by the kernels: where a Triton kernel may run, and launch settings."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1).

    The variable must be set before the kernels are defined (Triton reads it when `@triton.jit`
    runs), so it is read here only to check that CPU tensors can be served.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_supports(device: torch.device) -> bool:
    """Whether gptfast's Triton kernels can run on tensors of `device`."""
    return device.type == "cuda" or (device.type == "cpu" and interpreter_enabled())


def check_tensors(op: str, *tensors: torch.Tensor | None) -> None:
    """Raise a clear error, never fall back, when a kernel cannot serve these tensors."""
    present = [t for t in tensors if t is not None]
    device = present[0].device
    if any(t.device != device for t in present):
        raise ValueError(f"{op}: tensors on different devices: {sorted({str(t.device) for t in present})}")
    if not triton_supports(device):
        raise RuntimeError(
            f"{op}: Triton kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set "
            f"before `kernels` is imported; got a {device.type} tensor. Use PyTorch ops on this device.")


def as_rows(x: torch.Tensor, n_cols: int) -> torch.Tensor:
    """View `x` as (n_rows, n_cols) with unit stride along the row; copies only when it must."""
    rows = x.reshape(-1, n_cols)
    if rows.stride(-1) != 1 or (rows.shape[0] > 1 and rows.stride(0) < n_cols):
        rows = rows.contiguous()
    return rows


def row_block_settings(n_cols: int, element_size: int, device: torch.device,
                       max_block: int = 16384) -> tuple[int, int, int]:
    """(BLOCK_SIZE, BLOCK_ROWS, num_warps) for kernels that hold whole rows in registers.

    BLOCK_SIZE is the next power of two >= n_cols. On a GPU, narrow rows are packed several to a
    program until a tile holds ~1024 elements, and warps grow with the tile's bytes so each thread
    loads ~16 B at a time (a warp's 32 threads x 16 B = 512 B). The interpreter runs programs one
    after another at a fixed cost each, so there a tile takes up to 32768 elements.
    """
    block = triton.next_power_of_2(n_cols)
    if block > max_block:
        raise ValueError(f"rows of {n_cols} elements exceed this kernel's limit of {max_block}")
    if interpreted(device):
        return block, max(1, 32768 // block), 1
    block_rows = max(1, 1024 // block)
    num_warps = min(16, max(1, block_rows * block * element_size // 512))
    return block, block_rows, num_warps


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; a small fixed number under the interpreter, where
    programs run one after another and fewer of them are simply faster."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def interpreted(device: torch.device) -> bool:
    """Whether a launch on `device` runs through the interpreter (the kernels' INTERPRETED flag)."""
    return device.type == "cpu"


@triton.jit
def cast_rtne(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """x.to(dtype), rounding to nearest even. The GPU's fp32 -> bf16 conversion already does; Triton's
    CPU interpreter truncates instead, so there x is first rounded by hand to a value that bf16 holds
    exactly (add half an ulp, ties to even, clear the low 16 bits). Compiled out on the GPU."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
