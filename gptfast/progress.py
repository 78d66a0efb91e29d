"""Progress of long loops, and the time a run is projected to take before it starts.

`Progress` is silent for a loop that ends within `after` seconds (a fast optimizer step prints
nothing extra); past that it reports every `every` seconds: one line rewritten in place on a
terminal, plain lines otherwise (a log file, a pipe, a notebook).
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Callable, TextIO

from gptfast.metrics import format_duration

if TYPE_CHECKING:
    import torch


class Progress:
    """`update(done)` after each item of `total`; `close()` at the end."""

    def __init__(self, total: int, label: str, log: Callable[[str], None] = print, *, after: float = 10.0,
                 every: float | None = None, unit: str = "", stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.label, self.log, self.unit = total, label, log, unit
        self.after = after
        self.every = after if every is None else every
        # A bar rewritten in place only where a person watches a terminal and log is plain print.
        self.stream = stream if stream is not None else (sys.stdout if log is print else None)
        self.in_place = bool(self.stream is not None and getattr(self.stream, "isatty", lambda: False)())
        self.clock = clock
        self.start = self.last = clock()
        self.shown = False
        self.enabled = after > 0

    def line(self, done: int) -> str:
        elapsed = self.clock() - self.start
        left = elapsed / done * (self.total - done) if done else float("nan")
        eta = f", ~{format_duration(left)} left" if done and left == left else ""
        width = 24
        filled = int(width * done / self.total) if self.total else width
        bar = f"[{'#' * filled}{'.' * (width - filled)}] " if self.in_place else ""
        return f"{self.label}: {bar}{done}/{self.total}{self.unit} ({format_duration(elapsed)} so far{eta})"

    def update(self, done: int) -> None:
        if not self.enabled:
            return
        now = self.clock()
        if now - self.start < self.after or (self.shown and now - self.last < self.every):
            return
        self.last, self.shown = now, True
        if self.in_place:
            self.stream.write("\r" + self.line(done))
            self.stream.flush()
        else:
            self.log(self.line(done))

    def close(self) -> None:
        if self.shown and self.in_place:
            self.stream.write("\n")
            self.stream.flush()


def projected_seconds(flops_per_token: float, tokens: int, flops_per_second: float) -> float:
    """Wall time of training `tokens` at `flops_per_second` achieved (an estimate, not a measure)."""
    return flops_per_token * tokens / flops_per_second


def cpu_matmul_flops(seconds: float = 0.05) -> float:
    """fp32 matmul FLOP/s this CPU achieves with torch's threads, from a short probe."""
    import torch

    n = 512
    generator = torch.Generator().manual_seed(0)  # the training RNG stream is not touched
    a, b = torch.randn(n, n, generator=generator), torch.randn(n, n, generator=generator)
    a @ b
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        calls += 1
    return 2 * n**3 * calls / (time.perf_counter() - start)


def projection(flops_per_token: float, steps: int, tokens: int, device: torch.device,
               peak_flops: float | None) -> str | None:
    """Before the first step: the run's projected wall time as a line, an estimate from the model's
    FLOPs and the device's throughput (an assumed 40% of a GPU's bf16 peak; a measured matmul rate
    on the CPU), prefixed "warning: " beyond a day on a CPU or a month on a GPU. None where there is
    no basis (a GPU missing from the peak table, another device type)."""
    if device.type == "cuda":
        if peak_flops is None:
            return None
        rate, basis, limit = 0.4 * peak_flops, "40% of the GPU's bf16 peak", 30 * 86400
    elif device.type == "cpu":
        # threads share the probe's matmul rate; a step's small ops run well below it
        rate, basis, limit = 0.5 * cpu_matmul_flops(), "half this CPU's measured matmul rate", 86400
    else:
        return None
    seconds = projected_seconds(flops_per_token, tokens, rate)
    line = (f"projected: ~{format_duration(seconds)} for {steps:,} steps ({tokens:,} tokens) on {device.type} "
            f"(an estimate at {basis}; the first step's time is the measured one)")
    if seconds <= limit:
        return line
    hint = ("this config is meant for a GPU: on the CPU try configs/cpu_smoke.toml, or fewer steps with "
            "--train.max_steps=N" if device.type == "cpu" else "fewer steps with --train.max_steps=N")
    return f"warning: {line}; {hint}"


def announce(log: Callable[[str], None], step: int, max_steps: int, flops_per_token: float, tokens_left: int,
             device: torch.device, peak_flops: float | None) -> None:
    """Before a session's first step: nothing to do, or the projected duration of the tokens left
    (see `projection`)."""
    if step >= max_steps:
        log(f"nothing to do: step {step} >= train.max_steps = {max_steps}")
        return
    line = projection(flops_per_token, max_steps - step, tokens_left, device, peak_flops)
    if line:
        log(line)
