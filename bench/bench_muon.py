"""What Muon's orthogonalisation costs, as a fraction of a training step of the same config, both
measured in this run: Muon.step() over the model's matrices (the batched Newton-Schulz per shape,
momentum, the update) against Trainer.train_step() with optim.name = "muon" (every micro-batch of
the accumulation, clipping, Muon and AdamW). Target: <= 5% at 124M on a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch

from bench.bench_train import CONFIGS, REPO
from bench.common import Row, synchronize, time_calls
from gptfast.configfile import load_config
from gptfast.muon import Muon, muon_param_groups
from gptfast.trainer import Trainer


@pytest.mark.parametrize("config", CONFIGS)
def test_newton_schulz_share_of_a_step(benchmark, record, device, device_info, token_dir, tmp_path, config):
    overrides = ["--optim.name=muon", f"--data.data_dir={token_dir}", "--data.dataset=random",
                 f"--train.out_dir={tmp_path}", "--train.resume=false", "--train.sample_tokens=0"]
    if device.type != "cuda":
        overrides += ["--train.compile=false", "--train.micro_batch_size=2", "--train.grad_accum_steps=2",
                      "--train.device=cpu"]
    trainer = Trainer(load_config(REPO / "configs" / f"{config}.toml", overrides), log=lambda _: None)
    step_seconds = time_calls(benchmark, lambda i: trainer.train_step(), device, 1, target_round_s=0.0,
                              rounds=3 if device.type == "cuda" else 2)
    groups, _ = muon_param_groups(trainer.model)
    muon = Muon(groups)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    muon.step()  # warm-up (and compilation of nothing: eager bf16 matmuls)
    synchronize(device)
    times = []
    for _ in range(5 if device.type == "cuda" else 2):
        start = time.perf_counter()
        muon.step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    muon_seconds = sorted(times)[len(times) // 2]
    share = muon_seconds / step_seconds
    matrices = sum(len(g["params"]) * g["split"] for g in groups)
    record(Row("muon", f"{config}: Muon.step over {matrices} matrices vs one train step", "gptfast", muon_seconds,
               extra={"train step": f"{step_seconds * 1e3:.1f} ms", "share of the step": f"{100 * share:.1f}%"}))
    benchmark.extra_info.update(muon_seconds=muon_seconds, step_seconds=step_seconds, share=share)
