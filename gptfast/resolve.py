"""The config a run trains with, resolved before anything is built or written."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from gptfast.config import Config
from gptfast.device import device_name, memory_capacity_bytes
from gptfast.errors import ConfigError
from gptfast.model import triton_unavailable_reason


def resolve_config(cfg: Config, device: torch.device, amp_dtype: torch.dtype | None,
                   log: Callable[[str], None]) -> Config:
    """The config the run trains with: the architecture of train.init_from, the micro-batch and
    recomputation of train.memory_budget's plan. Raises ConfigError when the result cannot fit
    the device at all (before anything is allocated or written)."""
    from gptfast import memory

    t = cfg.train
    if t.init_from:  # the architecture is the pretrained checkpoint's, on resume too
        from gptfast import hf

        folder = hf.resolve_source(t.init_from, log)  # a directory, or a hub name through the HF cache
        hf_model = hf.model_config_from_hf(hf.read_hf_config(folder), cfg.model.dropout)
        cfg = dataclasses.replace(cfg, model=hf_model)
        if str(folder) != t.init_from:
            log(f"init_from {t.init_from!r}: {folder}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(folder)))
    act_bytes = 2 if amp_dtype is not None else 4
    if t.memory_budget:
        chosen = memory.plan(cfg, memory.budget_bytes(t.memory_budget, "train.memory_budget"), act_bytes)
        memory.format_plan(chosen, log)
        cfg = memory.apply_plan(cfg, chosen.choice)
    triton_ok = triton_unavailable_reason(device) is None
    need = memory.predict_peak(cfg, cfg.train.micro_batch_size, cfg.recompute.policy, cfg.recompute.every,
                               act_bytes, cfg.kernels.cross_entropy and triton_ok,
                               cfg.kernels.adamw and triton_ok).peak_bytes
    capacity = memory_capacity_bytes(device)
    if need > capacity:
        raise ConfigError(
            f"this model and micro-batch need about {memory.format_bytes(need)} (predicted peak: "
            f"{memory.padded_param_count(cfg.model):,} parameters, micro-batch {cfg.train.micro_batch_size} x "
            f"{cfg.model.block_size} tokens) but {device_name(device)} has {memory.format_bytes(capacity)}; "
            "use a smaller model or micro-batch, or set train.memory_budget")
    return cfg
