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


# ------------------------------------------------------------------------------------------------
# kernels.fp8 in the model

def fp8_model_grads(mode: str, fused_loss: bool = False, fused: bool = False, dtype=None, policy: str = "none",
                    arch: str = "gpt2", micro_steps: int = 2):
    """(losses, .grad of every parameter, the model) after `micro_steps` micro-batches of a tiny
    model, with kernels.fp8 = `mode`."""
    from gptfast.config import KernelsConfig, ModelConfig, RecomputeConfig
    from gptfast.gradaccum import GradAccumulation
    from gptfast.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=48, block_size=16, vocab_size=200, arch=arch, bias=True)
    model = GPT(cfg, KernelsConfig(fp8=mode, cross_entropy=fused_loss, fused_grad_accum=fused),
                RecomputeConfig(policy=policy))
    model.loss_grad_scale = 1.0 / micro_steps
    accumulation = GradAccumulation(model, dtype) if fused else None
    if accumulation:
        accumulation.begin_step()
    generator, losses = torch.Generator().manual_seed(1), []
    for _ in range(micro_steps):
        x = torch.randint(0, 200, (2, 16), generator=generator)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(x, x.roll(-1, 1)) / micro_steps
        loss.backward()
        losses.append(loss.item())
    return losses, {name: p.grad.clone() for name, p in model.named_parameters()}, model


class ScaledMMs(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts torch._scaled_mm calls: the ATen op's, and the fused loss's (its three GEMMs run
    inside its custom op, which this mode sees whole: FP8 when it is handed the weight's FP8 copy)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.overloadpacket is torch.ops.aten._scaled_mm
        if "linear_cross_entropy" in func.name():
            named = {a.name: v for a, v in zip(func._schema.arguments, args)} | (kwargs or {})
            self.calls += 3 * (named.get("weight_fp8") is not None)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode, fused_loss, expected", [("mlp", False, 12), ("head", False, 3), ("head", True, 3),
                                                        ("head+mlp", True, 15), ("off", True, 0)])
def test_the_switch_puts_exactly_its_linears_in_fp8_and_only_while_training(mode, fused_loss, expected):
    """Per micro-step, 3 FP8 GEMMs (forward, grad_x, grad_w) per Linear covered: the MLP's two in
    each of 2 blocks, the head (inside the fused loss, one chunk); evaluation runs none."""
    _, _, model = fp8_model_grads(mode, fused_loss, micro_steps=1)
    x = torch.randint(0, 200, (2, 16))
    with ScaledMMs() as counted:
        model(x, x).backward()
    assert counted.calls == expected
    model.eval()
    with ScaledMMs() as counted, torch.no_grad():
        model(x, x)
    assert counted.calls == 0


@pytest.mark.parametrize("mode", ["mlp", "head", "head+mlp"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_model_gradients_within_the_bounds_of_the_bf16_path(mode, dtype):
    """The whole model's loss and gradients with FP8 against the same model without: the loss
    within 1%, every gradient within the e5m2 bound (20% relative Frobenius), and FP8 is in use
    (some gradient differs by more than bf16 rounding)."""
    want_losses, want, _ = fp8_model_grads("off", dtype=dtype)
    got_losses, got, _ = fp8_model_grads(mode, dtype=dtype)
    assert got_losses == pytest.approx(want_losses, rel=1e-2)
    errors = {name: relative_error(got[name], want[name]) for name in want}
    assert max(errors.values()) < 0.20, errors
    assert max(errors.values()) > 0.01, errors


@pytest.mark.parametrize("arch", ["gpt2", "modern"])  # gpt2: the head tied to the embedding; modern: soft cap
def test_fp8_head_inside_the_fused_loss_equals_the_fp8_linear_head(arch):
    """With one chunk the fused loss's FP8 head casts what the FP8 Linear head casts (the hidden
    rows, the weight, the logits' gradient): the same loss and gradients to fp32 summation order.
    Mutant caught: the chunk's grad_hidden from the bf16 weight."""
    want_losses, want, _ = fp8_model_grads("head", fused_loss=False, arch=arch)
    got_losses, got, _ = fp8_model_grads("head", fused_loss=True, arch=arch)
    assert got_losses == pytest.approx(want_losses, rel=1e-5)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("fused_loss", [False, True])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_with_fused_grad_accum_equals_fp8_alone(fused_loss, dtype):
    """The FP8 copies made once per step are the casts a forward would make, and the fp32 weight
    gradient lands in the buffer: gradients equal FP8 without the fused accumulation. An FP8 Linear
    keeps no bf16 copy; the others keep theirs."""
    want_losses, want, _ = fp8_model_grads("head+mlp", fused_loss, fused=False, dtype=dtype)
    got_losses, got, model = fp8_model_grads("head+mlp", fused_loss, fused=True, dtype=dtype)
    assert got_losses == want_losses
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8, msg=name)
    block = model.transformer.h[0]
    assert block.mlp.c_fc.fp8_weight is not None and block.mlp.c_fc.weight_copy is None
    assert model.lm_head.weight_copy is None and block.attn.c_attn.weight_copy is not None


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_fp8_under_recomputation_equals_no_recomputation(policy):
    """The recomputed forward casts the same tensors to the same FP8 (selective keeps _scaled_mm's
    outputs)."""
    _, want, _ = fp8_model_grads("head+mlp", fused_loss=True, policy="none")
    _, got, _ = fp8_model_grads("head+mlp", fused_loss=True, policy=policy)
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_refresh_recasts_the_fp8_copies_after_an_update():
    from gptfast.gradaccum import GradAccumulation

    _, _, model = fp8_model_grads("head+mlp", fused_loss=True, micro_steps=1)
    accumulation = GradAccumulation(model, torch.bfloat16)
    fc = model.transformer.h[1].mlp.c_fc
    with torch.no_grad():
        fc.weight.mul_(3.0)
    accumulation.refresh()
    for kept, cast in zip(fc.fp8_weight, cast_weight(fc.weight), strict=True):
        assert torch.equal(kept.view(torch.uint8) if kept.dtype != torch.float32 else kept,
                           cast.view(torch.uint8) if cast.dtype != torch.float32 else cast)
    assert model.transformer.h[0].attn.c_attn.fp8_weight is None  # attention stays in bf16


@pytest.mark.slow
def test_fp8_model_compiles():
    """torch.compile over the FP8 model (the casts are custom ops, _scaled_mm an ATen op): the
    compiled loss and gradients are the eager ones."""
    from gptfast.config import KernelsConfig, ModelConfig
    from gptfast.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64),
                KernelsConfig(fp8="head+mlp", cross_entropy=True))
    model.loss_grad_scale = 1.0
    x = torch.randint(0, 64, (2, 16))
    eager = model(x, x)
    eager.backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model)(x, x)
    compiled.backward()
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-6)
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


def test_fp8_linear_equals_torchaos_tensorwise_float8linear():
    """The same recipe as torchao.float8's Float8Linear (tensorwise: e4m3 input and weight, e5m2
    output gradient, amax scaling; the `peers` extra installs it): y and grad_x bitwise equal; grad_w
    within bf16's rounding (torchao writes it in the input's dtype, we in fp32)."""
    pytest.importorskip("torchao.float8", reason="torchao comes with the peers extra")
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    torch.manual_seed(11)
    x = torch.randn(96, 112).to(torch.bfloat16)
    w = torch.randn(208, 112) * 0.02
    g = torch.randn(96, 208).to(torch.bfloat16)
    linear = torch.nn.Linear(112, 208, bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    theirs = convert_to_float8_training(torch.nn.Sequential(linear),
                                        config=Float8LinearConfig.from_recipe_name("tensorwise"))
    x_theirs, x_ours, w_ours = x.clone().requires_grad_(), x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_theirs = theirs(x_theirs)
    y_theirs.backward(g)
    y_ours = fp8_linear(x_ours, w_ours)
    y_ours.backward(g)
    assert torch.equal(y_ours, y_theirs)
    assert torch.equal(x_ours.grad, x_theirs.grad)
    torch.testing.assert_close(w_ours.grad, linear.weight.grad.float(), rtol=2 ** -8, atol=1e-6)
