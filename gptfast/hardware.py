"""What the device can do: peak dense bf16 throughput by device name, for MFU."""

from __future__ import annotations

import re

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
