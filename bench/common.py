"""What every benchmark shares: the device's description and measured ceilings, timing, results.

Discipline (after gpt-fast): warm-up and compilation happen before timing; each timed round runs
a batch of calls and synchronises the device before the clock is read; inputs rotate through
enough copies that repeated calls cannot be served from the GPU's L2 cache; the device's name and
software versions are written next to every figure.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

from gptfast.hardware import peak_bf16_flops

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# Working set the rotating inputs must exceed: a few times the largest L2 we run on (H100/H200: 50 MB).
ROTATE_BYTES = 256 * 2**20


@dataclass
class DeviceInfo:
    kind: str  # "cuda" or "cpu"
    name: str  # the device's own name
    label: str  # how figures are labelled: the name, plus "(Triton interpreter)" on CPU
    torch_version: str
    triton_version: str
    git_sha: str
    memory_bytes: int | None = None
    driver: str | None = None
    sm_clock_mhz: int | None = None
    mem_clock_mhz: int | None = None
    samples: list[dict] = field(default_factory=list)  # power / temperature sampled during the run


def git_sha() -> str:
    """The checkout's commit (with -dirty for uncommitted changes to tracked files); a copy of the
    tree without its .git (a rented GPU machine's) names it through GPTFAST_COMMIT."""
    if os.environ.get("GPTFAST_COMMIT"):
        return os.environ["GPTFAST_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _nvml_handle(device: torch.device):
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
    except Exception:  # no NVML (driver too old, not NVIDIA, container without it): report less
        return None, None


def describe_device(device: torch.device) -> DeviceInfo:
    import triton

    common = dict(torch_version=torch.__version__, triton_version=triton.__version__, git_sha=git_sha())
    if device.type != "cuda":
        name = platform.processor() or platform.machine() or "cpu"
        return DeviceInfo("cpu", name, f"cpu {name} (Triton interpreter; not comparable with GPU figures)",
                          **common)
    name = torch.cuda.get_device_name(device)
    info = DeviceInfo("cuda", name, name, memory_bytes=torch.cuda.get_device_properties(device).total_memory,
                      **common)
    nvml, handle = _nvml_handle(device)
    if handle is not None:
        info.driver = nvml.nvmlSystemGetDriverVersion()
        info.sm_clock_mhz = nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_SM)
        info.mem_clock_mhz = nvml.nvmlDeviceGetMaxClockInfo(handle, nvml.NVML_CLOCK_MEM)
    return info


def sample_power(device: torch.device, info: DeviceInfo, tag: str) -> None:
    """Record the GPU's power draw, temperature and SM clock now (no-op without NVML)."""
    if device.type != "cuda":
        return
    nvml, handle = _nvml_handle(device)
    if handle is None:
        return
    info.samples.append({
        "tag": tag,
        "power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1000,
        "temperature_c": nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU),
        "sm_clock_mhz": nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
    })


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_bandwidth(device: torch.device) -> float:
    """Device memory bandwidth in bytes/s from a large copy (bytes read + bytes written)."""
    n_bytes = 1 << 30 if device.type == "cuda" else 1 << 28
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    synchronize(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        dst.copy_(src)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n_bytes / sorted(times)[len(times) // 2]


def measure_matmul_peak(device: torch.device) -> float:
    """Dense bf16 matmul FLOP/s from a large product: the MFU peak for a device not in the table."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    times = []
    for _ in range(10):
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / sorted(times)[len(times) // 2]


def peak_flops(info: DeviceInfo, device: torch.device) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from): the table by device name; an unknown GPU's is measured.
    The CPU gets none: an MFU of the interpreter path would mean nothing."""
    if info.kind != "cuda":
        return None, "none on CPU"
    table = peak_bf16_flops(info.name)
    if table is not None:
        return table, "table"
    return measure_matmul_peak(device), "measured peak"


def rotating(make: Callable[[], tuple], bytes_per_set: int, device: torch.device) -> list[tuple]:
    """Enough independent input sets that cycling through them overflows the GPU's L2 cache."""
    count = 1 if device.type != "cuda" else max(2, min(64, math.ceil(ROTATE_BYTES / max(1, bytes_per_set))))
    return [make() for _ in range(count)]


def time_calls(benchmark, call: Callable[[int], object], device: torch.device, n_sets: int,
               target_round_s: float = 2e-3, rounds: int = 20) -> float:
    """Median seconds per call of `call(i)` (i cycles through n_sets input sets), timed with
    pytest-benchmark: each round runs a batch of calls and then synchronises the device."""
    for i in range(max(3, n_sets)):  # warm-up: compilation, autotuning, allocator growth
        call(i % n_sets)
    synchronize(device)
    start = time.perf_counter()
    call(0)
    synchronize(device)
    once = max(time.perf_counter() - start, 1e-7)
    per_round = max(1, min(1000, int(target_round_s / once)))

    def run_round():
        for i in range(per_round):
            call(i % n_sets)
        synchronize(device)

    benchmark.pedantic(run_round, rounds=rounds if device.type == "cuda" else 3, iterations=1, warmup_rounds=1)
    return benchmark.stats.stats.median / per_round


@dataclass
class Row:
    suite: str  # "layernorm", "train", ...
    case: str  # the shape and mode, identical across providers so they can be compared
    provider: str  # "gptfast", "torch", "torch_compile"
    seconds: float  # median per call
    bytes_moved: int | None = None  # the memory-bandwidth floor's byte count
    gbps: float | None = None
    floor_fraction: float | None = None  # achieved bandwidth / measured device bandwidth
    extra: dict = field(default_factory=dict)  # tokens/s, MFU, peak memory, ...


def bandwidth_row(suite: str, case: str, provider: str, seconds: float, bytes_moved: int,
                  bandwidth: float) -> Row:
    gbps = bytes_moved / seconds / 1e9
    return Row(suite, case, provider, seconds, bytes_moved, gbps, bytes_moved / seconds / bandwidth)


def speedups(rows: list[Row], ours: str = "gptfast") -> dict[tuple[str, str], dict[str, float]]:
    """(suite, case) -> {other provider: its time / ours}, for every case `ours` has a row for
    (> 1 means ours is faster)."""
    mine = {(r.suite, r.case): r.seconds for r in rows if r.provider == ours}
    out: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        key = (r.suite, r.case)
        if r.provider != ours and key in mine and mine[key] > 0:
            out.setdefault(key, {})[r.provider] = r.seconds / mine[key]
    return out


# The peer kernel libraries (bench/peers.py loads them): each table ranks gptfast against the best.
PEER_PROVIDERS = ("liger", "cce")


def fastest(rows: list[Row]) -> dict[tuple[str, str], Row]:
    """(suite, case) -> the fastest provider's row."""
    best: dict[tuple[str, str], Row] = {}
    for r in rows:
        key = (r.suite, r.case)
        if key not in best or r.seconds < best[key].seconds:
            best[key] = r
    return best


def versus_fastest(rows: list[Row], ours: str = "gptfast") -> dict[tuple[str, str], str]:
    """(suite, case) -> "fastest: P; gptfast 0.93x of it; vs best peer 1.10x (liger)" for every case
    gptfast has a row for (x > 1: gptfast is faster)."""
    best, mine = fastest(rows), {(r.suite, r.case): r.seconds for r in rows if r.provider == ours}
    out = {}
    for key, seconds in mine.items():
        text = f"fastest: {best[key].provider}"
        if best[key].provider != ours:
            text += f"; gptfast {best[key].seconds / seconds:.2f}x of it"
        peers = [r for r in rows if (r.suite, r.case) == key and r.provider in PEER_PROVIDERS]
        if peers:
            peer = min(peers, key=lambda r: r.seconds)
            text += f"; vs best peer ({peer.provider}) {peer.seconds / seconds:.2f}x"
        out[key] = text
    return out


def format_table(rows: list[Row], info: DeviceInfo, bandwidth: float | None) -> str:
    """A markdown table of every row; gptfast's rows carry their speed-up over each other provider,
    the fastest provider of the case and gptfast's ratio to it and to the best peer library."""
    ratios = speedups(rows)
    against_fastest = versus_fastest(rows)
    lines = [f"Device: **{info.label}**; torch {info.torch_version}, triton {info.triton_version}, "
             f"commit {info.git_sha}" + (f"; measured copy bandwidth {bandwidth / 1e9:,.0f} GB/s" if bandwidth else ""),
             "",
             "| suite | case | provider | time | GB/s | of floor | gptfast speed-up | fastest | other |",
             "|---|---|---|---:|---:|---:|---|---|---|"]
    for r in rows:
        gbps = "" if r.gbps is None else f"{r.gbps:,.0f}"
        floor = "" if r.floor_fraction is None else f"{100 * r.floor_fraction:.0f}%"
        speedup = ", ".join(f"{v:.2f}x vs {k}" for k, v in ratios.get((r.suite, r.case), {}).items()) \
            if r.provider == "gptfast" else ""
        other = ", ".join(f"{k} {v}" for k, v in r.extra.items() if v is not None)
        best = against_fastest.get((r.suite, r.case), "") if r.provider == "gptfast" else ""
        lines.append(f"| {r.suite} | {r.case} | {r.provider} | {format_seconds(r.seconds)} | {gbps} | {floor} | "
                     f"{speedup} | {best} | {other} |")
    return "\n".join(lines) + "\n"


def format_seconds(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def write_results(rows: list[Row], info: DeviceInfo, bandwidth: float | None, directory: Path = RESULTS_DIR,
                  when: datetime.datetime | None = None) -> tuple[Path, Path]:
    """Write `<device>_<date>.json` (every row, the device, versions, SHA) and the same as a
    markdown table; returns both paths."""
    when = when or datetime.datetime.now(datetime.timezone.utc)
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(info.name if info.kind == 'cuda' else 'cpu')}_{when.strftime('%Y%m%d-%H%M%S')}"
    payload = {"device": asdict(info), "bandwidth_bytes_per_s": bandwidth, "utc": when.isoformat(),
               "rows": [asdict(r) for r in rows]}
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(f"# Benchmark results, {when.strftime('%Y-%m-%d %H:%M')} UTC\n\n"
                       + format_table(rows, info, bandwidth))
    return json_path, md_path


def bench_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_gpu() -> bool:
    from kernels._utils import interpreter_enabled  # the one reading of TRITON_INTERPRET

    return torch.cuda.is_available() and not interpreter_enabled()
