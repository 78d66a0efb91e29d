"""The config a run trains with, resolved once, before anything is built or written.

Everything decided from the device and the environment is decided here: init_from's architecture,
the memory plan, which of the Triton kernels can run. The result is written into the run's
`config.toml` and every checkpoint, and the model, the optimizer and the planner read it as plain
settings: nothing downstream asks the device again.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from gptfast.config import Config, KernelsConfig
from gptfast.device import device_name, memory_capacity_bytes
from gptfast.errors import ConfigError
from gptfast.gradaccum import fp32_output_matmul

TRITON_OPS = ("layernorm", "cross_entropy", "adamw")


def triton_unavailable_reason(device: torch.device) -> str | None:
    """Why gptfast's Triton kernels cannot run on `device`, or None when they can."""
    try:
        import kernels
    except ImportError as e:  # triton is a Linux-only dependency
        return f"Triton is not importable ({e})"
    if not kernels.triton_supports(device):
        return "Triton kernels need a CUDA device, or TRITON_INTERPRET=1 on the CPU"
    return None


def available_kernels(cfg: KernelsConfig, device: torch.device, log: Callable[[str], None]) -> KernelsConfig:
    """`cfg` with every Triton op that cannot run on `device` switched off, said once in the log:
    a run (or a sampler of its checkpoint) on a machine without Triton uses PyTorch's ops (and
    bf16 matmuls where kernels.fp8 asked for FP8, whose casts are Triton kernels)."""
    wanted = [name for name in TRITON_OPS if getattr(cfg, name)] + (["fp8"] if cfg.fp8 != "off" else [])
    reason = triton_unavailable_reason(device) if wanted else None
    if reason:
        log(f"kernels {', '.join(wanted)}: {reason}; this {device.type} run uses PyTorch's ops")
        return dataclasses.replace(cfg, **{name: "off" if name == "fp8" else False for name in wanted})
    if wanted:
        log(f"Triton kernels: {', '.join(name if name != 'fp8' else f'fp8 ({cfg.fp8})' for name in wanted)}")
    return cfg


FP8_CAPABILITY = (8, 9)  # cuBLAS's FP8 GEMMs: Ada (sm_89) and Hopper (sm_90) onwards


def check_fp8(cfg: Config, device: torch.device) -> None:
    """ConfigError when kernels.fp8 cannot run on `device`: a GPU before Ada has no FP8 matmul,
    and cuBLAS's FP8 GEMMs need every width a multiple of 16 (the CPU takes any)."""
    if cfg.kernels.fp8 == "off" or device.type != "cuda":
        return
    from gptfast.fp8 import FP8_MULTIPLE

    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_CAPABILITY:
        raise ConfigError(f"kernels.fp8 = {cfg.kernels.fp8!r}: FP8 matmuls need an sm_89 or later GPU (Ada, "
                          f"Hopper), and {device_name(device)} is sm_{capability[0]}{capability[1]}; "
                          'set kernels.fp8 = "off"')
    for key, width in (("model.n_embd", cfg.model.n_embd), ("model.block_size", cfg.model.block_size)):
        if width % FP8_MULTIPLE:  # the context too: a micro-batch's rows are the GEMMs' other dimension
            raise ConfigError(f"kernels.fp8 = {cfg.kernels.fp8!r}: {key} is {width}, and FP8 matmuls need "
                              f"dimensions that are multiples of {FP8_MULTIPLE}")


def resolve_config(cfg: Config, device: torch.device, amp_dtype: torch.dtype | None,
                   log: Callable[[str], None]) -> Config:
    """The config the run trains with: the architecture of train.init_from, the Triton kernels
    this device runs, the micro-batch and recomputation of train.memory_budget's plan. Raises
    ConfigError when the result cannot fit the device at all (before anything is allocated or
    written)."""
    from gptfast import memory

    t = cfg.train
    if t.init_from:  # the architecture is the pretrained checkpoint's, on resume too
        from gptfast import hf

        folder = hf.resolve_source(t.init_from, log)  # a directory, or a hub name through the HF cache
        hf_model = hf.model_config_from_hf(hf.read_hf_config(folder), cfg.model.dropout, folder / "config.json")
        hf.check_hf_weights_present(folder)  # before the run directory is claimed
        cfg = dataclasses.replace(cfg, model=hf_model)
        if str(folder) != t.init_from:
            log(f"init_from {t.init_from!r}: {folder}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(folder)))
    cfg = dataclasses.replace(cfg, kernels=available_kernels(cfg.kernels, device, log))
    check_fp8(cfg, device)
    if cfg.kernels.fused_grad_accum and amp_dtype is not None and not fp32_output_matmul(device):
        log(f"kernels.fused_grad_accum: torch {torch.__version__} has no {amp_dtype} matmul with an fp32 output on "
            f"{device.type}: each micro-step's weight gradient is rounded to {amp_dtype} before the fp32 "
            "accumulation, as on PyTorch's path (the weight copies still replace the per-micro-step casts)")
    if cfg.kernels.flex_attention and device.type != "cuda":
        # config.toml records what runs: on the CPU torch has no FlexAttention backward
        if cfg.model.masked_attention:
            log(f"masked attention: SDPA with a dense mask on {device.type} (FlexAttention trains on CUDA only)")
        cfg = dataclasses.replace(cfg, kernels=dataclasses.replace(cfg.kernels, flex_attention=False))
    act_bytes = 2 if amp_dtype is not None else 4
    if t.memory_budget:
        chosen = memory.plan(cfg, memory.budget_bytes(t.memory_budget, "train.memory_budget"), act_bytes)
        memory.format_plan(chosen, log)
        cfg = memory.apply_plan(cfg, chosen.choice)
    need = memory.predict_peak(cfg, cfg.train.micro_batch_size, cfg.recompute.policy, cfg.recompute.every,
                               act_bytes).peak_bytes
    capacity = memory_capacity_bytes(device)
    if need > capacity:
        raise ConfigError(
            f"this model and micro-batch need about {memory.format_bytes(need)} (predicted peak: "
            f"{memory.padded_param_count(cfg.model):,} parameters, micro-batch {cfg.train.micro_batch_size} x "
            f"{cfg.model.block_size} tokens) but {device_name(device)} has {memory.format_bytes(capacity)}; "
            "use a smaller model or micro-batch, or set train.memory_budget")
    return cfg
