import pytest

from gptfast.hardware import mfu, peak_bf16_flops


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA GeForce RTX 4070", 58.3),
    ("NVIDIA GeForce RTX 4070 SUPER", 71.0),
    ("NVIDIA GeForce RTX 4070 Ti", 80.2),
    ("NVIDIA GeForce RTX 4080", 97.5),
    ("NVIDIA GeForce RTX 4090", 165.2),
    ("NVIDIA GeForce RTX 3090", 71.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 80GB HBM3", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H200", 989.0),
    ("NVIDIA L4", 121.0),
])
def test_peak_table(name, tflops):
    assert peak_bf16_flops(name) == tflops * 1e12


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4070 Ti SUPER", "NVIDIA L40S", "Tesla T4", "cpu"])
def test_unknown_device_has_no_peak(name):
    assert peak_bf16_flops(name) is None
    assert mfu(1e9, 1e4, peak_bf16_flops(name)) is None


def test_mfu_arithmetic():
    # 855,166,464 FLOPs/token (GPT-2 small) at 30,000 tokens/s on a 58.3 TFLOP/s RTX 4070
    assert mfu(855_166_464, 30_000, 58.3e12) == pytest.approx(855_166_464 * 30_000 / 58.3e12)
    assert mfu(855_166_464, 30_000, 58.3e12) == pytest.approx(0.44005, abs=1e-5)
