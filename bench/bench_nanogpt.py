"""The PyTorch path against nanoGPT's model: the baseline every other benchmark divides by must be
at least as fast as the recipe our users run today.

Paired in one process: the same architecture, the same weights (ours copied into nanoGPT's), the
same batches; each round times one forward + backward of each model, in alternating order, and
the figure is the median over rounds of nanoGPT's time / ours (> 1: ours is faster). Eager on
every device (the compiled paths are bench_train's business), kernels off.

nanoGPT is not a dependency: point NANOGPT_DIR at a checkout of it (the folder holding its
model.py); without one the case is reported as skipped, with that reason.
"""

from __future__ import annotations

import importlib.util
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from bench.common import Row, synchronize
from gptfast.config import KernelsConfig, ModelConfig
from gptfast.model import GPT

# Small enough for the CPU, with GPT-2's real vocabulary: the loss over 50257 columns is where
# the two paths differ.
CPU_CASE = dict(n_layer=4, n_head=4, n_embd=256, block_size=256, batch=4)
GPU_CASE = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, batch=8)


def load_nanogpt():
    folder = os.environ.get("NANOGPT_DIR", "")
    if not folder:
        pytest.skip("set NANOGPT_DIR to a checkout of nanoGPT (the folder with its model.py) to run this case")
    path = Path(folder) / "model.py"
    if not path.is_file():
        pytest.skip(f"NANOGPT_DIR={folder} holds no model.py")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def paired_models(nanogpt, case: dict, device: torch.device):
    cfg = ModelConfig(n_layer=case["n_layer"], n_head=case["n_head"], n_embd=case["n_embd"],
                      block_size=case["block_size"])
    torch.manual_seed(0)
    ours = GPT(cfg, KernelsConfig()).to(device)
    theirs = nanogpt.GPT(nanogpt.GPTConfig(block_size=cfg.block_size, vocab_size=cfg.padded_vocab_size,
                                           n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                           dropout=0.0, bias=True)).to(device)
    missing = theirs.load_state_dict(ours.state_dict(), strict=False)
    # nanoGPT keeps a causal-mask buffer only when SDPA is missing; every weight must be ours
    assert not [k for k in missing.missing_keys if not k.endswith(".attn.bias")], missing
    return ours, theirs


def step_seconds(model, call, x, y, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    loss = call(model, x, y)
    loss.backward()
    synchronize(device)
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def test_eager_step_vs_nanogpt(benchmark, record, device, device_info):
    nanogpt = load_nanogpt()
    case = GPU_CASE if device.type == "cuda" else CPU_CASE
    ours, theirs = paired_models(nanogpt, case, device)
    generator = torch.Generator().manual_seed(1)
    tokens = [torch.randint(0, 50257, (case["batch"], case["block_size"] + 1), generator=generator)
              for _ in range(4)]
    # contiguous inputs and targets, as the data loaders of both give them
    batches = [(t[:, :-1].contiguous().to(device), t[:, 1:].contiguous().to(device)) for t in tokens]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else None
    calls = {"pytorch": lambda m, x, y: m(x, y), "nanogpt": lambda m, x, y: m(x, y)[1]}
    models = {"pytorch": ours, "nanogpt": theirs}

    def timed(name, batch):
        x, y = batch
        if autocast is None:
            return step_seconds(models[name], calls[name], x, y, device)
        with autocast:
            return step_seconds(models[name], calls[name], x, y, device)

    # the same weights give the same loss: the comparison is of one computation
    x, y = batches[0]
    with torch.no_grad():
        torch.testing.assert_close(ours(x, y), theirs(x, y)[1], rtol=1e-4, atol=1e-4)
    for batch in batches[:2]:  # warm-up: allocator growth, first-call dispatch
        timed("pytorch", batch), timed("nanogpt", batch)
    times = {"pytorch": [], "nanogpt": []}
    rounds = 16

    def run_pairs():
        for i in range(rounds):
            order = ("pytorch", "nanogpt") if i % 2 == 0 else ("nanogpt", "pytorch")
            for name in order:
                times[name].append(timed(name, batches[i % len(batches)]))

    benchmark.pedantic(run_pairs, rounds=1, iterations=1)
    ratio = statistics.median(t / o for o, t in zip(times["pytorch"], times["nanogpt"]))
    label = (f"L{case['n_layer']} C{case['n_embd']} T{case['block_size']} B{case['batch']} V50257 "
             f"fwd+bwd {'bf16 autocast' if autocast else 'fp32'} eager")
    for name in ("pytorch", "nanogpt"):
        extra = {"nanogpt / ours (paired median)": round(ratio, 3)} if name == "pytorch" else {}
        record(Row("eager", label, name, statistics.median(times[name]), extra=extra))
    benchmark.extra_info.update({"nanogpt_over_ours": ratio, "rounds": rounds})
