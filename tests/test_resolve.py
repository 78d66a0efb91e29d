"""The one resolved config (gptfast/resolve.py): kernels decided once, the fit check."""

import dataclasses

import pytest
import torch

from gptfast import resolve
from gptfast.config import KernelsConfig
from gptfast.errors import ConfigError


def test_kernels_this_device_cannot_run_are_switched_off_and_said_once(monkeypatch):
    monkeypatch.setattr(resolve, "triton_unavailable_reason", lambda device: "no Triton here")
    lines = []
    wanted = KernelsConfig(layernorm=True, cross_entropy=True, adamw=False, loss_chunk_mib=64)
    got = resolve.available_kernels(wanted, torch.device("cpu"), lines.append)
    assert got == dataclasses.replace(wanted, layernorm=False, cross_entropy=False)
    assert lines == ["kernels layernorm, cross_entropy: no Triton here; this cpu run uses PyTorch's ops"]


def test_kernels_that_can_run_are_kept():
    lines = []
    wanted = KernelsConfig(layernorm=True, adamw=True)
    assert resolve.available_kernels(wanted, torch.device("cpu"), lines.append) == wanted  # the interpreter is on
    assert lines == ["Triton kernels: layernorm, adamw"]
    lines.clear()
    assert resolve.available_kernels(KernelsConfig(), torch.device("cpu"), lines.append) == KernelsConfig()
    assert lines == []


def test_the_run_directory_records_the_kernels_that_ran(tiny_config, tmp_path, monkeypatch):
    from gptfast.configfile import load_config
    from gptfast.trainer import Trainer

    monkeypatch.setattr(resolve, "triton_unavailable_reason", lambda device: "no Triton here")
    trainer = Trainer(tiny_config({"kernels.layernorm": True, "train.max_steps": 1}), log=lambda _: None)
    trainer.close()
    written = load_config(tmp_path / "run" / "config.toml")
    assert written.kernels.layernorm is False and trainer.model.kernel_cfg.layernorm is False


def test_a_model_that_cannot_fit_the_device_is_refused(tiny_config, monkeypatch):
    monkeypatch.setattr(resolve, "memory_capacity_bytes", lambda device: 2**20)
    cfg = tiny_config()
    with pytest.raises(ConfigError, match="need about .* but cpu has 1.0 MiB"):
        resolve.resolve_config(cfg, torch.device("cpu"), None, lambda _: None)


@pytest.mark.parametrize("fused, amp_dtype, said",
                         [(True, torch.bfloat16, 1), (True, None, 0), (False, torch.bfloat16, 0)], ids=["bf16", "fp32", "off"])
def test_fused_grad_accum_without_an_fp32_output_matmul_is_said_once(tiny_config, fused, amp_dtype, said):
    """Here (the CPU) no bf16 matmul has an fp32 output: the fused accumulation keeps PyTorch's
    rounding, and the run says so once; fp32 training has no rounding to speak of."""
    lines = []
    cfg = tiny_config({"kernels.fused_grad_accum": fused})
    resolved = resolve.resolve_config(cfg, torch.device("cpu"), amp_dtype, lines.append)
    assert sum("kernels.fused_grad_accum" in line and "rounded to torch.bfloat16" in line for line in lines) == said
    assert resolved.kernels.fused_grad_accum is fused


def test_fp8_without_triton_is_switched_off_and_said(monkeypatch):
    """FP8's casts are Triton kernels: without Triton the run trains in bf16, said in the same line."""
    monkeypatch.setattr(resolve, "triton_unavailable_reason", lambda device: "no Triton here")
    lines = []
    got = resolve.available_kernels(KernelsConfig(cross_entropy=True, fp8="head+mlp"), torch.device("cpu"),
                                    lines.append)
    assert got.fp8 == "off" and got.cross_entropy is False
    assert lines == ["kernels cross_entropy, fp8: no Triton here; this cpu run uses PyTorch's ops"]
    lines.clear()
    monkeypatch.undo()
    assert resolve.available_kernels(KernelsConfig(fp8="mlp"), torch.device("cpu"), lines.append).fp8 == "mlp"
    assert lines == ["Triton kernels: fp8 (mlp)"]


@pytest.mark.parametrize("capability, n_embd, block_size, refused", [
    ((8, 6), 64, 64, "sm_89 or later GPU .* is sm_86"), ((8, 9), 72, 64, "model.n_embd is 72, and FP8 matmuls need"),
    ((8, 9), 64, 40, "model.block_size is 40, and FP8 matmuls need"), ((9, 0), 64, 64, None)],
    ids=["ampere", "width", "context", "hopper"])
def test_fp8_on_a_gpu_before_ada_or_at_an_odd_width_is_refused(tiny_config, monkeypatch, capability, n_embd,
                                                                block_size, refused):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(resolve, "device_name", lambda device: "the test GPU")
    cfg = tiny_config({"kernels.fp8": '"mlp"', "model.n_embd": n_embd, "model.block_size": block_size})
    if refused:
        with pytest.raises(ConfigError, match=refused):
            resolve.check_fp8(cfg, torch.device("cuda"))
    else:
        resolve.check_fp8(cfg, torch.device("cuda"))
    resolve.check_fp8(dataclasses.replace(cfg, kernels=KernelsConfig()), torch.device("cuda"))  # off: nothing asked


def test_a_foreign_kernels_package_is_named_at_import(tmp_path):
    """Hugging Face's `kernels` distribution has our kernels/'s import name: where it comes first on
    sys.path, importing gptfast says so in one line instead of failing later inside a Triton op."""
    import subprocess
    import sys

    from conftest import REPO

    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    code = f"import sys; sys.path[:0] = [{str(tmp_path)!r}, {str(REPO)!r}]; import gptfast"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert run.returncode != 0
    assert "the package `kernels` Python imports is" in run.stderr and "shadows it" in run.stderr
    ok = subprocess.run([sys.executable, "-c", f"import sys; sys.path[:0] = [{str(REPO)!r}]; import gptfast"],
                        capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert ok.returncode == 0, ok.stderr
