"""HellaSwag (Zellers et al. 2019): pick the right one of four endings for a context; the downstream
measure GPT-2 runs are compared by (OpenAI's GPT-2 124M: ~29% acc_norm in llm.c's evaluation).

Completion-style scoring, as llm.c's and lm-eval-harness's: each ending is appended to the context
(a space between, as the text reads) and scored by the model's cross-entropy over the ending's
tokens only. `acc` picks the ending with the lowest total loss, `acc_norm` the lowest mean loss
per token (length-normalised; the figure usually quoted). Items are scored in batches of whole
items (4 rows each), the rows right-padded; a context that with its longest ending exceeds the
model's context keeps its last tokens.

Data: the official jsonl (one item a line: "ctx", "endings" (4), "label"), downloaded once into a
cache folder (GPTFAST_CACHE_DIR, default ~/.cache/gptfast), or read from a file offline.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from gptfast.errors import DataError
from gptfast.progress import Progress

URLS = {split: f"https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
        for split in ("train", "val", "test")}


@dataclass
class Item:
    context: str
    endings: list[str]
    label: int


def cache_dir() -> Path:
    return Path(os.environ.get("GPTFAST_CACHE_DIR", Path.home() / ".cache" / "gptfast"))


def data_file(split: str, input_file: str | None = None, log: Callable[[str], None] = print) -> Path:
    """The split's jsonl: `input_file` when given, else the cached download (fetched on first use)."""
    if input_file:
        path = Path(input_file)
        if not path.is_file():
            raise DataError(f"hellaswag: --input {input_file}: no such file")
        return path
    if split not in URLS:
        raise DataError(f"hellaswag: unknown split {split!r}; splits: {', '.join(URLS)}")
    path = cache_dir() / "hellaswag" / f"hellaswag_{split}.jsonl"
    if path.is_file():
        return path
    from gptfast.files import download

    log(f"downloading {URLS[split]} -> {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    download(URLS[split], path, log, offline_hint="offline, pass --input FILE (the official hellaswag_<split>.jsonl)")
    return path


def read_items(path: Path, limit: int | None = None) -> list[Item]:
    items = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
                item = Item(raw["ctx"], list(raw["endings"]), int(raw["label"]))
            except (ValueError, KeyError, TypeError) as e:
                raise DataError(f"{path}:{number}: not a HellaSwag item ({type(e).__name__}: {e})") from None
            if len(item.endings) != 4 or not 0 <= item.label < 4:
                raise DataError(f"{path}:{number}: a HellaSwag item has 4 endings and a label in 0..3")
            items.append(item)
            if limit is not None and len(items) >= limit:
                break
    if not items:
        raise DataError(f"{path}: holds no items")
    return items


def render(item: Item, enc, block_size: int) -> tuple[list[list[int]], list[int]]:
    """(4 token rows of context + ending, the index where each row's ending starts)."""
    context = enc.encode_ordinary(item.context)
    rows, starts = [], []
    for ending in item.endings:
        tail = enc.encode_ordinary(" " + ending)
        row = (context + tail)[-block_size:]
        rows.append(row)
        starts.append(len(row) - len(tail))
    return rows, starts


@torch.no_grad()
def ending_losses(logits_fn, batch: list[tuple[list[int], int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Total and mean cross-entropy over each row's ending tokens. logits_fn maps (B, T) ids to
    (B, T, V) logits."""
    width = max(len(row) for row, _ in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for i, (row, start) in enumerate(batch):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, max(start, 1): len(row)] = True  # positions predicted from the previous token
    ids, mask = ids.to(device), mask.to(device)
    logits = logits_fn(ids).float()  # (B, T, V)
    losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                             reduction="none").view(len(batch), width - 1)
    losses = losses * mask[:, 1:]
    total = losses.sum(1)
    return total, total / mask[:, 1:].sum(1).clamp(min=1)


def evaluate(logits_fn, items: Iterable[Item], enc, block_size: int, device: torch.device, batch_items: int = 8,
             log: Callable[[str], None] = print, progress_seconds: float = 10.0,
             should_stop: Callable[[], bool] = lambda: False) -> dict | None:
    """{"acc", "acc_norm", "items", "predictions" (acc_norm's choice per item)}; None when
    `should_stop()` turned true between batches (a stop request must not wait for 10,042 items)."""
    items = list(items)
    correct = correct_norm = 0
    predictions = []
    progress = Progress(len(items), "hellaswag: item", log, after=progress_seconds)
    for start in range(0, len(items), batch_items):
        if should_stop():
            progress.close()
            return None
        chunk = items[start:start + batch_items]
        rows = []
        for item in chunk:
            tokens, starts = render(item, enc, block_size)
            rows.extend(zip(tokens, starts, strict=True))
        total, mean = ending_losses(logits_fn, rows, device)
        total, mean = total.view(-1, 4).cpu(), mean.view(-1, 4).cpu()
        for item, t, m in zip(chunk, total, mean, strict=True):
            choice = int(m.argmin())
            predictions.append(choice)
            correct += int(t.argmin()) == item.label
            correct_norm += choice == item.label
        progress.update(min(start + batch_items, len(items)))
    progress.close()
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items), "items": len(items),
            "predictions": predictions}


@torch.no_grad()
def evaluate_model(model, autocast_context: Callable, items: list[Item], device: torch.device,
                   log: Callable[[str], None], progress_seconds: float,
                   should_stop: Callable[[], bool] = lambda: False) -> dict | None:
    """`evaluate` on a training model, as the trainer runs it between steps: in eval mode, under
    the run's autocast, and with its blocks uncompiled (items vary in length: no recompilation)."""
    from gptfast.tokenizer import get_tokenizer

    model.eval()

    def logits(ids):
        with autocast_context(), model.uncompiled():
            return model(ids)

    try:
        return evaluate(logits, items, get_tokenizer(), model.config.block_size, device, log=log,
                        progress_seconds=progress_seconds, should_stop=should_stop)
    finally:
        model.train()


def hellaswag_items(cfg, log: Callable[[str], None]) -> list[Item] | None:
    """The items a run evaluates during training (cfg: its [eval] section), or None when it
    evaluates none: read, or downloaded, before anything else is touched, so a missing offline
    file is one error at the start."""
    if not cfg.hellaswag_interval:
        return None
    return read_items(data_file("val", cfg.hellaswag_input or None, log), cfg.hellaswag_limit or None)
