"""The peer kernel libraries our users could run instead (`pip install -e ".[peers]"`): Liger-Kernel
and Apple's Cut Cross-Entropy, as benchmark providers beside gptfast, torch and torch.compile.

A peer that is not installed, or cannot run on this device (Triton's interpreter on a CPU, a GPU
it does not support), is skipped with the reason, never failed and never left out silently: each
provider is first run once on a tiny input, and what it raises becomes the skip's reason.
"""

from __future__ import annotations

import importlib
from typing import Callable

import pytest
import torch

from bench.common import PEER_PROVIDERS

# provider -> its top-level module; the providers are common.PEER_PROVIDERS, which the tables rank
PEERS = dict(zip(PEER_PROVIDERS, ("liger_kernel", "cut_cross_entropy"), strict=True))


def require(provider: str):
    """The peer's top-level module, or a skip naming the extra to install."""
    module = PEERS[provider]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.skip(f"{provider}: {module} is not installed ({e}); pip install -e \".[peers]\"")


def probe(provider: str, run: Callable[[], object], device: torch.device) -> None:
    """Run `run()` (the provider on a tiny input, forward and backward); any error skips the case
    with the peer's own first line of complaint."""
    try:
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as e:  # the peer's own error types: Triton's interpreter, unsupported GPUs, ...
        where = "Triton's interpreter on the CPU" if device.type != "cuda" else torch.cuda.get_device_name(device)
        first = (str(e).strip().splitlines() or [""])[0][:200]
        pytest.skip(f"{provider} cannot run on {where}: {type(e).__name__}: {first}")


def liger_layer_norm():
    require("liger")
    from liger_kernel.transformers.functional import liger_layer_norm as layer_norm

    return layer_norm


def liger_linear_cross_entropy():
    require("liger")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return liger_fused_linear_cross_entropy


def cce_linear_cross_entropy():
    require("cce")
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy
