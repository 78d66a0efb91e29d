"""FineWeb 10B, pre-tokenised with GPT-2's BPE: the public shards, downloaded rather than tokenised."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Callable

from gptfast.config import dataset_name_problem
from gptfast.errors import DataError
from gptfast.files import atomic_write, download, lock_dataset
from gptfast.loader import shard_token_count

FINEWEB10B_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/"
FINEWEB10B_TRAIN_SHARDS = 103  # of ~100M tokens each: ~10.3B tokens, ~20 GB


ON_DEMAND = "on demand"  # meta.json's "fetch": the train shards come as a run reads them
OFFLINE_HINT = ("set GPTFAST_FINEWEB10B_URL to a mirror, or, offline, copy the shards into the dataset folder and "
                "run python -m gptfast.prepare fineweb10b --shards N there")
RETRY_SECONDS = (5, 30)  # the background fetch's waits before its second and third tries of a shard


def fineweb10b_names(shards: int) -> dict[str, list[str]]:
    return {"val": ["fineweb_val_000000.bin"], "train": [f"fineweb_train_{i:06d}.bin" for i in range(1, shards + 1)]}


def base_url_of(base_url: str | None = None) -> str:
    return base_url or os.environ.get("GPTFAST_FINEWEB10B_URL", FINEWEB10B_URL)


def fetch_shard(folder: Path, base: str, shard: str, log: Callable[[str], None] = print, label: str = "",
                stop: threading.Event | None = None) -> int | None:
    """The token count of `folder/shard`, downloaded first unless complete (its header's count
    matches its size); a damaged one is downloaded again, a partial `.part` continued. None when
    `stop` was set during the download."""
    dest = folder / shard
    try:
        return shard_token_count(dest) if dest.exists() else _download_shard(folder, base, shard, log, label, stop)
    except DataError as e:
        if not dest.exists():
            raise
        log(f"  {shard}: {e}; downloading it again")
        dest.unlink()
        return _download_shard(folder, base, shard, log, label, stop)


def _download_shard(folder, base, shard, log, label, stop) -> int | None:
    log(f"{label}downloading {shard}")
    if not download(base + shard, folder / shard, log, offline_hint=OFFLINE_HINT, stop=stop):
        return None
    return shard_token_count(folder / shard)  # a wrong size is an error naming the file


def prepare_fineweb10b(data_dir: str | Path, shards: int = FINEWEB10B_TRAIN_SHARDS, name: str = "fineweb10b",
                       log: Callable[[str], None] = print, base_url: str | None = None) -> Path:
    """Download the val shard and the first `shards` train shards of FineWeb 10B, pre-tokenised
    with GPT-2's BPE, into data_dir/name, and describe them in meta.json. Shards already complete
    (their header's token count matches their size) are kept; partial ones continue."""
    if problem := dataset_name_problem(name):
        raise DataError(f"--name: {problem}")
    if not 1 <= shards <= FINEWEB10B_TRAIN_SHARDS:
        raise DataError(f"--shards must be in [1, {FINEWEB10B_TRAIN_SHARDS}], got {shards}")
    base = base_url_of(base_url)
    with locked_folder(data_dir, name) as folder:
        names = fineweb10b_names(shards)
        counts = {"train": 0, "val": 0}
        all_names = [(split, n) for split in ("val", "train") for n in names[split]]
        for index, (split, shard) in enumerate(all_names, 1):
            counts[split] += fetch_shard(folder, base, shard, log, label=f"[{index}/{len(all_names)}] ")
        write_meta(folder, {"name": name, "source": base, "shards": names,
                            "train_tokens": counts["train"], "val_tokens": counts["val"]})
    log(f"dataset '{name}': {len(names['train'])} train shards, {counts['train']:,} train tokens, "
        f"{counts['val']:,} val tokens")
    return folder


@contextlib.contextmanager
def locked_folder(data_dir: str | Path, name: str):
    """data_dir/name, made if missing, held with the dataset's exclusive lock while shards arrive."""
    folder = Path(data_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    lock = lock_dataset(folder, exclusive=True)
    try:
        yield folder
    finally:
        if lock is not None:
            lock.close()


def write_meta(folder: Path, facts: dict) -> None:
    meta = {"recipe": "fineweb10b", "tokenizer": "gpt2", "vocab_size": 50257, "eot_token": 50256, "dtype": "uint16",
            **facts}
    text = json.dumps(meta, indent=2).encode()
    atomic_write(folder / "meta.json", lambda f: f.write(text))


def start_fineweb10b(data_dir: str | Path, name: str = "fineweb10b", log: Callable[[str], None] = print,
                     base_url: str | None = None) -> Path:
    """A fineweb10b folder for a run that fetches its own shards: the val shard and the first train
    shard now; meta.json lists every train shard (fetch: on demand), and the run's loader fetches
    the ones it will read (ShardFetcher), ahead of it, in the background."""
    base = base_url_of(base_url)
    with locked_folder(data_dir, name) as folder:
        names = fineweb10b_names(FINEWEB10B_TRAIN_SHARDS)
        log(f"dataset '{name}' is not prepared: fetching its val shard and first train shard from {base} now; "
            "the run fetches the other shards it reads while it trains")
        val = fetch_shard(folder, base, names["val"][0], log, label="[1/2] ")
        fetch_shard(folder, base, names["train"][0], log, label="[2/2] ")
        write_meta(folder, {"name": name, "source": base, "fetch": ON_DEMAND, "shards": names, "val_tokens": val})
    return folder


class ShardFetcher:
    """The train shards of an on-demand fineweb10b folder, fetched in order: `ensure(i)` makes
    shard i present (waiting for the background download, or downloading it), `start(tokens)`
    fetches in the background, ahead of the loader, every shard until `tokens` train tokens are
    covered and none beyond. With `download` False (torchrun's other ranks) it only waits for
    rank 0's downloads to appear (each appears whole: downloads are renamed into place)."""

    def __init__(self, folder: Path, base: str, names: list[str], log: Callable[[str], None], download: bool = True):
        self.folder, self.base, self.names, self.log, self.download = folder, base, names, log, download
        self.lock = threading.Lock()  # one download at a time: ensure() waits for the background's
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def present(self, i: int) -> bool:
        return (self.folder / self.names[i]).exists()

    def ensure(self, i: int) -> None:
        """Shard i present and complete, or a DataError naming the shard, the URL and the fix."""
        if self.present(i):
            try:
                shard_token_count(self.folder / self.names[i])  # no lock: the background may be on the next
                return
            except DataError:
                if not self.download:
                    raise
        elif not self.download:
            while not self.present(i):
                time.sleep(1.0)
            return
        if not self.present(i) and self.lock.locked():
            self.log(f"waiting for {self.names[i]}: the background download has not caught up")
        with self.lock:
            fetch_shard(self.folder, self.base, self.names[i], self.log, label="  ")

    def start(self, tokens: int, counts: list[int]) -> None:
        """In the background, the shards after those counted in `counts` (their token counts), in
        order, until the shards hold `tokens` train tokens in all."""
        if self.download and len(counts) < len(self.names) and sum(counts) < tokens:
            self.thread = threading.Thread(target=self._fetch_ahead, args=(tokens, list(counts)), daemon=True,
                                           name="gptfast-shard-fetch")
            self.thread.start()

    def _fetch_ahead(self, tokens: int, counts: list[int]) -> None:
        while sum(counts) < tokens and len(counts) < len(self.names) and not self.stop.is_set():
            i = len(counts)
            had = self.present(i)
            count = self._fetch_with_retries(i)
            if count is None:
                return
            counts.append(count)
            if not had:
                    self.log(f"fetched {self.names[i]} ({count:,} tokens; the shards hold {sum(counts):,} of the "
                         f"run's {tokens:,})")

    def _fetch_with_retries(self, i: int) -> int | None:
        for wait in (*RETRY_SECONDS, None):
            try:
                with self.lock:
                    return fetch_shard(self.folder, self.base, self.names[i], lambda _: None, stop=self.stop)
            except DataError as e:
                if wait is None or self.stop.wait(wait):
                    self.log(f"background fetch of {self.names[i]} failed ({e}); the run tries again when it "
                             "reaches that shard")
                    return None
        return None

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=5)

