"""What a run reports: one record per logged step, as a JSON line and as a line of text."""

from __future__ import annotations

import math


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


def format_step(record: dict, max_steps: int) -> str:
    """The log line of a step record (see Trainer.run for its keys)."""
    parts = [f"step {record['step']}/{max_steps}", f"loss {_fmt(record['loss'], '.4f')}",
             f"lr {record['lr']:.2e}", f"grad norm {_fmt(record['grad_norm'], '.3f')}",
             f"{record['tokens_per_second']:,.0f} tok/s"]
    if record["mfu"] is not None:
        parts.append(f"mfu {100 * record['mfu']:.1f}%")
    if record["peak_memory_bytes"] is not None:
        parts.append(f"peak mem {record['peak_memory_bytes'] / 2**30:.2f} GiB")
    parts.append(f"eta {format_duration(record['eta_seconds'])}")
    if record["skipped_steps"]:
        parts.append(f"skipped {record['skipped_steps']}")
    return " | ".join(parts)
