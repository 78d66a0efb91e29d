"""LayerNorm and RMSNorm, each alone and after a residual add: gptfast's Triton kernels vs torch eager,
torch.compile and Liger-Kernel's LayerNorm (the `peers` extra; Liger has no fused residual add, so
its add_layer_norm is torch's add followed by Liger's LayerNorm; Liger's RMSNorm is not wired in).

Two dtype settings: `bf16` (every tensor bf16) and `model`, the model's real dtypes under bf16
autocast: an fp32 residual stream (and, for add_layer_norm, the bf16 output of the branch added
to it), fp32 weights, a bf16 normalised output. The PyTorch and Liger paths then cast their fp32
output to bf16, as the model's next matmul would.

Bandwidth floor per call, b bytes per element, N rows of C: layer_norm forward reads x and writes
y (2bNC), backward reads dy and x and writes dx (3bNC); add_layer_norm forward reads x and the
residual and writes s and y (4bNC), backward reads dy, ds and s and writes ds (4bNC); plus 8 B per
row of fp32 mean and rstd, written forward and read back.
"""

from __future__ import annotations

import pytest
import torch

from bench.common import bandwidth_row, on_gpu, rotating, time_calls
from bench.peers import liger_layer_norm, probe
from kernels import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from tests.reference import layer_norm_ref, rms_norm_ref

SHAPES = [(8192, 768), (8192, 1024), (8192, 1600), (16384, 768), (16384, 1024), (16384, 1600)] if on_gpu() else [(64, 768)]
PROVIDERS = ["gptfast", "torch", "torch_compile", "liger"]
OPS = ["layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm"]
OPS_AND_PROVIDERS = [(op, p) for op in OPS for p in PROVIDERS if not (p == "liger" and "rms" in op)]
# name -> (normalised input / stream dtype, branch dtype added to it, weight dtype, output dtype)
DTYPES = {"bf16": (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.bfloat16),
          "model": (torch.float32, torch.bfloat16, torch.float32, torch.bfloat16)}
# (op, mode) -> elements of N x C moved per call, for the floor
TRAFFIC = {("layer_norm", "fwd"): 2, ("layer_norm", "bwd"): 3, ("layer_norm", "full"): 5,
           ("add_layer_norm", "fwd"): 4, ("add_layer_norm", "bwd"): 4, ("add_layer_norm", "full"): 8}


def op_for(op: str, provider: str, out_dtype: torch.dtype):
    """fn(x, w, b) -> y for layer_norm, fn(branch, stream, w, b) -> (y, s) for add_layer_norm; the
    same for the RMSNorm ops, whose b is None."""
    if "rms" in op:
        if provider == "gptfast":
            if op == "rms_norm":
                return lambda x, w, b: rms_norm(x, w, 1e-6, out_dtype)
            return lambda x, r, w, b: add_rms_norm(x, r, w, 1e-6, out_dtype)

        def torch_rms_norm(x, w, b):
            return rms_norm_ref(x, w)[0].to(out_dtype)

        def torch_add_rms_norm(x, r, w, b):
            y, s = rms_norm_ref(r, w, residual=x)
            return y.to(out_dtype), s

        fn = torch_rms_norm if op == "rms_norm" else torch_add_rms_norm
        return torch.compile(fn) if provider == "torch_compile" else fn
    if provider == "gptfast":
        if op == "layer_norm":
            return lambda x, w, b: layer_norm(x, w, b, 1e-5, out_dtype)
        return lambda x, r, w, b: add_layer_norm(x, r, w, b, 1e-5, out_dtype)
    if provider == "liger":
        norm = liger_layer_norm()
        if op == "layer_norm":
            return lambda x, w, b: norm(x, w, b, 1e-5).to(out_dtype)
        return lambda x, r, w, b: (norm(x + r, w, b, 1e-5).to(out_dtype), x + r)

    def torch_layer_norm(x, w, b):
        return layer_norm_ref(x, w, b)[0].to(out_dtype)

    def torch_add_layer_norm(x, r, w, b):
        y, s = layer_norm_ref(r, w, b, residual=x)  # s = stream + branch, in the stream's dtype
        return y.to(out_dtype), s

    fn = torch_layer_norm if op == "layer_norm" else torch_add_layer_norm
    return torch.compile(fn) if provider == "torch_compile" else fn


def setup(op: str, mode: str, provider: str, n_rows: int, n_cols: int, device: torch.device,
          dtypes: str = "bf16"):
    """One setup shared by every provider and mode: returns (call(i), number of input sets)."""
    stream_dtype, branch_dtype, weight_dtype, out_dtype = DTYPES[dtypes]
    fn = op_for(op, provider, out_dtype)
    bytes_per_set = TRAFFIC[(op.replace("rms", "layer"), "full")] * n_rows * n_cols * stream_dtype.itemsize
    w = torch.randn(n_cols, device=device, dtype=weight_dtype, requires_grad=True)
    b = None if "rms" in op else torch.randn(n_cols, device=device, dtype=weight_dtype, requires_grad=True)
    params = (w,) if b is None else (w, b)
    residual_op = op.startswith("add_")

    def make():
        x = torch.randn(n_rows, n_cols, device=device, dtype=stream_dtype, requires_grad=True)
        if residual_op:  # (branch output, residual stream)
            inputs = (torch.randn(n_rows, n_cols, device=device, dtype=branch_dtype, requires_grad=True), x)
        else:
            inputs = (x,)
        return inputs, torch.randn(n_rows, n_cols, device=device, dtype=out_dtype), torch.randn_like(x)

    if provider == "liger":  # skipped, with the reason, where Liger cannot run
        def tiny():
            t = torch.randn(4, n_cols, device=device, dtype=stream_dtype, requires_grad=True)
            args = (torch.randn_like(t, dtype=branch_dtype), t) if residual_op else (t,)
            out = fn(*args, w, b)
            (out[0] if isinstance(out, tuple) else out).float().sum().backward()
        probe("liger", tiny, device)
    sets = rotating(make, bytes_per_set, device)

    def forward(inputs):
        out = fn(*inputs, w, b)
        return out if isinstance(out, tuple) else (out,)

    def grads_of(outputs, dy, ds):
        return (dy, ds) if residual_op else (dy,)

    if mode == "fwd":
        def call(i):
            with torch.no_grad():
                forward(sets[i][0])
    elif mode == "bwd":
        graphs = [forward(inputs) for inputs, _, _ in sets]

        def call(i):
            inputs, dy, ds = sets[i]
            torch.autograd.grad(graphs[i], (*inputs, *params), grads_of(graphs[i], dy, ds), retain_graph=True)
    else:
        def call(i):
            inputs, dy, ds = sets[i]
            outputs = forward(inputs)
            torch.autograd.grad(outputs, (*inputs, *params), grads_of(outputs, dy, ds))
    return call, len(sets)


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("op, provider", OPS_AND_PROVIDERS, ids=[f"{o}-{p}" for o, p in OPS_AND_PROVIDERS])
@pytest.mark.parametrize("dtypes", list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-C{s[1]}")
def test_layernorm(benchmark, record, device, bandwidth, shape, dtypes, op, mode, provider):
    n_rows, n_cols = shape
    call, n_sets = setup(op, mode, provider, n_rows, n_cols, device, dtypes)
    seconds = time_calls(benchmark, call, device, n_sets)
    moved = moved_bytes(op, mode, n_rows, n_cols, dtypes)
    row = record(bandwidth_row("layernorm", f"{op} {mode} N={n_rows} C={n_cols} {dtypes}", provider, seconds,
                               moved, bandwidth))
    benchmark.extra_info.update(gbps=row.gbps, floor_fraction=row.floor_fraction, bytes=moved)


def moved_bytes(op: str, mode: str, n_rows: int, n_cols: int, dtypes: str) -> int:
    """The floor's bytes: each tensor of N x C read or written once, at its own dtype's size (the
    same tensors for RMSNorm as for LayerNorm)."""
    op = op.replace("rms", "layer")
    stream, branch, _, out = (d.itemsize for d in DTYPES[dtypes])
    per_element = {
        ("layer_norm", "fwd"): stream + out,  # read x, write y
        ("layer_norm", "bwd"): out + stream + stream,  # read dy and x, write dx
        ("add_layer_norm", "fwd"): branch + stream + stream + out,  # read branch and stream, write s and y
        # read dy, ds and s, write ds; and the branch's own copy of it where its dtype differs
        ("add_layer_norm", "bwd"): out + 3 * stream + (branch if branch != stream or dtypes == "model" else 0),
    }
    if mode == "full":
        total = per_element[(op, "fwd")] + per_element[(op, "bwd")]
    else:
        total = per_element[(op, mode)]
    return total * n_rows * n_cols + 8 * n_rows
