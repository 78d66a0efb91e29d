"""FP8 matmuls (kernels.fp8): each Linear shape of GPT-2 small and medium, bf16 against FP8, and
the head inside the fused loss, bf16 against FP8.

linear: forward + backward of y = x @ w^T at a micro-batch's rows (8 sequences of 1024 tokens), the
shapes of one block (attention's qkv and projection, the MLP's c_fc and c_proj). Providers:
`torch` is F.linear in bf16 (the PyTorch path: cuBLAS's bf16 GEMMs); `gptfast` is gptfast.fp8's
FP8Linear with every cast it makes (the input's and the output gradient's amax, scale, convert and
transposed copy; the weight's cast once per optimizer step, outside the timing, as
kernels.fused_grad_accum keeps it); `gptfast_weightcast` casts the weight at every call too (FP8
without fused_grad_accum); `fp8_matmuls_only` is the three `torch._scaled_mm` calls alone on
operands cast beforehand: the ceiling, what the casts cost is gptfast's distance from it;
`torchao` is torchao.float8's Float8Linear (tensorwise recipe, the library a user would reach
for; docs/kernels.md compares it), compiled as torchao requires for its casts to fuse, where
torchao is installed (`pip install torchao`; skipped, saying so, where it is not).

head: linear_cross_entropy forward + backward at the padded vocabulary, gptfast's fused loss in
bf16 (`torch`) against the same loss with its three matmuls in FP8 (`gptfast`, the weight's copies
made once per optimizer step).
"""

from __future__ import annotations

import pytest
import torch

from bench.common import Row, on_gpu, rotating, time_calls
from gptfast.config import KernelsConfig, ModelConfig
from gptfast.fp8 import E4M3, E5M2, cast_weight, fp8_linear
from kernels import linear_cross_entropy

ROWS = 8192 if on_gpu() else 64
# (model, layer, in, out): GPT-2 small (C = 768) and medium (C = 1024)
SHAPES = [(model, layer, fan_in, fan_out)
          for model, c in (("124M", 768), ("350M", 1024))
          for layer, fan_in, fan_out in (("qkv", c, 3 * c), ("attn proj", c, c), ("c_fc", c, 4 * c),
                                         ("c_proj", 4 * c, c))] if on_gpu() else [("tiny", "c_fc", 64, 256)]
PROVIDERS = ["gptfast", "gptfast_weightcast", "fp8_matmuls_only", "torchao", "torch"]
VOCAB = 50257 if on_gpu() else 1000  # the CPU case checks the harness: a small vocabulary keeps it short
PADDED_VOCAB = ModelConfig(vocab_size=VOCAB).padded_vocab_size
HEAD_WIDTHS = [768, 1024] if on_gpu() else [64]


def torchao_linear(fan_in: int, fan_out: int, weight: torch.Tensor):
    """torchao's Float8Linear (tensorwise) over `weight`, compiled; pytest.skip where torchao is missing."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        pytest.skip(f"torchao is not installed ({e}); `pip install torchao` to compare with it")
    linear = torch.nn.Linear(fan_in, fan_out, bias=False, device=weight.device)
    with torch.no_grad():
        linear.weight.copy_(weight)
    module = convert_to_float8_training(torch.nn.Sequential(linear),
                                        config=Float8LinearConfig.from_recipe_name("tensorwise"))
    return torch.compile(module)


def matmuls_only(x8, x8_t, x_inv, w8, w8_t, w_inv, g8, g8_t, g_inv):
    """The FP8 Linear's three products on operands already cast: forward, grad_x, grad_w."""
    torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=torch.bfloat16)
    torch._scaled_mm(g8, w8_t.t(), scale_a=g_inv, scale_b=w_inv, out_dtype=torch.bfloat16)
    torch._scaled_mm(g8_t, x8_t.t(), scale_a=g_inv, scale_b=x_inv, out_dtype=torch.float32)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}-{s[1].replace(' ', '_')}-{s[2]}x{s[3]}")
def test_linear(benchmark, record, device, shape, provider):
    from kernels.fp8 import to_fp8

    model, layer, fan_in, fan_out = shape
    weight = (torch.randn(fan_out, fan_in, device=device) * 0.02).requires_grad_()
    weight_bf16 = weight.detach().to(torch.bfloat16).requires_grad_()
    cached = cast_weight(weight)
    main_grad = torch.zeros_like(weight)  # the fused accumulation's fp32 buffer, as the trainer passes it

    def make():
        x = torch.randn(ROWS, fan_in, device=device, dtype=torch.bfloat16, requires_grad=True)
        return x, torch.randn(ROWS, fan_out, device=device, dtype=torch.bfloat16)

    sets = rotating(make, ROWS * (fan_in + fan_out) * 2, device)
    if provider == "fp8_matmuls_only":
        sets = [(*to_fp8(x.detach(), E4M3, True), *cached, *to_fp8(g, E5M2, True)) for x, g in sets]
    ao = torchao_linear(fan_in, fan_out, weight.detach()) if provider == "torchao" else None

    def call(i):
        if provider == "fp8_matmuls_only":
            x8, x8_t, x_inv, w8, w8_t, w_inv, g8, g8_t, g_inv = sets[i]
            return matmuls_only(x8, x8_t, x_inv, w8, w8_t, w_inv, g8, g8_t, g_inv)
        x, grad_y = sets[i]
        if provider == "torch":
            y = torch.nn.functional.linear(x, weight_bf16)
        elif provider == "torchao":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                y = ao(x)
        else:
            ours = dict(cached=cached, main_grad=main_grad) if provider == "gptfast" else {}
            y = fp8_linear(x, weight, out_dtype=torch.bfloat16, **ours)
        y.backward(grad_y)

    seconds = time_calls(benchmark, call, device, len(sets))
    flops = 6 * ROWS * fan_in * fan_out
    row = record(Row("fp8", f"{model} {layer} fwd+bwd N={ROWS} {fan_in}->{fan_out}", provider, seconds,
                     extra={"TFLOP/s": f"{flops / seconds / 1e12:,.1f}"}))
    benchmark.extra_info.update(case=row.case, tflops=flops / seconds / 1e12)


@pytest.mark.parametrize("provider", ["gptfast", "torch"])
@pytest.mark.parametrize("width", HEAD_WIDTHS)
def test_head_in_the_fused_loss(benchmark, record, device, width, provider):
    weight = (torch.randn(PADDED_VOCAB, width, device=device) * 0.02).requires_grad_()
    weight_bf16 = weight.detach().to(torch.bfloat16).requires_grad_()
    cached = cast_weight(weight) if provider == "gptfast" else None

    def make():
        hidden = torch.randn(ROWS, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        return hidden, torch.randint(0, VOCAB, (ROWS,), device=device)

    sets = rotating(make, ROWS * width * 2 * 2, device)
    chunk = KernelsConfig().loss_chunk_mib * 2**20

    def call(i):
        hidden, targets = sets[i]
        if provider == "gptfast":
            loss = linear_cross_entropy(hidden, weight, targets, n_classes=VOCAB, compute_dtype=torch.bfloat16,
                                        chunk_bytes=chunk, fp8=True, fp8_weight=cached)
        else:
            loss = linear_cross_entropy(hidden, weight_bf16, targets, n_classes=VOCAB, compute_dtype=torch.bfloat16,
                                        chunk_bytes=chunk)
        loss.backward()

    seconds = time_calls(benchmark, call, device, len(sets), rounds=10)
    flops = 6 * ROWS * width * PADDED_VOCAB
    row = record(Row("fp8", f"head in the fused loss fwd+bwd N={ROWS} C={width} V={PADDED_VOCAB}", provider,
                     seconds, extra={"TFLOP/s": f"{flops / seconds / 1e12:,.1f}", "tokens/s": f"{ROWS / seconds:,.0f}"}))
    benchmark.extra_info.update(case=row.case, tflops=flops / seconds / 1e12)
