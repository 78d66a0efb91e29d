"""LayerNorm and residual-add + LayerNorm: gptfast's Triton kernels vs torch eager vs torch.compile.

Bandwidth floor per call, b bytes per element, N rows of C: layer_norm forward reads x and writes
y (2bNC), backward reads dy and x and writes dx (3bNC); add_layer_norm forward reads x and the
residual and writes s and y (4bNC), backward reads dy, ds and s and writes ds (4bNC); plus 8 B per
row of fp32 mean and rstd, written forward and read back.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import bandwidth_row, on_gpu, rotating, time_calls
from kernels import add_layer_norm, layer_norm
from tests.reference import layer_norm_ref

SHAPES = [(8192, 768), (8192, 1024), (8192, 1600), (16384, 768), (16384, 1024), (16384, 1600)] if on_gpu() else [(64, 768)]
DTYPE = torch.bfloat16
PROVIDERS = ["gptfast", "torch", "torch_compile"]
# (op, mode) -> elements of N x C moved per call, for the floor
TRAFFIC = {("layer_norm", "fwd"): 2, ("layer_norm", "bwd"): 3, ("layer_norm", "full"): 5,
           ("add_layer_norm", "fwd"): 4, ("add_layer_norm", "bwd"): 4, ("add_layer_norm", "full"): 8}


def torch_layer_norm(x, w, b):
    return layer_norm_ref(x, w, b)[0]


def torch_add_layer_norm(x, r, w, b):
    return layer_norm_ref(x, w, b, residual=r)


def op_for(op: str, provider: str):
    if provider == "gptfast":
        return layer_norm if op == "layer_norm" else add_layer_norm
    fn = torch_layer_norm if op == "layer_norm" else torch_add_layer_norm
    return torch.compile(fn) if provider == "torch_compile" else fn


def setup(op: str, mode: str, provider: str, n_rows: int, n_cols: int, device: torch.device):
    """One setup shared by every provider and mode: returns (call(i), number of input sets)."""
    fn = op_for(op, provider)
    bytes_per_set = TRAFFIC[(op, "full")] * n_rows * n_cols * DTYPE.itemsize
    w = torch.randn(n_cols, device=device, dtype=DTYPE, requires_grad=True)
    b = torch.randn(n_cols, device=device, dtype=DTYPE, requires_grad=True)

    def make():
        x = torch.randn(n_rows, n_cols, device=device, dtype=DTYPE, requires_grad=True)
        inputs = (x, torch.randn_like(x, requires_grad=True)) if op == "add_layer_norm" else (x,)
        return inputs, torch.randn_like(x), torch.randn_like(x)

    sets = rotating(make, bytes_per_set, device)

    def forward(inputs):
        out = fn(*inputs, w, b)
        return out if isinstance(out, tuple) else (out,)

    def grads_of(outputs, dy, ds):
        return (dy, ds) if op == "add_layer_norm" else (dy,)

    if mode == "fwd":
        def call(i):
            with torch.no_grad():
                forward(sets[i][0])
    elif mode == "bwd":
        graphs = [forward(inputs) for inputs, _, _ in sets]

        def call(i):
            inputs, dy, ds = sets[i]
            torch.autograd.grad(graphs[i], (*inputs, w, b), grads_of(graphs[i], dy, ds), retain_graph=True)
    else:
        def call(i):
            inputs, dy, ds = sets[i]
            outputs = forward(inputs)
            torch.autograd.grad(outputs, (*inputs, w, b), grads_of(outputs, dy, ds))
    return call, len(sets)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("op", ["layer_norm", "add_layer_norm"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-C{s[1]}")
def test_layernorm(benchmark, record, device, bandwidth, shape, op, mode, provider):
    n_rows, n_cols = shape
    call, n_sets = setup(op, mode, provider, n_rows, n_cols, device)
    seconds = time_calls(benchmark, call, device, n_sets)
    moved = TRAFFIC[(op, mode)] * n_rows * n_cols * DTYPE.itemsize + 8 * n_rows
    row = record(bandwidth_row("layernorm", f"{op} {mode} N={n_rows} C={n_cols} bf16", provider, seconds,
                               moved, bandwidth))
    benchmark.extra_info.update(gbps=row.gbps, floor_fraction=row.floor_fraction, bytes=moved)
