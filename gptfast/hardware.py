"""What the device can do: peak dense bf16 throughput by device name, for MFU; and the cards the
step-cost model (gptfast.stepcost) can model, with the efficiencies it assumes."""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptfast.errors import ConfigError

# Dense bf16 tensor-core peak in TFLOP/s, matched against the device name with "NVIDIA" and
# "GeForce" removed, lower-cased, as a full match so "rtx 4070" does not claim a 4070 SUPER.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"rtx 4070", 58.3),
    (r"rtx 4070 super", 71.0),
    (r"rtx 4070 ti", 80.2),
    (r"rtx 4080", 97.5),
    (r"rtx 4090", 165.2),
    (r"rtx 3090", 71.0),
    (r"a100[- ].*", 312.0),
    (r"h100 pcie", 756.0),
    (r"h100( 80gb hbm3| sxm5?.*)", 989.0),
    (r"h200", 989.0),
    (r"l4", 121.0),
)


def normalise_device_name(name: str) -> str:
    name = re.sub(r"\b(nvidia|geforce)\b", " ", name.lower())
    return " ".join(name.split())


def peak_bf16_flops(device_name: str) -> float | None:
    """Peak FLOP/s for `device_name`, or None for a device the table does not know."""
    key = normalise_device_name(device_name)
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.fullmatch(pattern, key):
            return tflops * 1e12
    return None


def mfu(flops_per_token: float, tokens_per_second: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the device's peak (None if unknown)."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_second / peak_flops


# The step-cost model's assumptions: ESTIMATES until a GPU run calibrates them (bench_stepcost).
MATMUL_EFFICIENCY = 0.85  # sustained bf16 GEMM rate / peak for a large GEMM (cuBLAS on Ada: ~80-90%)
MATMUL_HALF_DIM = 128  # a GEMM whose smallest dimension is this reaches half of that (stepcost.size_efficiency)
ATTENTION_EFFICIENCY = 0.5  # FlashAttention's forward + backward rate / peak (FA2 on Ada: ~40-60%)
MEMORY_EFFICIENCY = 0.85  # achieved / peak DRAM bandwidth of a streaming elementwise kernel
KERNEL_OVERHEAD_S = 4e-6  # the least time one eager kernel launch costs


@dataclass(frozen=True)
class Card:
    name: str
    peak_flops: float  # dense bf16 tensor-core FLOP/s, fp32 accumulate
    bandwidth: float  # DRAM bytes/s
    memory_bytes: int
    fp8_flops: float | None = None  # dense e4m3/e5m2 FLOP/s, fp32 accumulate (Ada, Hopper); None: no FP8


# Vendor figures (NVIDIA's Ada whitepaper and data sheets): dense bf16 and FP8, fp32 accumulate
# (FP8 at twice the bf16 rate on Ada and Hopper; Ampere has none).
CARDS = {card.name.lower(): card for card in (
    Card("RTX 4070", 58.3e12, 504e9, 12 * 2**30, 116.6e12),
    Card("RTX 4070 Ti", 80.2e12, 504e9, 12 * 2**30, 160.4e12),
    Card("RTX 4080", 97.5e12, 716.8e9, 16 * 2**30, 194.9e12),
    Card("RTX 4090", 165.2e12, 1008e9, 24 * 2**30, 330.3e12),
    Card("RTX 3090", 71.0e12, 936e9, 24 * 2**30),
    Card("A100 80GB", 312e12, 2039e9, 80 * 2**30),
    Card("H100 SXM", 989e12, 3350e9, 80 * 2**30, 1979e12),
    Card("H200", 989e12, 4800e9, 141 * 10**9, 1979e12),
)}


def card_of(name: str) -> Card:
    """The CARDS entry named `name` (case and "NVIDIA"/"GeForce" ignored), or a ConfigError
    listing the cards the model knows."""
    card = CARDS.get(normalise_device_name(name))
    if card is None:
        raise ConfigError(f"--device {name!r}: the step-cost model knows {', '.join(c.name for c in CARDS.values())}")
    return card
