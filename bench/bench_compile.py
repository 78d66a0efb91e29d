"""Compilation: the time from a built trainer to its first optimizer step, whole-model compile
against regional compilation (train.compile_scope = "blocks": one compiled block serves every
block), and the steady-state step time of each, side by side in one run.

The faster start is worth keeping only while the steady state holds (within 2% of the whole
model's tokens/s); the row's ratio column says. Each case starts from an empty dynamo cache (the
on-disk inductor cache of an earlier run may still serve it, as it would a user's second run).
On a GPU: gptfast (every kernel on) at small and medium. On a CPU the harness runs cpu_smoke's
PyTorch path compiled by inductor's C++ backend: the harness, not a GPU figure.
"""

from __future__ import annotations

import gc
import time

import pytest
import torch

from bench.bench_train import build_trainer
from bench.common import Row, on_gpu, synchronize, time_calls

CONFIGS = ["small_4070", "medium_4070"] if on_gpu() else ["cpu_smoke"]
SCOPES = ["model", "blocks"]
PROVIDER = "gptfast" if on_gpu() else "pytorch"


@pytest.mark.parametrize("scope", SCOPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_time_to_first_step(benchmark, record, device, token_dir, tmp_path, config, scope):
    torch._dynamo.reset()
    gc.collect()
    micro_batch, accum = (8, 2) if on_gpu() else (2, 1)
    extra = ("--train.compile=true", f"--train.compile_scope={scope}", f"--train.micro_batch_size={micro_batch}",
             f"--train.grad_accum_steps={accum}")
    # on the CPU the PyTorch path: the harness, without the interpreter's minutes per step
    trainer = build_trainer(config, PROVIDER, None, None, token_dir, tmp_path, extra=extra)
    try:
        start = time.perf_counter()
        trainer.train_step()
        synchronize(device)
        first = time.perf_counter() - start
        seconds = time_calls(benchmark, lambda i: trainer.train_step(), device, 1, target_round_s=0.0,
                             rounds=3 if on_gpu() else 1)
    finally:
        trainer.close()
    cfg = trainer.cfg
    record(Row("compile", f"{config}, micro-batch {micro_batch} x {accum}", f"{PROVIDER} {scope}", seconds, extra={
        "first step s": f"{first:.1f}", "tokens/s": f"{cfg.tokens_per_step / seconds:,.0f}"}))
    benchmark.extra_info.update(first_step_seconds=first, scope=scope)
