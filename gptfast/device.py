"""Where a run executes: the device, the autocast dtype, and this process's place in a torchrun job."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from gptfast.errors import ConfigError

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when present, else cpu; asking for CUDA on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {name!r} but this machine has no CUDA device: for a CPU run "
                              "use configs/cpu_smoke.toml, or add --train.device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device = {name!r} but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def cpu_threads(dist_info: DistInfo) -> int:
    """Threads for this process's CPU ops: the machine's cores shared among the processes of this
    machine. torchrun sets OMP_NUM_THREADS=1 for every process it starts (one thread each, however
    many cores); alone, torch's default (the physical cores) is kept. An explicit setting of the
    user's wins: GPTFAST_CPU_THREADS."""
    if os.environ.get("GPTFAST_CPU_THREADS"):
        return max(1, int(os.environ["GPTFAST_CPU_THREADS"]))
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if dist_info.world_size == 1:
        return torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // local_processes)


def autocast_dtype(device: torch.device, dtype_name: str) -> torch.dtype | None:
    """The autocast dtype a run uses on `device`: train.dtype on CUDA; None (fp32) on the CPU,
    which has no fast bf16 matmuls worth the rounding."""
    return AUTOCAST_DTYPES.get(dtype_name) if device.type == "cuda" else None


def join_process_group(device: torch.device, dist_info: DistInfo) -> torch.device:
    """Join the torchrun job: NCCL on CUDA (one GPU per rank, the local rank's), gloo on the CPU.
    Returns this rank's device."""
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def memory_capacity_bytes(device: torch.device) -> int:
    """What a run on `device` can hold at most: the GPU's memory, or the machine's RAM."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
