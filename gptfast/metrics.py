"""What a run reports: its records (logged steps, evaluations, the target, the end-of-run summary),
as every logger receives them, and their lines of text."""

from __future__ import annotations

import math
import os
import time
from typing import Callable

import torch

from gptfast.hardware import mfu


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    if hours >= 48:
        return f"{hours // 24}d{hours % 24:02d}h"
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def finite_or_none(value: float) -> float | None:
    """NaN and Inf are not JSON: metrics.jsonl records them as null."""
    return value if math.isfinite(value) else None


def _fmt(value: float | None, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def resident_memory_bytes() -> int | None:
    """This process's resident memory (Linux: /proc/self/statm), or None where it cannot be read."""
    try:
        resident_pages = int(open("/proc/self/statm").read().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def format_step(record: dict, max_steps: int) -> str:
    """The log line of a step record (see Trainer.run for its keys)."""
    parts = [f"step {record['step']}/{max_steps}", f"loss {_fmt(record['loss'], '.4f')}",
             f"lr {record['lr']:.2e}", f"grad norm {_fmt(record['grad_norm'], '.3f')}",
             f"{record['step_ms']:,.0f} ms/step", f"{record['tokens_per_second']:,.0f} tok/s"]
    if record["mfu"] is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if record["peak_memory_bytes"] is not None:
        parts.append(f"peak mem {record['peak_memory_bytes'] / 2**30:.2f} GiB")
    elif record.get("resident_memory_bytes") is not None:  # the CPU: the process's memory
        parts.append(f"rss {record['resident_memory_bytes'] / 2**30:.2f} GiB")
    parts.append(f"eta {format_duration(record['eta_seconds'])}")
    if record["skipped_steps"]:
        parts.append(f"skipped {record['skipped_steps']}")
    return " | ".join(parts)


class RunMetrics:
    """The records of one training session, as every logger receives them, and their lines of text:
    `step()` (throughput and projected remaining time, from the steps since the last record),
    `evaluation()`, `target_reached()`, `summary()`. Only the main process records."""

    def __init__(self, cfg, record: Callable[[dict], None], log: Callable[[str], None],
                 flops_per_token: Callable[[int], float], peak_flops: float | None, device: torch.device,
                 first_step: int):
        self.cfg, self._record, self.log = cfg, record, log
        # flops_per_token(step): of that step's attention window (a growing window does more work)
        self.flops_per_token, self.peak_flops, self.device = flops_per_token, peak_flops, device
        self.first_step = first_step  # this session's: its first step holds compilation and warm-up
        self.start = self._last_time = time.perf_counter()
        self._last_step = first_step
        self._eta_origin: tuple[float, int] | None = None  # (time, step) of the session's first record
        self.rates: list[float] = []  # tokens/s of the records after the session's first step
        self.utilisations: list[float] = []
        self.train_loss: float | None = None  # of the last recorded step

    def due(self, step: int, done: bool) -> bool:
        """Whether `step` is recorded: every log_interval, the last, and the session's first (its
        time is the first measured projection)."""
        return step % self.cfg.train.log_interval == 0 or done or step == self.first_step + 1

    def _peak_memory(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None

    def step(self, step: int, loss: float, grad_norm: float, lr: float, skipped_steps: int,
             train_seconds: float) -> dict:
        now = time.perf_counter()
        previous = self._last_step
        step_time = (now - self._last_time) / (step - previous)
        self._last_time, self._last_step = now, step
        # The ETA follows the mean step time since the session's first record (its first step holds
        # compilation and warm-up), not the last interval alone, which swings with every pause.
        if self._eta_origin is None:
            self._eta_origin = (now, step)
        origin_time, origin_step = self._eta_origin
        mean_step_time = (now - origin_time) / (step - origin_step) if step > origin_step else step_time
        tokens_per_second = (self.cfg.tokens_before(step) - self.cfg.tokens_before(previous)) / (step - previous) / step_time
        self.train_loss = loss
        record = {
            "step": step, "loss": finite_or_none(loss), "lr": lr, "grad_norm": finite_or_none(grad_norm),
            "tokens_per_second": tokens_per_second,
            "mfu": mfu(self.flops_per_token(step - 1), tokens_per_second, self.peak_flops),
            "peak_memory_bytes": self._peak_memory(),
            "step_ms": 1000 * step_time, "resident_memory_bytes": resident_memory_bytes(),
            "eta_seconds": mean_step_time * (self.cfg.train.max_steps - step), "skipped_steps": skipped_steps,
            "tokens": self.cfg.tokens_before(step), "tokens_per_step": self.cfg.tokens_at(step - 1),
            "elapsed_seconds": train_seconds,
        }
        if step > self.first_step + 1:
            self.rates.append(tokens_per_second)
            if record["mfu"] is not None:
                self.utilisations.append(record["mfu"])
        self._record(record)
        self.log(format_step(record, self.cfg.train.max_steps))
        return record

    def skipped(self, step: int, loss: float, grad_norm: float, reason: str, in_a_row: int, skipped: int) -> None:
        self._record({"step": step, "skipped": True, "loss": finite_or_none(loss),
                      "grad_norm": finite_or_none(grad_norm), "reason": reason})
        self.log(f"step {step} | {reason}: update skipped ({in_a_row} in a row, {skipped} in this run)")

    def unhealthy(self, step: int, reason: str, in_a_row: int) -> None:
        self._record({"step": step, "unhealthy": reason})
        self.log(f"step {step} | unhealthy: {reason} ({in_a_row} in a row)")

    def hellaswag(self, step: int, result: dict) -> None:
        self._record({"step": step, "hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"],
                      "hellaswag_items": result["items"], "tokens": self.cfg.tokens_before(step)})
        self.log(f"step {step} | hellaswag acc_norm {result['acc_norm']:.4f} (acc {result['acc']:.4f}, "
                 f"{result['items']} items)")

    def evaluation(self, step: int, val_loss: float, train_seconds: float) -> None:
        self._record({"step": step, "val_loss": finite_or_none(val_loss),
                      "tokens": self.cfg.tokens_before(step), "elapsed_seconds": train_seconds})
        self.log(f"step {step} | val loss {val_loss:.4f}")

    def target_reached(self, step: int, val_loss: float, train_seconds: float, gpus: int | None) -> dict:
        """train.target_val_loss reached: what it took (gpus: GPUs in the job; None on the CPU)."""
        target = self.cfg.train.target_val_loss
        event = {"event": "target_reached", "step": step, "target_val_loss": target, "val_loss": val_loss,
                 "tokens": self.cfg.tokens_before(step), "train_seconds": train_seconds,
                 "gpu_hours": train_seconds / 3600 * gpus if gpus else None}
        self._record(event)
        gpu = f", {event['gpu_hours']:.2f} GPU-hours" if event["gpu_hours"] else ""
        self.log(f"target val loss {target} reached at step {step}: val loss {val_loss:.4f} after "
                 f"{format_duration(train_seconds)} of training{gpu}, {event['tokens']:,} tokens")
        return event

    def summary(self, state, target: dict | None, checkpoint) -> dict:
        """The end-of-run summary (state: the run's TrainState): one line, and a record."""
        wall = time.perf_counter() - self.start
        steps = state.step - self.first_step
        target_loss = self.cfg.train.target_val_loss
        tokens = self.cfg.tokens_before(state.step)
        record = {
            "event": "summary", "step": state.step, "steps_this_session": steps,
            "wall_seconds": wall, "train_seconds": state.train_seconds,
            "tokens": tokens, "tokens_this_session": tokens - self.cfg.tokens_before(self.first_step),
            "final_val_loss": None if state.val_loss is None else finite_or_none(state.val_loss),
            "best_val_loss": None if state.best_val_loss is None else finite_or_none(state.best_val_loss),
            "mean_tokens_per_second": sum(self.rates) / len(self.rates) if self.rates else None,
            "mean_mfu": sum(self.utilisations) / len(self.utilisations) if self.utilisations else None,
            "peak_memory_bytes": self._peak_memory(),
            "checkpoint": str(checkpoint) if checkpoint else None,
            "target_val_loss": target_loss or None,
            "target_reached_step": target["step"] if target else None,
            "target_reached_seconds": target["train_seconds"] if target else None,
            "target_reached_tokens": target["tokens"] if target else None,
        }
        self._record(record)
        self.log(summary_line(record, target_loss))
        return record


def summary_line(record: dict, target_loss: float) -> str:
    parts = [f"summary: step {record['step']} ({record['steps_this_session']} this session) in "
             f"{format_duration(record['wall_seconds'])}", f"{record['tokens_this_session']:,} tokens"]
    if record["final_val_loss"] is not None:
        parts.append(f"val loss {record['final_val_loss']:.4f} (best {record['best_val_loss']:.4f})")
    if record["mean_tokens_per_second"] is not None:
        parts.append(f"{record['mean_tokens_per_second']:,.0f} tok/s mean")
    if record["mean_mfu"] is not None:
        parts.append(f"mfu {100 * record['mean_mfu']:.1f}%")
    if record["peak_memory_bytes"] is not None:
        parts.append(f"peak mem {record['peak_memory_bytes'] / 2**30:.2f} GiB")
    if record["target_reached_step"] is not None:
        parts.append(f"target {target_loss} reached at step {record['target_reached_step']} "
                     f"({format_duration(record['target_reached_seconds'])} of training)")
    elif target_loss:
        parts.append(f"target {target_loss} not reached")
    parts.append(f"checkpoint {record['checkpoint']}" if record["checkpoint"] else "no checkpoint written")
    return " | ".join(parts)
