"""The step-cost model beside the measured step: per config and provider, the model's ESTIMATED
milliseconds per category for one micro-step (gptfast.stepcost), and on a GPU the kernel time
the profiler measures in the same categories, with predicted / measured: what a GPU run uses to
calibrate the efficiencies in gptfast.hardware.

On the CPU only the model's table is written (for the RTX 4070), and the timed call is the
counting itself (seconds, at the config's real shapes).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from bench.bench_train import PROVIDERS, build_trainer
from bench.common import Row, on_gpu
from gptfast.configfile import load_config
from gptfast.hardware import CARDS, normalise_device_name
from gptfast.stepcost import CATEGORIES, StepCost, count_step, modelled_time

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["small_4070", "speedrun_124m_4070", "medium_4070"]
# CUDA kernel names -> the model's categories (first match wins); the rest is "other elementwise"
KERNEL_CATEGORIES = [
    (r"flash|fmha|attention|sdpa", "attention"),
    (r"_amax_kernel|_cast_kernel", "fp8 casts"),  # kernels/fp8.py's
    (r"e4m3|e5m2|fp8|f8f6f4", "fp8 matmuls"),
    (r"gemm|sm\d+_xmma|cutlass|ampere_|hopper_|ada_|cublas|matmul", "matmuls"),
    (r"layer_norm|rms_norm|layernorm|_norm_", "norms"),
    (r"softmax|nll_loss|cross_entropy", "loss"),
    (r"adam|foreach|muon", "optimizer"),
]


def category_of(kernel: str) -> str:
    for pattern, category in KERNEL_CATEGORIES:
        if re.search(pattern, kernel, re.IGNORECASE):
            return category
    return "other elementwise"


def card_here(device: torch.device) -> str:
    if device.type == "cuda":
        name = normalise_device_name(torch.cuda.get_device_name(device))
        if name in CARDS:
            return CARDS[name].name
    return "RTX 4070"


def measured_micro_step_ms(trainer) -> dict[str, float]:
    """Kernel milliseconds per category of one optimizer step / its micro-steps (the profiler's
    device time)."""
    from torch.profiler import ProfilerActivity, profile

    trainer.train_step()  # warm: compiled, allocated
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        trainer.train_step()
        torch.cuda.synchronize()
    out = dict.fromkeys(CATEGORIES, 0.0)
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us and event.key and not event.key.startswith("ProfilerStep"):
            out[category_of(event.key)] += device_us / 1e3
    accum = trainer.cfg.train.grad_accum_steps
    return {c: v / accum for c, v in out.items()}


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("config", CONFIGS)
def test_step_cost_model(benchmark, record, device, token_dir, tmp_path, config, provider):
    cfg = load_config(REPO / "configs" / f"{config}.toml", PROVIDERS[provider])
    card = card_here(device)
    cost: StepCost = benchmark.pedantic(lambda: count_step(cfg), rounds=1, iterations=1)
    per_micro = {c: s / cost.grad_accum_steps * 1e3 for c, s in modelled_time(cost, card).items()}
    extra = {f"model {c} ms (est.)": round(v, 2) for c, v in per_micro.items()}
    extra.update({f"{c} GB": round(cost.micro.bytes[c] / 1e9, 3) for c in CATEGORIES},
                 card=card, micro_batch=cfg.train.micro_batch_size)
    if on_gpu():
        trainer = build_trainer(config, provider, cfg.train.micro_batch_size, cfg.train.grad_accum_steps,
                                token_dir, tmp_path / "run")
        try:
            measured = measured_micro_step_ms(trainer)
        finally:
            trainer.close()
        extra.update({f"measured {c} ms": round(v, 2) for c, v in measured.items()})
        extra.update({f"{c} predicted/measured": round(per_micro[c] / measured[c], 2)
                      for c in CATEGORIES if measured[c] > 0})
    case = f"{config} micro-batch {cfg.train.micro_batch_size}, one micro-step"
    record(Row("stepcost", case, provider, sum(per_micro.values()) / 1e3, extra=extra))
