"""FP8 matmuls (gptfast/fp8.py) against fp32 and bf16 on the CPU (torch._scaled_mm runs there):
outputs and gradients within the e4m3 / e5m2 error bounds stated in the module, saturation and an
all-zero tensor, the shape rule; the Triton casts (kernels/fp8.py, through the interpreter)
bitwise against the PyTorch reference."""

import pytest
import torch

from gptfast.fp8 import E4M3, E5M2, cast_weight, check_fp8_shape, fp8_linear, reference_to_fp8


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.parametrize("n, k, m", [(64, 96, 48), (37, 160, 112), (1, 768, 256)])  # odd rows, GPT-2's width
@pytest.mark.parametrize("seed", [0, 1])
def test_output_and_gradients_within_the_fp8_bounds(n, k, m, seed):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, k, generator=generator)
    w = torch.randn(m, k, generator=generator) * 0.02
    g = torch.randn(n, m, generator=generator)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (xr @ wr.t()).backward(g)  # the fp32 reference
    xb, wb = x.bfloat16().requires_grad_(), w.clone().requires_grad_()
    y = fp8_linear(xb, wb)
    y.backward(g.bfloat16())
    assert y.dtype == torch.bfloat16 and xb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.float32
    # bounds: twice the rms errors the module derives (e4m3 forward ~5%, e5m2 gradients ~10%)
    assert relative_error(y, x @ w.t()) < 0.10
    assert relative_error(xb.grad, xr.grad) < 0.20
    assert relative_error(wb.grad, wr.grad) < 0.20
    # and FP8 is measurably coarser than bf16 (the test would pass a bf16 matmul called FP8)
    assert relative_error(y, x @ w.t()) > 4 * relative_error(xb @ wb.bfloat16().t(), x @ w.t())


def test_scaling_uses_the_whole_range_and_saturates_nothing():
    t = torch.tensor([[-3.0, 0.5, 1e-3, 2.0]])
    for dtype in (E4M3, E5M2):
        fp8, inverse = reference_to_fp8(t, dtype)
        assert fp8.float().abs().max().item() == torch.finfo(dtype).max  # amax maps to the largest value
        assert torch.isfinite(fp8.float()).all()
        torch.testing.assert_close(fp8.float() * inverse, t, rtol=0.13, atol=0)
    huge = torch.tensor([1e30, -1e30, 1.0])  # beyond every fp8 range before scaling
    fp8, inverse = reference_to_fp8(huge, E4M3)
    assert torch.isfinite(fp8.float()).all() and fp8.float()[0].item() == 448.0


def test_an_all_zero_tensor_gives_zeros_not_nan():
    fp8, inverse = reference_to_fp8(torch.zeros(4, 16), E4M3)
    assert torch.isfinite(inverse) and (fp8.float() == 0).all()
    x = torch.zeros(16, 32, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(16, 32, requires_grad=True)
    y = fp8_linear(x, w)
    y.backward(torch.ones_like(y))
    assert (y == 0).all() and (w.grad == 0).all() and torch.isfinite(x.grad.float()).all()


def test_a_width_fp8_cannot_take_is_named():
    check_fp8_shape("the input", 768)
    with pytest.raises(ValueError, match="the output is 50257 wide, and FP8 matmuls need a multiple of 16"):
        check_fp8_shape("the output", 50257)
    with pytest.raises(ValueError, match="must share in"):
        fp8_linear(torch.zeros(2, 8), torch.zeros(4, 16))


def test_batched_input_keeps_its_leading_shape():
    x = torch.randn(2, 3, 32, dtype=torch.bfloat16)
    w = torch.randn(48, 32)
    y = fp8_linear(x, w)
    assert y.shape == (2, 3, 48)
    assert torch.equal(y, fp8_linear(x.reshape(6, 32), w).view(2, 3, 48))  # one tensorwise scale for all rows


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("shape", [(1, 1), (37, 53), (130, 300), (64, 768)])  # odd, across tiles, GPT-2's width
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fmt", [E4M3, E5M2])
def test_triton_cast_equals_the_reference_bitwise(shape, dtype, fmt):
    from kernels.fp8 import to_fp8

    generator = torch.Generator().manual_seed(hash((shape, fmt)) % 2**31)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    x.view(-1)[:: 7] *= 1e-4  # values that land among the format's subnormals after scaling
    want, want_inverse = reference_to_fp8(x, fmt)
    got, got_t, inverse = to_fp8(x, fmt, transpose=True)
    assert got.dtype == fmt and got.shape == shape and got_t.shape == shape[::-1]
    assert torch.equal(bits(got), bits(want)) and torch.equal(bits(got_t), bits(want.t().contiguous()))
    assert inverse.dtype == torch.float32 and inverse.item() == want_inverse.item()
    assert to_fp8(x, fmt)[1] is None


def test_triton_cast_reads_strided_input_and_keeps_signs_and_extremes():
    from kernels.fp8 import to_fp8

    base = torch.randn(90, 70, generator=torch.Generator().manual_seed(3))
    strided = base[1::2, ::3]  # neither stride is the width
    got, got_t, inverse = to_fp8(strided, E4M3, transpose=True)
    want, want_inverse = reference_to_fp8(strided, E4M3)
    assert torch.equal(bits(got), bits(want)) and torch.equal(bits(got_t), bits(want.t().contiguous()))
    special = torch.tensor([[-0.0, 0.0, 1e30, -1e30, 1.0, 448.0 * 2 ** -10]])
    for fmt in (E4M3, E5M2):
        got, _, inverse = to_fp8(special, fmt)
        want, want_inverse = reference_to_fp8(special, fmt)
        assert torch.equal(bits(got), bits(want)) and inverse.item() == want_inverse.item()
    zeros, _, inverse = to_fp8(torch.zeros(5, 3), E5M2)
    assert torch.isfinite(inverse) and (zeros.float() == 0).all()


def test_triton_cast_refuses_what_it_cannot_cast():
    from kernels.fp8 import to_fp8

    with pytest.raises(ValueError, match="must be float8_e4m3fn or float8_e5m2"):
        to_fp8(torch.zeros(2, 2), torch.bfloat16)
    with pytest.raises(ValueError, match="must be 2-D"):
        to_fp8(torch.zeros(2, 2, 2), E4M3)


def test_fp8_linear_with_a_bias_a_cached_weight_and_an_accumulated_gradient():
    """The bias's gradient is the output gradient's sum; a weight cast once (cast_weight) gives the
    same result as casting at the call; main_grad receives the weight's gradient (added to what it
    held) and autograd gets none."""
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(24, 32, generator=generator, dtype=torch.bfloat16)
    w = torch.randn(48, 32, generator=generator, requires_grad=True)
    b = torch.randn(48, generator=generator, requires_grad=True)
    g = torch.randn(24, 48, generator=generator, dtype=torch.bfloat16)
    y = fp8_linear(x, w, b)
    y.backward(g)
    torch.testing.assert_close(b.grad, g.float().sum(0), rtol=1e-2, atol=1e-2)
    grad_w = w.grad.clone()
    w.grad = None
    main_grad = torch.ones(48, 32)
    y_cached = fp8_linear(x, w, b, main_grad=main_grad, cached=cast_weight(w))
    assert torch.equal(y_cached, y)
    y_cached.backward(g)
    assert w.grad is None
    torch.testing.assert_close(main_grad, grad_w + 1)
