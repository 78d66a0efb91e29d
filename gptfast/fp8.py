"""FP8 matmuls with tensorwise dynamic scaling, through `torch._scaled_mm`: the numerics the
`[kernels] fp8` switch is to build on (not yet wired into the model: see docs/kernels.md).

y = x @ w^T with x and w cast to e4m3 (3 mantissa bits, max 448), each scaled by one fp32 factor
so that its largest magnitude maps to e4m3's largest: scale = 448 / amax. The product is
unscaled inside the matmul (`scale_a`, `scale_b` are the inverse scales) and written in bf16.
Backward casts the output's gradient to e5m2 (2 mantissa bits, max 57344: gradients span a
wider range than activations) and computes grad_x = g @ w and grad_w = g^T @ x from the FP8
operands the forward saved. Tensorwise scaling is what cuBLAS supports on sm_89.

Error bound. Rounding to e4m3 changes each element by at most 2^-4 of itself (half an ulp at 3
mantissa bits); a dot product of K such products, with independent errors, is off by about
2^-4 x sqrt(2/3) ~ 5% of its magnitude, rms. e5m2 has twice the step: ~10% for the gradients,
which also meet the e4m3 operands. The tests bound the relative Frobenius error at twice those.

`_scaled_mm` wants its second operand column-major and, on CUDA, every dimension a multiple of
16; `check_fp8_shape` names the width that is not.
"""

from __future__ import annotations

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MULTIPLE = 16  # cuBLAS's FP8 GEMMs need every dimension a multiple of 16
AMAX_FLOOR = 1e-12  # an all-zero tensor: scale 448 / 1e-12 would still be finite; its FP8 is zeros


def check_fp8_shape(name: str, width: int) -> None:
    """ValueError naming `name` when `width` cannot be an FP8 matmul dimension."""
    if width % FP8_MULTIPLE:
        raise ValueError(f"fp8: {name} is {width} wide, and FP8 matmuls need a multiple of {FP8_MULTIPLE}")


def to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t in `dtype`, scaled so its amax is dtype's largest value; the fp32 inverse scale)."""
    fp8_max = torch.finfo(dtype).max
    amax = t.abs().amax().float().clamp(min=AMAX_FLOOR)
    scale = fp8_max / amax
    # clamp: a value at amax times a rounded scale can land just past the largest finite value
    fp8 = (t.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)
    return fp8, scale.reciprocal()


def _mm(a: torch.Tensor, a_inv: torch.Tensor, b_t: torch.Tensor, b_inv: torch.Tensor,
        out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) @ b_t (K, N), both FP8: a made row-major, b_t column-major as _scaled_mm wants."""
    return torch._scaled_mm(a.contiguous(), b_t.t().contiguous().t(), scale_a=a_inv, scale_b=b_inv,
                            out_dtype=out_dtype)


class FP8Linear(torch.autograd.Function):
    """y (N, out) = x (N, in) @ weight (out, in)^T in FP8, written in `out_dtype`; the gradients of
    x and weight come back in their own dtypes."""

    @staticmethod
    def forward(ctx, x, weight, out_dtype):
        x8, x_inv = to_fp8(x, E4M3)
        w8, w_inv = to_fp8(weight, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)  # the FP8 operands: half of bf16's bytes
        ctx.dtypes = (x.dtype, weight.dtype)
        return _mm(x8, x_inv, w8.t(), w_inv, out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        g8, g_inv = to_fp8(grad_y, E5M2)
        x_dtype, w_dtype = ctx.dtypes
        grad_x = _mm(g8, g_inv, w8, w_inv, x_dtype)  # (N, out) @ (out, in)
        grad_w = _mm(g8.t(), g_inv, x8, x_inv, torch.float32).to(w_dtype)  # (out, N) @ (N, in)
        return grad_x, grad_w, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """`x @ weight.T` (x (..., in), weight (out, in)) through e4m3 operands, tensorwise scaled,
    e5m2 output gradients in backward; the result in `out_dtype`."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x (..., in) and weight (out, in) must share in, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if x.is_cuda:
        check_fp8_shape("the input", weight.shape[1])
        check_fp8_shape("the output", weight.shape[0])
    rows = x.reshape(-1, x.shape[-1])
    return FP8Linear.apply(rows, weight, out_dtype).view(*x.shape[:-1], weight.shape[0])
