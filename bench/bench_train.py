"""Training throughput per config: gptfast (every Triton kernel and the fused weight-gradient
accumulation on, micro-batch and recomputation planned into the GPU's memory) vs the PyTorch path at the config's micro-batch (torch LayerNorm,
F.cross_entropy, torch's fused AdamW, flash SDPA; the nanoGPT recipe), both compiled.

One timed call is one optimizer step of the trainer itself (Trainer.train_step: every micro-batch
of the accumulation, clipping, the optimizer), on random tokens. Reports tokens/s, MFU against the
device's dense bf16 peak, and peak memory. With --emulate-vram=12GiB a larger GPU is capped to
that much memory: a config that does not fit at its micro-batch is retried at half the micro-batch
(twice the accumulation, the same tokens per step), and the result says which micro-batch fit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.common import Row, on_gpu, peak_flops, synchronize, time_calls
from gptfast.config import parse_bytes
from gptfast.configfile import load_config
from gptfast.hardware import mfu
from gptfast.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["small_4070", "speedrun_124m_4070", "mid_4070", "medium_4070"] if on_gpu() else ["cpu_smoke"]
PROVIDERS = {
    "gptfast": ["--kernels.layernorm=true", "--kernels.cross_entropy=true", "--kernels.adamw=true",
                "--kernels.fused_grad_accum=true"],
    # FP8 matmuls for the MLP and the head (kernels.fp8): its ratio to "gptfast" is what FP8 buys
    "gptfast_fp8": ["--kernels.layernorm=true", "--kernels.cross_entropy=true", "--kernels.adamw=true",
                    "--kernels.fused_grad_accum=true", '--kernels.fp8="head+mlp"'],
    "pytorch": ["--kernels.layernorm=false", "--kernels.cross_entropy=false", "--kernels.adamw=false",
                "--kernels.fused_grad_accum=false"],
}


def build_trainer(config: str, provider: str, micro_batch: int | None, accum: int | None, data: Path, out: Path,
                  budget_bytes: int | None = None, extra: tuple[str, ...] = ()):
    overrides = PROVIDERS[provider] + [f"--data.data_dir={data}", "--data.dataset=random", f"--train.out_dir={out}",
                                      "--train.resume=false", "--train.sample_tokens=0"]
    if budget_bytes is not None and provider.startswith("gptfast"):
        # gptfast plans its micro-batch and recomputation into the memory it has
        overrides.append(f"--train.memory_budget={budget_bytes / 2**30:.2f}GiB")
    elif micro_batch is not None:
        overrides += [f"--train.micro_batch_size={micro_batch}", f"--train.grad_accum_steps={accum}"]
    if not on_gpu():  # the CPU case exercises the harness: eager, two small micro-batches per step
        overrides += ["--train.compile=false", "--train.micro_batch_size=2", "--train.grad_accum_steps=2",
                      "--train.device=cpu"]
    overrides += extra  # the caller's settings last: they win
    return Trainer(load_config(REPO / "configs" / f"{config}.toml", overrides), log=lambda _: None)


# On the CPU (the harness's own check) FP8 is left out: the interpreter's casts of the head's
# weight add minutes, and the provider differs from gptfast's only by its one override.
@pytest.mark.parametrize("provider", list(PROVIDERS) if on_gpu() else ["gptfast", "pytorch"])
@pytest.mark.parametrize("config", CONFIGS)
def test_train_step(benchmark, record, request, device, device_info, token_dir, tmp_path, config, provider):
    vram = request.config.getoption("--emulate-vram")
    budget = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        budget = min(total, parse_bytes(vram)) if vram else total
        if vram:
            torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), device)
        budget = int(budget * 0.92)  # the CUDA context and allocator reserve live outside the plan
    base = load_config(REPO / "configs" / f"{config}.toml")
    micro_batch, accum = base.train.micro_batch_size, base.train.grad_accum_steps
    while True:
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            trainer = build_trainer(config, provider, micro_batch, accum, token_dir, tmp_path,
                                    budget if micro_batch == base.train.micro_batch_size else None)
            seconds = time_calls(benchmark, lambda i, trainer=trainer: trainer.train_step(), device, 1,
                                 target_round_s=0.0, rounds=3 if device.type == "cuda" else 2)
            synchronize(device)
            break
        except torch.cuda.OutOfMemoryError:
            trainer = None
            if micro_batch == 1:
                record(Row("train", f"{config} ({vram or 'full'} VRAM)", provider, float("nan"),
                           extra={"result": "does not fit at micro-batch 1"}))
                return
            micro_batch, accum = micro_batch // 2, accum * 2
    cfg = trainer.cfg
    tokens_per_second = cfg.tokens_per_step / seconds
    peak, source = peak_flops(device_info, device)
    utilisation = mfu(trainer.model.flops_per_token(), tokens_per_second, peak)
    peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    row = record(Row("train", f"{config} ({vram or 'full'} VRAM)", provider, seconds, extra={
        "tokens/s": f"{tokens_per_second:,.0f}",
        "MFU": f"{100 * utilisation:.1f}% ({source})" if utilisation is not None else f"n/a ({source})",
        "peak GiB": "n/a on CPU" if peak_bytes is None else f"{peak_bytes / 2**30:.2f}",
        "micro-batch": f"{cfg.train.micro_batch_size} x {cfg.train.grad_accum_steps}",
    }))
    benchmark.extra_info.update(tokens_per_second=tokens_per_second, mfu=utilisation, peak_bytes=peak_bytes,
                                micro_batch=cfg.train.micro_batch_size, case=row.case)
