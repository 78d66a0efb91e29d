"""Models for inference: a gptfast checkpoint's (or a Hugging Face GPT-2's) on a device, and the
one rule for the dtype they run in, which sampling, evaluation and the trainer's own end-of-run
sample share: the run's train.dtype under autocast on CUDA, fp32 on the CPU."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from gptfast.device import autocast_dtype
from gptfast.model import GPT


def autocast(device: torch.device, dtype: torch.dtype | None):
    """The autocast context of a run on `device` in `dtype` (None: fp32, no autocast)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def load_model(path: str, device: torch.device) -> tuple[GPT, dict, torch.dtype | None]:
    """(model, checkpoint, autocast dtype) of a checkpoint file, or of the newest checkpoint in a
    run directory: the run's architecture and kernels (those this device can run)."""
    from gptfast.checkpoint import load_checkpoint
    from gptfast.configfile import config_from_dict
    from gptfast.resolve import available_kernels

    state = load_checkpoint(path)
    cfg = config_from_dict(state["config"], f"{state['path']} (config)")
    kernels = available_kernels(cfg.kernels, device, log=lambda _: None)
    model = GPT(cfg.model, kernels)  # no recomputation: inference never runs backward
    model.load_state_dict(state["model"])
    return model.to(device).eval(), state, autocast_dtype(device, cfg.train.dtype)


def load_any(source: str, device: torch.device) -> tuple[GPT, str, torch.dtype | None]:
    """(model, label, autocast dtype): a Hugging Face GPT-2 directory (run in bfloat16 on CUDA, as
    gptfast trains), or a gptfast checkpoint / run directory."""
    folder = Path(source)
    if folder.is_dir() and (folder / "config.json").is_file():
        from gptfast import hf

        model = GPT(hf.model_config_from_hf(hf.read_hf_config(folder), 0.0, folder / "config.json"))
        hf.load_hf_into(model, folder)
        return model.to(device).eval(), f"{folder} (Hugging Face)", autocast_dtype(device, "bfloat16")
    model, state, dtype = load_model(source, device)
    return model, f"{state['path']} (step {state['step']})", dtype


@torch.no_grad()
def sample_text(model: GPT, device: torch.device, dtype: torch.dtype | None, max_new_tokens: int, seed: int,
                temperature: float = 0.8, top_k: int = 200) -> str:
    """Text the model writes from the start of a document (the end-of-text token), seeded."""
    from gptfast.tokenizer import get_tokenizer

    enc = get_tokenizer()
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    idx = torch.tensor([[enc.eot_token]], device=device)
    with autocast(device, dtype):
        out = model.generate(idx, max_new_tokens, temperature, top_k, generator=generator)
    model.train(was_training)
    return enc.decode(out[0, 1:].tolist())
