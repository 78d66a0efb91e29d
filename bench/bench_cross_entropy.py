"""Cross-entropy and fused linear + cross-entropy: gptfast vs torch eager vs torch.compile.

cross_entropy forward + backward, bf16 logits (N, V): the floor reads the logits once and writes
their gradient once, 2 * 2 * N * V bytes (the kernel reads them twice: once for the log-sum-exp,
once for the gradient). linear_cross_entropy is held against F.linear + F.cross_entropy on time and
on the peak memory the loss adds on top of its inputs, beside the peers our users could run
instead (the `peers` extra): Liger-Kernel's fused linear cross-entropy and Apple's Cut
Cross-Entropy. The weight is the model's padded (50304, C) head; each provider uses it as it
would in the model: the PyTorch path masks the padding columns (GPT.forward), gptfast's kernel takes the
whole padded weight and masks the padding itself; the peers take the real vocabulary's rows (a
view of the leading rows, no copy).
"""

from __future__ import annotations

import functools

import pytest
import torch

from bench.common import Row, bandwidth_row, on_gpu, rotating, synchronize, time_calls
from bench.peers import cce_linear_cross_entropy, liger_linear_cross_entropy, probe
from gptfast.config import KernelsConfig, ModelConfig
from gptfast.model import MaskColumns
from kernels import cross_entropy, linear_cross_entropy
from tests.reference import cross_entropy_ref, soft_cap_ref

VOCAB = 50257
CE_ROWS = [8192, 16384] if on_gpu() else [64]
PADDED_VOCAB = ModelConfig(vocab_size=VOCAB).padded_vocab_size
LINEAR_SHAPES = [(8192, 768), (8192, 1024), (16384, 768), (16384, 1024)] if on_gpu() else [(64, 64)]
PROVIDERS = ["gptfast", "torch", "torch_compile"]
LINEAR_PROVIDERS = PROVIDERS + ["liger", "cce"]
# (provider, soft cap): the modern architecture's capped loss (30, modded-nanogpt's) against the
# PyTorch path that caps the logits it holds; the peers at the uncapped loss only.
LINEAR_CASES = [(p, 0.0) for p in LINEAR_PROVIDERS] + [(p, 30.0) for p in PROVIDERS]


def torch_cross_entropy(logits, targets):
    return cross_entropy_ref(logits, targets)


def torch_linear_cross_entropy(hidden, weight, targets, softcap=0.0):
    """The model's PyTorch path: padded logits (soft-capped in fp32 when asked), padding columns
    masked, cross_entropy."""
    logits = soft_cap_ref(torch.nn.functional.linear(hidden, weight), softcap)
    logits = MaskColumns.apply(logits, VOCAB)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


def gptfast_linear_cross_entropy(hidden, weight, targets, softcap=0.0):
    """As the model calls it: the whole padded weight, the padding masked in the kernel (and the
    cap applied there), the chunk the run's fixed budget (kernels.loss_chunk_mib)."""
    return linear_cross_entropy(hidden, weight, targets, n_classes=VOCAB, compute_dtype=torch.bfloat16,
                                chunk_bytes=KernelsConfig().loss_chunk_mib * 2**20, softcap=softcap)


def peer_linear_cross_entropy(provider):
    if provider == "liger":
        fn = liger_linear_cross_entropy()
        return lambda hidden, weight, targets: fn(hidden, weight[:VOCAB], targets)
    fn = cce_linear_cross_entropy()
    return lambda hidden, weight, targets: fn(hidden, weight[:VOCAB], targets)


def provider_fn(provider, ours, theirs):
    if provider == "gptfast":
        return ours
    return torch.compile(theirs) if provider == "torch_compile" else theirs


def peak_loss_memory(run, device) -> int | None:
    """Bytes the loss's forward + backward allocates above what was live before it."""
    if device.type != "cuda":
        return None
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("n_rows", CE_ROWS)
def test_cross_entropy(benchmark, record, device, bandwidth, n_rows, provider):
    fn = provider_fn(provider, cross_entropy, torch_cross_entropy)
    bytes_moved = 2 * n_rows * VOCAB * 2

    def make():
        logits = torch.randn(n_rows, VOCAB, device=device, dtype=torch.bfloat16, requires_grad=True)
        return logits, torch.randint(0, VOCAB, (n_rows,), device=device)

    sets = rotating(make, bytes_moved, device)

    def call(i):
        logits, targets = sets[i]
        torch.autograd.grad(fn(logits, targets), logits)

    seconds = time_calls(benchmark, call, device, len(sets))
    row = bandwidth_row("cross_entropy", f"fwd+bwd N={n_rows} V={VOCAB} bf16", provider, seconds, bytes_moved,
                        bandwidth)
    peak = peak_loss_memory(lambda: call(0), device)
    row.extra["loss peak MiB"] = None if peak is None else round(peak / 2**20)
    record(row)
    benchmark.extra_info.update(gbps=row.gbps, floor_fraction=row.floor_fraction, peak_bytes=peak)


@pytest.mark.parametrize("provider, softcap", LINEAR_CASES, ids=[f"{p}-cap{c:g}" for p, c in LINEAR_CASES])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=lambda s: f"N{s[0]}-C{s[1]}")
def test_linear_cross_entropy(benchmark, record, device, shape, provider, softcap):
    n_rows, width = shape
    weight = (torch.randn(PADDED_VOCAB, width, device=device) * 0.02).to(torch.bfloat16).requires_grad_()
    if provider in ("liger", "cce"):
        fn = peer_linear_cross_entropy(provider)
        tiny = torch.randn(4, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        probe(provider, lambda: fn(tiny, weight, torch.randint(0, VOCAB, (4,), device=device)).backward(), device)
    else:
        ours, theirs = gptfast_linear_cross_entropy, torch_linear_cross_entropy
        if softcap:
            ours, theirs = (functools.partial(f, softcap=softcap) for f in (ours, theirs))
        fn = provider_fn(provider, ours, theirs)

    def make():
        hidden = torch.randn(n_rows, width, device=device, dtype=torch.bfloat16, requires_grad=True)
        return hidden, torch.randint(0, VOCAB, (n_rows,), device=device)

    sets = rotating(make, n_rows * width * 2 * 2, device)

    def call(i):
        hidden, targets = sets[i]
        torch.autograd.grad(fn(hidden, weight, targets), (hidden, weight))

    seconds = time_calls(benchmark, call, device, len(sets), rounds=10)
    peak = peak_loss_memory(lambda: call(0), device)
    tokens_per_second = n_rows / seconds
    cap = f" softcap={softcap:g}" if softcap else ""
    row = record(Row("linear_cross_entropy", f"fwd+bwd N={n_rows} C={width} V={VOCAB} bf16{cap}", provider, seconds,
                     extra={"loss peak MiB": None if peak is None else round(peak / 2**20),
                            "tokens/s": f"{tokens_per_second:,.0f}"}))
    benchmark.extra_info.update(peak_bytes=peak, tokens_per_second=tokens_per_second, case=row.case)
