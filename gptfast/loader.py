"""Reading prepared datasets: meta.json, token files and shards, the dataset lock, and the loader
that samples training windows from them.

A prepared dataset is a folder `data_dir/<name>/` holding `train.bin` and `val.bin` (GPT-2 BPE
token ids as little-endian uint16, documents separated by the end-of-text token), or the shards
meta.json names, and `meta.json`, written last, so a folder without `meta.json` is an unfinished
preparation (`gptfast.datasets` makes them).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

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
    if "shards" in meta:
        shards = meta["shards"]
        if not (isinstance(shards, dict) and all(isinstance(shards.get(split, []), list) for split in ("train", "val"))):
            raise DataError(f'{path}: "shards" must be {{"train": [file names], "val": [file names]}}; '
                            "prepare the dataset again")
        for name in (n for split in ("train", "val") for n in shards.get(split, [])):
            if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
                raise DataError(f"{path}: shard {name!r} is not a file name inside the dataset folder; "
                                "prepare the dataset again")
    if meta.get("fetch") == "on demand" and not (isinstance(meta.get("source"), str) and meta.get("shards")):
        raise DataError(f'{path}: fetch "on demand" needs a "source" URL and "shards"; prepare the dataset again')
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


def dataset_fingerprint(folder: Path, meta: dict) -> str:
    """What the training data is, in 16 hex digits, kept in checkpoints: the inputs' fingerprint
    `prepare` recorded; for the public FineWeb shards their recipe (their content is fixed,
    whichever mirror served them); otherwise the token files' sizes and first and last MiB."""
    digest = hashlib.sha256()
    if meta.get("inputs_fingerprint"):
        digest.update(f"{meta.get('recipe')}:{meta['inputs_fingerprint']}".encode())
    elif meta.get("recipe") == "fineweb10b":
        digest.update(b"fineweb10b: the public GPT-2 shards")
    else:
        for split in ("train", "val"):
            names = (meta.get("shards") or {}).get(split) or [f"{split}.bin"]
            for name in names:
                path = folder / name
                size = path.stat().st_size if path.exists() else -1
                digest.update(f"{name}:{size}".encode())
                if size > 0:
                    with open(path, "rb") as f:
                        digest.update(f.read(1 << 20))
                        f.seek(max(0, size - (1 << 20)))
                        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


class TokenLoader:
    """Random (x, y) windows from a token file, a pure function of (seed, step, micro_step).

    No state is carried from one batch to the next, so resuming at step s reproduces the batches an
    uninterrupted run would have drawn: exact resume needs only the step count.

    A dataset of shards (meta.json's "shards": {"train": [...], "val": [...]}, the public
    pre-tokenised format) is read in order, as llm.c and modded-nanogpt read it: the micro-batch
    that starts at train token `tokens_before(step) + micro_step x batch x context` of the run draws
    its windows from the shard holding that position in the shards laid end to end (after the
    last, the first again). So a run reads only the shards its tokens reach, and an on-demand
    dataset (gptfast.fineweb.start_fineweb10b) fetches just those, ahead of the loader. Val, and a
    single train file, draw from every window.
    """

    SPLIT_IDS = {"train": 0, "val": 1}

    def __init__(self, folder: Path, vocab_size: int, block_size: int, batch_size: int,
                 seed: int, device: torch.device, tokens_before: Callable[[int], int] | None = None,
                 log: Callable[[str], None] = print, fetch: bool = True):
        """tokens_before(step): train tokens of the run's steps before `step` (default: one
        micro-batch a step). fetch: this process downloads an on-demand dataset's shards (False:
        it waits for another process's)."""
        self.block_size, self.batch_size, self.seed, self.device = block_size, batch_size, seed, device
        self.folder, self.vocab_size = folder, vocab_size
        self.tokens_before = tokens_before or (lambda step: step * batch_size * block_size)
        self._step_start = (-1, 0)  # (step, tokens_before(step)) of the last step asked for
        self.lock = lock_dataset(folder, exclusive=False)  # `prepare` waits until this loader is closed
        self.meta = read_meta(folder)
        shards = self.meta.get("shards") if isinstance(self.meta.get("shards"), dict) else {}
        self.fetcher = None
        if self.meta.get("fetch") == "on demand":
            from gptfast.fineweb import ShardFetcher

            self.fetcher = ShardFetcher(folder, self.meta["source"], shards["train"], log, download=fetch)
        self.tokens, self.window_ends = {}, {}
        self.shard_names: list[str] = shards.get("train") or []
        self.shard_arrays: list[np.ndarray] = []  # the train shards read so far, in order
        self.shard_ends: list[int] = []  # cumulative token counts of shard_arrays (a shard too short: 0)
        for split in self.SPLIT_IDS:
            if split == "train" and self.shard_names:
                for _ in range(1 if self.fetcher else len(self.shard_names)):  # on demand: the rest as reached
                    self._read_next_shard()
                if not self.shard_ends[-1] and not self.fetcher:
                    raise DataError(f"the train split of {folder} has no shard of block_size + 1 = {block_size + 1} "
                                    "tokens: lower model.block_size or add data")
                continue
            names = shards.get(split)
            arrays = ([load_tokens(folder / name, vocab_size, shard=True) for name in names] if names
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
        self.fingerprint = dataset_fingerprint(folder, self.meta)

    def _read_next_shard(self) -> None:
        i = len(self.shard_arrays)
        if self.fetcher:
            self.fetcher.ensure(i)
        tokens = load_tokens(self.folder / self.shard_names[i], self.vocab_size, shard=True)
        self.shard_arrays.append(tokens)
        usable = len(tokens) if len(tokens) >= self.block_size + 1 else 0  # a shard too short holds no window
        self.shard_ends.append((self.shard_ends[-1] if self.shard_ends else 0) + usable)

    def shard_at(self, position: int) -> int:
        """The train shard holding token `position` of the shards laid end to end, repeated."""
        while True:
            i = bisect.bisect_right(self.shard_ends, position)
            if i < len(self.shard_ends):
                return i
            if len(self.shard_arrays) < len(self.shard_names):
                self._read_next_shard()
            elif not self.shard_ends[-1]:
                raise DataError(f"the train split of {self.folder} has no shard of block_size + 1 = "
                                f"{self.block_size + 1} tokens: lower model.block_size or add data")
            else:
                position %= self.shard_ends[-1]

    def fetch_ahead(self, tokens: int) -> None:
        """An on-demand dataset: fetch, in the background, the shards a run of `tokens` train
        tokens reaches (after checking the disk can hold them), none beyond."""
        if not (self.fetcher and self.fetcher.download):
            return
        from gptfast.memory import format_bytes

        per_shard = max(1, round(np.mean([len(a) for a in self.shard_arrays])))  # an estimate: shards are alike
        shards = min(len(self.shard_names), -(-tokens // per_shard))
        missing = [n for n in self.shard_names[:shards] if not (self.folder / n).exists()]
        need = len(missing) * (per_shard * TOKEN_DTYPE.itemsize + SHARD_HEADER_BYTES)
        free = shutil.disk_usage(self.folder).free
        if need > free:
            raise DataError(f"this run reads {tokens:,} train tokens, about {shards} shards of {self.folder}; "
                            f"the {len(missing)} not yet fetched need about {format_bytes(need)} but its disk has "
                            f"{format_bytes(free)} free: free some space, set data.data_dir elsewhere, or train fewer "
                            "steps")
        if missing:
            self.fetcher.log(f"this run reads {tokens:,} train tokens: about {shards} of the {len(self.shard_names)} "
                             f"shards; {len(missing)} ({format_bytes(need)}) are fetched in the background as it trains")
        self.fetcher.start(tokens, [len(a) for a in self.shard_arrays])

    def ready(self, step: int, micro_steps: int) -> None:
        """The shards step `step`'s micro-batches read, present (fetched, or waited for): a shard
        that cannot be had is a DataError before any of the step is computed."""
        if self.shard_names:
            for micro_step in (0, micro_steps - 1):
                self.shard_at(self._position(step, micro_step))

    def _position(self, step: int, micro_step: int) -> int:
        """Where micro-batch `micro_step` of step `step` starts in the run's train tokens; the
        step's start is computed once per step (tokens_before sums the batch schedule's steps)."""
        if self._step_start[0] != step:
            self._step_start = (step, self.tokens_before(step))
        return self._step_start[1] + micro_step * self.batch_size * self.block_size

    def close(self) -> None:
        """Stop fetching and release the dataset's shared lock (the process's exit does too)."""
        if self.fetcher is not None:
            self.fetcher.close()
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def batch(self, split: str, step: int, micro_step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (batch_size, block_size) int64 on the device; y is x shifted by one token."""
        rng = np.random.default_rng([self.seed, self.SPLIT_IDS[split], step, micro_step])
        if split == "train" and self.shard_names:
            tokens = self.shard_arrays[self.shard_at(self._position(step, micro_step))]
            starts = rng.integers(0, len(tokens) - self.block_size, size=self.batch_size)
            windows = np.stack([tokens[s:s + self.block_size + 1] for s in starts]).astype(np.int64)
        else:
            arrays, ends = self.tokens[split], self.window_ends[split]
            # One draw over every window of the split (a single file: the same draws as ever), then
            # the array holding it: deterministic in (seed, step), across any number of val shards.
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
