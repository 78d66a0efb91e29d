"""One optimizer step, gradient clipping included, over GPT-2's parameter sets: gptfast's FusedAdamW
vs torch.optim.AdamW (foreach) and torch.optim.AdamW(fused=True), each after clip_grad_norm_.

Floor per parameter: read p, g, m, v and write p, m, v (28 bytes with fp32 gradients), plus the
gradient read once more for the norm (4 bytes): 32 bytes.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import bandwidth_row, on_gpu, time_calls
from gptfast.config import ModelConfig
from gptfast.model import GPT
from gptfast.optim import FusedAdamW, param_groups

MODELS = {"124M": ModelConfig(n_layer=12, n_head=12, n_embd=768),
          "350M": ModelConfig(n_layer=24, n_head=16, n_embd=1024)} if on_gpu() else \
         {"tiny": ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=64)}
PROVIDERS = ["gptfast", "torch_foreach", "torch_fused"]
BYTES_PER_PARAM = 32
MAX_NORM = 1.0


def setup(model_cfg: ModelConfig, provider: str, device: torch.device):
    model = GPT(model_cfg).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    groups = param_groups(model, 0.1)
    if provider == "gptfast":
        opt = FusedAdamW(groups, lr=6e-4, betas=(0.9, 0.95), max_grad_norm=MAX_NORM)

        def step():
            opt.step()
    else:
        fused = provider == "torch_fused"
        try:
            opt = torch.optim.AdamW(groups, lr=6e-4, betas=(0.9, 0.95), fused=fused, foreach=not fused)
        except RuntimeError as e:  # a torch without fused AdamW for this device
            pytest.skip(f"{provider} cannot run on {device.type}: {e}")

        def step():
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM, foreach=True)
            opt.step()
    n_params = sum(p.numel() for p in model.parameters())
    return step, n_params


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", list(MODELS))
def test_adamw_step(benchmark, record, device, bandwidth, size, provider):
    step, n_params = setup(MODELS[size], provider, device)
    seconds = time_calls(benchmark, lambda i: step(), device, 1, rounds=10)
    row = record(bandwidth_row("adamw", f"step + clip {size} ({n_params / 1e6:.1f}M params) fp32 grads", provider,
                               seconds, BYTES_PER_PARAM * n_params, bandwidth))
    benchmark.extra_info.update(gbps=row.gbps, floor_fraction=row.floor_fraction, params=n_params)
