"""Reading prepared datasets: meta.json, token files and shards, the dataset lock, and the loader
that samples training windows from them.

A prepared dataset is a folder `data_dir/<name>/` holding `train.bin` and `val.bin` (GPT-2 BPE
token ids as little-endian uint16, documents separated by the end-of-text token), or the shards
meta.json names, and `meta.json`, written last, so a folder without `meta.json` is an unfinished
preparation (`gptfast.datasets` makes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from gptfast.errors import DataError
from gptfast.files import lock_dataset
from gptfast.tokenizer import TOKEN_DTYPE

# The public pre-tokenised GPT-2 shards (llm.c's and modded-nanogpt's FineWeb 10B): a header of 256
# int32 (magic, version, token count, then zeros), then the uint16 tokens.
SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_BYTES = 20240520, 1, 256 * 4


def shard_token_count(path: Path) -> int:
    """The token count a shard's header records, after checking the header and the file's size."""
    try:
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(SHARD_HEADER_BYTES), dtype="<i4")
    except OSError as e:
        raise DataError(f"shard {path}: unreadable ({e})") from None
    if len(header) < 3 or header[0] != SHARD_MAGIC or header[1] != SHARD_VERSION:
        raise DataError(f"shard {path}: not a GPT-2 token shard (header magic {int(header[0]) if len(header) else None},"
                        f" expected {SHARD_MAGIC}, version {SHARD_VERSION})")
    count = int(header[2])
    size = path.stat().st_size
    if size != SHARD_HEADER_BYTES + count * TOKEN_DTYPE.itemsize:
        raise DataError(f"shard {path}: {size:,} bytes, but its header records {count:,} tokens "
                        f"({SHARD_HEADER_BYTES + 2 * count:,} bytes): a truncated download? prepare it again")
    return count


def load_tokens(path: Path, vocab_size: int, shard: bool = False) -> np.memmap:
    """Memory-map a token file (or, with `shard`, a header-prefixed shard) after checking its size
    and that every id is < vocab_size."""
    if not path.exists():
        raise DataError(f"token file {path} does not exist")
    size = path.stat().st_size
    offset = 0
    if shard:
        shard_token_count(path)
        offset = SHARD_HEADER_BYTES
    elif size % TOKEN_DTYPE.itemsize:
        raise DataError(f"token file {path} has {size} bytes, an odd count: uint16 tokens take 2 bytes each")
    if size == offset:
        raise DataError(f"token file {path} is empty")
    tokens = np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=offset)
    # One streaming pass (about a second per GB): a bad id would otherwise index past the
    # embedding on the GPU, which fails far from its cause or not at all.
    chunk = 1 << 26
    for start in range(0, len(tokens), chunk):
        top = int(tokens[start:start + chunk].max())
        if top >= vocab_size:
            where = start + int(np.argmax(tokens[start:start + chunk] >= vocab_size))
            raise DataError(f"token file {path} holds id {int(tokens[where])} at position {where:,}, "
                            f"past the model's vocab_size {vocab_size}")
    return tokens


def read_meta(folder: Path) -> dict:
    """A prepared dataset's meta.json, checked: a JSON object whose recorded facts (token dtype,
    tokenizer, token counts) agree with the folder. Hand-made datasets may leave facts out, or
    the file (whether a dataset is finished is `ensure_prepared`'s question)."""
    path = folder / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is not readable JSON ({e}); prepare the dataset again") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object, got {type(meta).__name__}; prepare the dataset again")
    if meta.get("dtype", "uint16") != "uint16":
        raise DataError(f"{path}: dtype {meta['dtype']!r}, but gptfast reads uint16 token files")
    if meta.get("tokenizer", "gpt2") != "gpt2":
        raise DataError(f"{path}: tokenizer {meta['tokenizer']!r}, but the model uses GPT-2's BPE")
    for split in ("train", "val"):
        recorded = meta.get(f"{split}_tokens")
        if recorded is None:
            continue
        size = (folder / f"{split}.bin").stat().st_size if (folder / f"{split}.bin").exists() else None
        if not isinstance(recorded, int) or (size is not None and size != recorded * TOKEN_DTYPE.itemsize):
            raise DataError(f"{path} records {recorded!r} {split} tokens but {split}.bin holds "
                            f"{None if size is None else size // TOKEN_DTYPE.itemsize:,}: the files do not belong "
                            "together; prepare the dataset again")
    return meta


class TokenLoader:
    """Random (x, y) windows from a token file, a pure function of (seed, step, micro_step).

    No state is carried from one batch to the next, so resuming at step s reproduces the batches an
    uninterrupted run would have drawn: exact resume needs only the step count.
    """

    SPLIT_IDS = {"train": 0, "val": 1}

    def __init__(self, folder: Path, vocab_size: int, block_size: int, batch_size: int,
                 seed: int, device: torch.device):
        self.block_size, self.batch_size, self.seed, self.device = block_size, batch_size, seed, device
        self.lock = lock_dataset(folder, exclusive=False)  # `prepare` waits until this loader is closed
        self.meta = read_meta(folder)
        # Each split is a list of token arrays: one file, or a dataset of shards (meta.json's
        # "shards": {"train": [...], "val": [...]}, the public pre-tokenised format).
        self.tokens, self.window_ends = {}, {}
        for split in self.SPLIT_IDS:
            shards = self.meta.get("shards", {}).get(split) if isinstance(self.meta.get("shards"), dict) else None
            arrays = ([load_tokens(folder / name, vocab_size, shard=True) for name in shards] if shards
                      else [load_tokens(folder / f"{split}.bin", vocab_size)])
            longest = max(len(a) for a in arrays)
            arrays = [a for a in arrays if len(a) >= block_size + 1]  # a shard too short holds no window
            if not arrays:
                raise DataError(f"the {split} split of {folder} has {longest:,} tokens in its longest file, fewer than "
                                f"block_size + 1 = {block_size + 1}: lower model.block_size or add data")
            self.tokens[split] = arrays
            # window starts numbered across the arrays: array i holds len(i) - block_size of them
            self.window_ends[split] = np.cumsum([len(a) - block_size for a in arrays])
        self.pin = device.type == "cuda"

    def close(self) -> None:
        """Release the dataset's shared lock (the process's exit does too)."""
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def batch(self, split: str, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, block_size) int64 on the device; y is x shifted by one token."""
        arrays, ends = self.tokens[split], self.window_ends[split]
        rng = np.random.default_rng([self.seed, self.SPLIT_IDS[split], step, micro_step])
        # One draw over every window of the split (a single file: the same draws as ever), then
        # the array holding it: deterministic in (seed, step), across any number of shards.
        starts = rng.integers(0, ends[-1], size=self.batch_size)
        which = np.searchsorted(ends, starts, side="right")
        offsets = starts - np.concatenate([[0], ends[:-1]])[which]
        windows = np.stack([arrays[i][s:s + self.block_size + 1] for i, s in zip(which, offsets)]).astype(np.int64)
        windows = torch.from_numpy(windows)  # (B, T + 1)
        if self.pin:
            # Pinned host memory lets the copy run asynchronously with the previous step's kernels.
            windows = windows.pin_memory().to(self.device, non_blocking=True)
        else:
            windows = windows.to(self.device)
        return windows[:, :-1], windows[:, 1:]
