"""FineWeb 10B, pre-tokenised with GPT-2's BPE: the public shards, downloaded rather than tokenised."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from gptfast.config import dataset_name_problem
from gptfast.errors import DataError
from gptfast.files import atomic_write, download, lock_dataset
from gptfast.loader import shard_token_count

FINEWEB10B_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/"
FINEWEB10B_TRAIN_SHARDS = 103  # of ~100M tokens each: ~10.3B tokens, ~20 GB


def fineweb10b_names(shards: int) -> dict[str, list[str]]:
    return {"val": ["fineweb_val_000000.bin"], "train": [f"fineweb_train_{i:06d}.bin" for i in range(1, shards + 1)]}


def prepare_fineweb10b(data_dir: str | Path, shards: int = FINEWEB10B_TRAIN_SHARDS, name: str = "fineweb10b",
                       log: Callable[[str], None] = print, base_url: str | None = None) -> Path:
    """Download the val shard and the first `shards` train shards of FineWeb 10B, pre-tokenised
    with GPT-2's BPE, into data_dir/name, and describe them in meta.json. Shards already complete
    (their header's token count matches their size) are kept; partial ones continue."""
    if problem := dataset_name_problem(name):
        raise DataError(f"--name: {problem}")
    if not 1 <= shards <= FINEWEB10B_TRAIN_SHARDS:
        raise DataError(f"--shards must be in [1, {FINEWEB10B_TRAIN_SHARDS}], got {shards}")
    base = base_url or os.environ.get("GPTFAST_FINEWEB10B_URL", FINEWEB10B_URL)
    folder = Path(data_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_dataset(folder, exclusive=True)
    try:
        names = fineweb10b_names(shards)
        counts = {"train": 0, "val": 0}
        all_names = [(split, n) for split in ("val", "train") for n in names[split]]
        for index, (split, shard) in enumerate(all_names, 1):
            dest = folder / shard
            try:
                count = shard_token_count(dest) if dest.exists() else None
            except DataError as e:
                log(f"  {shard}: {e}; downloading it again")
                dest.unlink()
                count = None
            if count is None:
                log(f"[{index}/{len(all_names)}] downloading {shard}")
                download(base + shard, dest, log, offline_hint="offline, copy the shards into the dataset folder")
                count = shard_token_count(dest)  # a wrong size is an error naming the file
            counts[split] += count
        meta = {"name": name, "recipe": "fineweb10b", "source": base, "tokenizer": "gpt2", "vocab_size": 50257,
                "eot_token": 50256, "dtype": "uint16", "shards": names,
                "train_tokens": counts["train"], "val_tokens": counts["val"]}
        text = json.dumps(meta, indent=2).encode()
        atomic_write(folder / "meta.json", lambda f: f.write(text))
    finally:
        if lock is not None:
            lock.close()
    log(f"dataset '{name}': {len(names['train'])} train shards, {counts['train']:,} train tokens, "
        f"{counts['val']:,} val tokens")
    return folder
