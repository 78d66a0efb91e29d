"""FP8 matmuls with tensorwise dynamic scaling, through `torch._scaled_mm`: the `[kernels] fp8`
switch (the MLP's two Linears, the head, or both; see docs/kernels.md).

y = x @ w^T with x and w cast to e4m3 (3 mantissa bits, max 448), each scaled by one fp32 factor
so that its largest magnitude maps to e4m3's largest: scale = 448 / amax. The product is
unscaled inside the matmul (`scale_a`, `scale_b` are the inverse scales) and written in the
compute dtype. Backward casts the output's gradient to e5m2 (2 mantissa bits, max 57344:
gradients span a wider range than activations) and computes grad_x = g @ w and grad_w = g^T @ x
from the FP8 operands the forward saved, grad_w with an fp32 output. Tensorwise scaling is what
cuBLAS supports on sm_89.

The casts (amax, scale, convert, and the transposed copy the backward matmuls take as their
column-major operand) are gptfast's Triton kernels (kernels/fp8.py), bitwise `reference_to_fp8`.
Saved for backward: the input's FP8 transpose (1 B per element, where bf16 saves 2) and the
weight's. A weight's FP8 copies can be made once per optimizer step (`cast_weight`, kept by
gptfast.gradaccum with kernels.fused_grad_accum) instead of at every forward.

Error bound. Rounding to e4m3 changes each element by at most 2^-4 of itself (half an ulp at 3
mantissa bits); a dot product of K such products, with independent errors, is off by about
2^-4 x sqrt(2/3) ~ 5% of its magnitude, rms. e5m2 has twice the step: ~10% for the gradients,
which also meet the e4m3 operands. The tests bound the relative Frobenius error at twice those.

`_scaled_mm` wants its first operand row-major, its second column-major and, on CUDA, every
dimension a multiple of 16; `check_fp8_shape` names the width that is not.
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


def reference_to_fp8(t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(t in `dtype`, scaled so its amax is dtype's largest value; the fp32 inverse scale), in
    PyTorch ops: the reference kernels/fp8.py's casts equal bitwise."""
    fp8_max = torch.finfo(dtype).max
    amax = t.abs().amax().float().clamp(min=AMAX_FLOOR)
    scale = amax.new_full((), fp8_max) / amax  # an IEEE division (fp8_max / amax is reciprocal-times)
    # clamp: a value at amax times a rounded scale can land just past the largest finite value
    fp8 = (t.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)
    return fp8, scale.reciprocal()


def _cast(t: torch.Tensor, dtype: torch.dtype, transpose: bool = False):
    """kernels.fp8.to_fp8 (imported here: gptfast imports where Triton is missing, without FP8)."""
    from kernels.fp8 import to_fp8

    return to_fp8(t, dtype, transpose)


def _mm(a: torch.Tensor, a_inv: torch.Tensor, b: torch.Tensor, b_inv: torch.Tensor,
        out_dtype: torch.dtype) -> torch.Tensor:
    """a (M, K) row-major @ b (K, N) column-major, both FP8, unscaled into `out_dtype`."""
    return torch._scaled_mm(a, b, scale_a=a_inv, scale_b=b_inv, out_dtype=out_dtype)


def cast_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A weight (out, in)'s FP8 copies: e4m3 row-major (the forward's operand), its transpose (in,
    out) row-major (grad_x's), and the fp32 inverse scale."""
    w8, w8_t, w_inv = _cast(weight.detach(), E4M3, transpose=True)
    return w8, w8_t, w_inv


@torch.library.custom_op("gptfast::accumulate_grad", mutates_args=("main_grad",))
def accumulate_grad(main_grad: torch.Tensor, grad: torch.Tensor) -> None:
    """main_grad += grad, in place (an op torch.compile keeps as a mutation of the saved buffer)."""
    main_grad.add_(grad)


@accumulate_grad.register_fake
def _(main_grad, grad):
    return None


class FP8Linear(torch.autograd.Function):
    """y (N, out) = x (N, in) @ weight (out, in)^T + bias in FP8, written in `out_dtype`; the
    gradients of x, weight and bias come back in their own dtypes, or the weight's is added into
    `main_grad` (kernels.fused_grad_accum). `w8`, `w8_t`, `w_inv`: the weight's FP8 copies made
    once per optimizer step (cast_weight), or None to cast it now."""

    @staticmethod
    def forward(ctx, x, weight, bias, main_grad, w8, w8_t, w_inv, out_dtype):
        x8, x8_t, x_inv = _cast(x, E4M3, transpose=True)
        if w8 is None:
            w8, w8_t, w_inv = cast_weight(weight)
        y = _mm(x8, x_inv, w8.t(), w_inv, out_dtype)  # w8 (out, in) row-major is w^T column-major
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(x8_t, x_inv, w8_t, w_inv, main_grad)  # FP8: half of bf16's bytes
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x8_t, x_inv, w8_t, w_inv, main_grad = ctx.saved_tensors
        x_dtype, w_dtype, bias_dtype = ctx.dtypes
        g8, g8_t, g_inv = _cast(grad_y, E5M2, transpose=True)
        grad_x = _mm(g8, g_inv, w8_t.t(), w_inv, x_dtype)  # (N, out) @ (out, in)
        grad_w = _mm(g8_t, g_inv, x8_t.t(), x_inv, torch.float32)  # (out, N) @ (N, in)
        if main_grad is not None:
            accumulate_grad(main_grad, grad_w)
            grad_w = None
        else:
            grad_w = grad_w.to(w_dtype)
        grad_bias = None if bias_dtype is None else grad_y.sum(0, dtype=torch.float32).to(bias_dtype)
        return grad_x, grad_w, grad_bias, None, None, None, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
               out_dtype: torch.dtype = torch.bfloat16, main_grad: torch.Tensor | None = None,
               cached: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`x @ weight.T + bias` (x (..., in), weight (out, in)) through e4m3 operands, tensorwise
    scaled, e5m2 output gradients in backward; the result in `out_dtype`. main_grad: an fp32
    buffer the weight's gradient is added into instead of returned; cached: cast_weight(weight)."""
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"fp8_linear: x (..., in) and weight (out, in) must share in, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    if x.is_cuda:
        check_fp8_shape("the input", weight.shape[1])
        check_fp8_shape("the output", weight.shape[0])
    rows = x.reshape(-1, x.shape[-1])
    w8, w8_t, w_inv = cached or (None, None, None)
    y = FP8Linear.apply(rows, weight, bias, main_grad, w8, w8_t, w_inv, out_dtype)
    return y.view(*x.shape[:-1], weight.shape[0])
