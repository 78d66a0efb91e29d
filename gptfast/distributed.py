"""Data parallelism under torchrun: joining the job, per-rank seeds, the DDP wrapper, and the few
collectives the trainer needs (a barrier, the step's mean loss with the stop flag, rank 0's word).

Rank 0 alone logs, evaluates and writes files; every rank trains its share of a step's
micro-batches, and the windows are those one process would draw (the loader is a function of the
global micro-step index), so N processes follow the trajectory of one.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gptfast.config import TrainConfig
from gptfast.device import DistInfo, cpu_threads, join_process_group, resolve_device
from gptfast.errors import ConfigError

# Each rank's dropout stream is the run's seed offset by rank x this prime.
RANK_SEED_STRIDE = 1_000_003


def place_process(t: TrainConfig, info: DistInfo, log) -> torch.device:
    """This process's device: train.device resolved, CPU threads shared among this machine's
    processes, and its place in the torchrun job joined."""
    device = resolve_device(t.device)
    if device.type == "cpu" and t.dtype != "float32":
        log(f"device cpu: training in float32 (train.dtype = {t.dtype} applies on CUDA)")
    if device.type == "cpu" and cpu_threads(info) != torch.get_num_threads():
        torch.set_num_threads(cpu_threads(info))
        log(f"device cpu: {torch.get_num_threads()} threads per process")
    if t.grad_accum_start % info.world_size:
        raise ConfigError(f"train.grad_accum_start = {t.grad_accum_start} is not divisible by the "
                          f"{info.world_size} processes: the batch-size schedule's every stage must split evenly; "
                          f"use a multiple of {info.world_size}")
    return join(device, info, t.grad_accum_steps, log)


def join(device: torch.device, info: DistInfo, grad_accum_steps: int, log) -> torch.device:
    """This process's device in the job (unchanged when run alone); the accumulation must split
    evenly over the ranks, or tokens per step would not stay as configured."""
    if info.world_size == 1:
        return device
    if grad_accum_steps % info.world_size:
        raise ConfigError(f"train.grad_accum_steps = {grad_accum_steps} is not divisible by the "
                          f"{info.world_size} processes: tokens per step could not stay as configured; use a "
                          f"multiple of {info.world_size}")
    device = join_process_group(device, info)
    log(f"distributed: {info.world_size} processes ({dist.get_backend()}), "
        f"{grad_accum_steps // info.world_size} micro-batches each per optimizer step")
    return device


def seed_rank(seed: int, info: DistInfo, step: int) -> None:
    """Each rank its own dropout stream. Only rank 0's RNG state is checkpointed, so after a resume
    (step > 0) the other ranks reseed from the step: with dropout > 0 their masks then differ from
    an uninterrupted run's (without dropout the resume is exact)."""
    if info.world_size == 1 or (step and info.main):
        return
    torch.manual_seed(seed + RANK_SEED_STRIDE * info.rank + step)


def wrap(model: torch.nn.Module, t: TrainConfig, info: DistInfo, device: torch.device, grad_accum=None):
    """(the module a training step calls, the module an evaluation calls): DDP around the model
    when there are several ranks (rank 0 evaluates alone, without collectives), then whole-model
    torch.compile when train.compile_scope is "model" (regional compilation is the model's own).
    The weights of `grad_accum` (gptfast.gradaccum.GradAccumulation) are left out of DDP, which
    would never see their gradients: the trainer all-reduces those itself."""
    if t.compile and t.compile_scope == "blocks":
        model.compile_blocks()
    compile_whole = t.compile and t.compile_scope == "model"
    if info.world_size == 1:
        train_model = torch.compile(model) if compile_whole else model
        return train_model, train_model
    if grad_accum is not None:
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, grad_accum.ignored_names(model))
        grad_accum.broadcast()  # DDP's start-up broadcast skips the weights it leaves alone
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return (torch.compile(ddp) if compile_whole else ddp), model


def no_sync(train_model: torch.nn.Module, last: bool):
    """Skip DDP's gradient all-reduce on every micro-step but the step's last."""
    ddp = getattr(train_model, "_orig_mod", train_model)  # under torch.compile's wrapper
    if isinstance(ddp, DistributedDataParallel) and not last:
        return ddp.no_sync()
    return contextlib.nullcontext()


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def mean_loss_and_stop(loss_sum: torch.Tensor, stop_requested: bool,
                       info: DistInfo) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The step's mean loss over ranks, and (a device tensor, > 0 when any rank was asked to stop)
    from one all-reduce; None alone. The flag is read with the step's health values, in its one
    host sync."""
    if info.world_size == 1:
        return loss_sum, None
    shared = torch.stack([loss_sum, torch.tensor(float(stop_requested), device=loss_sum.device)])
    dist.all_reduce(shared)
    return shared[0] / info.world_size, shared[1]


def rank0_says(flag: bool, info: DistInfo, device: torch.device) -> bool:
    """Rank 0's value of `flag` on every rank (rank 0 alone evaluates, so it decides)."""
    if info.world_size == 1:
        return flag
    value = torch.tensor(float(flag), device=device)
    dist.broadcast(value, src=0)
    return bool(value.item())
