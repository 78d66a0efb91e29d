"""The memory planner against the allocator: its calibration table.

For each case (config, micro-batch, recompute policy, provider): the planner's predicted peak
(gptfast.memory.predict_peak, what train.memory_budget plans with) beside
torch.cuda.max_memory_allocated and max_memory_reserved over one optimizer step of the trainer
itself, compiled as it trains, after a first step has created the optimizer's state (so the peak
holds weights, gradients, optimizer state and a micro-batch's activations at once); the error of
the prediction relative to the measured peak; the step's time and tokens/s (the measured speed of
each plan, which the planner's speed column is to follow); and the first step's time (compilation
included).

Providers as in bench_train.py: "gptfast" (every Triton kernel on) and "pytorch" (none), both at
the case's micro-batch and policy, so their step times compare side by side. Each step is two
micro-batches: the second one's activations meet the first one's accumulated gradients.

--memory-grid=quick (the default; a few minutes on an H100-class card) or full (every config at
micro-batches 4, 8 and 16 under every policy, both providers). On a CPU the harness runs cpu_smoke
eagerly: the predictions are reported, the measured columns are n/a (the CPU has no allocator
peak to read).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from bench.bench_train import PROVIDERS, build_trainer
from bench.common import Row, on_gpu, synchronize
from gptfast.config import RECOMPUTE_POLICIES
from gptfast.memory import predict_peak
from gptfast.trainer import Trainer

if on_gpu():
    GRIDS = {
        "quick": [("medium_4070", 8, policy, "gptfast") for policy in RECOMPUTE_POLICIES]
                 + [("medium_4070", 8, "selective", "pytorch"), ("small_4070", 16, "selective", "gptfast"),
                    ("mid_4070", 8, "selective", "gptfast"), ("speedrun_124m_4070", 8, "selective", "gptfast")],
        "full": [(config, micro_batch, policy, provider)
                 for config in ("small_4070", "speedrun_124m_4070", "mid_4070", "medium_4070")
                 for micro_batch in (4, 8, 16) for policy in RECOMPUTE_POLICIES for provider in PROVIDERS],
    }
else:  # the harness itself, on the CPU's smallest config
    GRIDS = {
        "quick": [("cpu_smoke", 2, "selective", "pytorch")],  # seconds: the interpreter takes ~25 s a step
        "full": [("cpu_smoke", 2, policy, provider) for policy in RECOMPUTE_POLICIES for provider in PROVIDERS],
    }
ACCUMULATION = 2  # micro-batches per measured step


def pytest_generate_tests(metafunc):
    if "memory_case" in metafunc.fixturenames:
        grid = GRIDS[metafunc.config.getoption("--memory-grid")]
        metafunc.parametrize("memory_case", grid, ids=[f"{c}-mb{b}-{p}-{v}" for c, b, p, v in grid])


def build(config: str, micro_batch: int, policy: str, provider: str, data: Path, out: Path) -> Trainer:
    settings = (f"--train.micro_batch_size={micro_batch}", f"--train.grad_accum_steps={ACCUMULATION}",
                f"--recompute.policy={policy}", "--recompute.every=1")
    return build_trainer(config, provider, None, None, data, out, extra=settings)


def test_planner_against_allocator(benchmark, record, device, token_dir, tmp_path, memory_case):
    config, micro_batch, policy, provider = memory_case
    torch._dynamo.reset()  # no compiled code (and the tensors it holds) from the previous case
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    case = f"{config}, micro-batch {micro_batch} x {ACCUMULATION}, recompute {policy}"
    trainer = None
    try:
        trainer = build(config, micro_batch, policy, provider, token_dir, tmp_path)
        cfg = trainer.cfg
        # the resolved config: kernels this device cannot run are off in it, as the run trains
        predicted = predict_peak(cfg, micro_batch, policy, 1, 2 if trainer.amp_dtype is not None else 4)
        start = time.perf_counter()
        trainer.train_step()  # compiles; creates the optimizer's state
        synchronize(device)
        first_step = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def step():
            trainer.train_step()
            synchronize(device)

        benchmark.pedantic(step, rounds=1, iterations=1)
    except torch.cuda.OutOfMemoryError:
        record(Row("memory", case, provider, float("nan"), extra={"result": "out of memory"}))
        return
    finally:
        if trainer is not None:
            trainer.close()
    seconds = benchmark.stats.stats.median
    extra = {"predicted GiB": f"{predicted.peak_bytes / 2**30:.2f}", "first step s": f"{first_step:.1f}",
             "tokens/s": f"{cfg.tokens_per_step / seconds:,.0f}"}
    if device.type == "cuda":
        allocated = torch.cuda.max_memory_allocated(device)
        reserved = torch.cuda.max_memory_reserved(device)
        extra.update({"allocated GiB": f"{allocated / 2**30:.2f}", "reserved GiB": f"{reserved / 2**30:.2f}",
                      "predicted / allocated - 1": f"{predicted.peak_bytes / allocated - 1:+.1%}"})
        benchmark.extra_info.update(allocated_bytes=allocated, reserved_bytes=reserved)
    else:
        extra["allocated GiB"] = "n/a on CPU"
    benchmark.extra_info.update(predicted_bytes=predicted.peak_bytes, parts=predicted.parts, case=case)
    record(Row("memory", case, provider, seconds, extra=extra))
