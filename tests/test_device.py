"""Where a run executes (gptfast/device.py): the device, the autocast dtype, threads, the rank."""

import os

import pytest
import torch

from gptfast.device import DistInfo, autocast_dtype, resolve_device
from gptfast.errors import ConfigError


def test_auto_is_cuda_when_present_else_cpu_and_cuda_without_a_gpu_is_one_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device: for a CPU run use configs/cpu_smoke.toml"):
        resolve_device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    with pytest.raises(ConfigError, match="only 1 CUDA devices exist"):
        resolve_device("cuda:1")


def test_autocast_only_on_cuda_and_only_for_half_types():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert autocast_dtype(cuda, "bfloat16") is torch.bfloat16 and autocast_dtype(cuda, "float16") is torch.float16
    assert autocast_dtype(cuda, "float32") is None and autocast_dtype(cpu, "bfloat16") is None


def test_rank_comes_from_torchrun_environment(monkeypatch):
    for key, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    info = DistInfo.from_env()
    assert (info.rank, info.world_size, info.local_rank, info.main) == (3, 4, 1, False)


def test_cpu_threads_are_shared_among_a_machines_processes(monkeypatch):
    from gptfast.device import DistInfo, cpu_threads

    monkeypatch.delenv("GPTFAST_CPU_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert cpu_threads(DistInfo(rank=1, world_size=4, local_rank=1)) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert cpu_threads(DistInfo(rank=1, world_size=32, local_rank=1)) == 1
    monkeypatch.setenv("GPTFAST_CPU_THREADS", "3")
    assert cpu_threads(DistInfo()) == 3
