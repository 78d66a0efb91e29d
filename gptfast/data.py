"""Datasets: tokenise text into uint16 token files, and sample training windows from them.

A prepared dataset is a folder `data_dir/<name>/` holding `train.bin` and `val.bin` (GPT-2 BPE
token ids as little-endian uint16, documents separated by the end-of-text token) and `meta.json`,
written last, so a folder without `meta.json` is an unfinished preparation.

Recipes (`python -m gptfast.prepare RECIPE`):
- `stdlib`: the Python standard library's own source files on this machine; no download.
- `shakespeare`: tiny-shakespeare, downloaded, or read from `--input FILE` offline.
- `text`: any local text files or globs (`--input 'notes/**/*.md' --name notes`).
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import itertools
import json
import os
import sysconfig
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from gptfast.config import OFFLINE_RECIPES, RECIPES, DataConfig, is_dataset_name
from gptfast.files import atomic_write
from gptfast.errors import DataError

TOKEN_DTYPE = np.dtype("<u2")  # GPT-2's 50257 ids fit in 16 bits: half the bytes of int32
GPT2_VOCAB_SIZE = 50257
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def get_tokenizer():
    """tiktoken's GPT-2 BPE (honours TIKTOKEN_CACHE_DIR; downloads its files on first use)."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests/urllib errors of several kinds offline
        raise DataError(
            f"cannot load the GPT-2 tokenizer ({type(e).__name__}: {e}); offline, point "
            "TIKTOKEN_CACHE_DIR at a folder holding tiktoken's cached GPT-2 files") from None


# ----------------------------------------------------------------------------------------------
# Preparation


@dataclass
class Document:
    name: str  # stable identifier (a path); decides the train/val split
    text: str


# How undecodable bytes in an input file are handled: "strict" stops with an error naming the file,
# "replace" substitutes U+FFFD and counts the files (prepare's --errors).


def _read_text(path: str, errors: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        if errors == "strict":
            raise DataError(f"{path} is not UTF-8 text (byte {e.start:,}: {e.reason}); convert it, leave it "
                            "out, or pass --errors=replace to substitute U+FFFD for undecodable bytes") from None
        return data.decode("utf-8", errors="replace")


def stdlib_documents() -> list[str]:
    """Every .py file of the running Python's standard library (site-packages left out)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in root.rglob("*.py") if "site-packages" not in p.parts
                   and "dist-packages" not in p.parts)
    if not files:
        raise DataError(f"no .py files found under the standard library folder {root}")
    return files


def text_documents(patterns: Iterable[str]) -> list[str]:
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise DataError(f"--input {pattern!r} matches no readable file")
        files.extend(matches)
    return list(dict.fromkeys(files))  # drop repeats, keep order


def download(url: str, dest: Path, log: Callable[[str], None] = print, offline_hint: str = "") -> None:
    """Download `url` to `dest` through `dest.part`, continuing a partial `.part` with an HTTP Range
    request (from the start when the server ignores it); a line of progress every 10 s. A failure
    is a DataError naming the URL, the kept partial file and `offline_hint`."""
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            if have and response.status != 206:  # no range support: start over
                have = 0
            total = have + int(response.headers.get("Content-Length", 0) or 0)
            last = time.monotonic()
            with open(part, "ab" if have else "wb") as f:
                while chunk := response.read(CHUNK_BYTES):
                    f.write(chunk)
                    have += len(chunk)
                    if time.monotonic() - last >= 10:
                        last = time.monotonic()
                        log(f"  {dest.name}: {have / 2**20:,.0f}" + (f" / {total / 2**20:,.0f}" if total else "")
                            + " MiB")
    except OSError as e:
        kept = f"; the partial file {part} is kept and the next try continues it" if part.exists() else ""
        raise DataError(f"could not download {url} ({e}){kept}" + (f"; {offline_hint}" if offline_hint else "")) \
            from None
    os.replace(part, dest)


def _is_val(name: str, val_fraction: float) -> bool:
    """Deterministic document-level split: the same file always lands in the same split."""
    digest = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little")
    return digest / 2**64 < val_fraction


class _Progress:
    """One status line per second while a corpus is tokenised, so a long preparation is not silent."""

    def __init__(self, total: int | None, log: Callable[[str], None]):
        self.total, self.log = total, log
        self.start = self.last = time.perf_counter()
        self.shown = -1  # documents count of the last line shown

    def update(self, documents: int, tokens: int, final: bool = False) -> None:
        now = time.perf_counter()
        if (final and documents != self.shown) or now - self.last >= 1.0:
            rate = tokens / max(now - self.start, 1e-9)
            of_total = f"/{self.total:,}" if self.total else ""
            self.log(f"  documents {documents:,}{of_total}  tokens {tokens:,}  {rate / 1e6:.2f}M tok/s")
            self.last, self.shown = now, documents


def file_documents(files: list[str], errors: str = "strict",
                   log: Callable[[str], None] = print) -> Iterator[Document]:
    replaced = 0
    for path in files:
        text = _read_text(path, errors)
        replaced += "\ufffd" in text
        yield Document(path, text)
    if replaced:
        log(f"warning: {replaced} input files held bytes that are not UTF-8; they were replaced by U+FFFD")


def _tokenise(documents, tmp_paths, enc, split_by_tokens, val_fraction, progress):
    """Stream the documents' tokens into the temporary train/val files; (counts, max id, documents)."""
    eot = enc.eot_token
    counts = {"train": 0, "val": 0}
    max_id, n_docs = 0, 0
    with open(tmp_paths["train"], "wb") as train_file, open(tmp_paths["val"], "wb") as val_file:
        handles = {"train": train_file, "val": val_file}
        while batch := list(itertools.islice(documents, 64)):
            texts = [doc.text for doc in batch]
            for doc, ids in zip(batch, enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1), strict=True):
                ids.append(eot)  # EOT closes every document, as GPT-2 was trained
                arr = np.asarray(ids, dtype=np.int64)
                max_id = max(max_id, int(arr.max()))
                if split_by_tokens:
                    cut = len(arr) - max(1, int(len(arr) * val_fraction))
                    parts = {"train": arr[:cut], "val": arr[cut:]}
                else:
                    parts = {"val" if _is_val(doc.name, val_fraction) else "train": arr}
                for split, part in parts.items():
                    handles[split].write(part.astype(TOKEN_DTYPE).tobytes())
                    counts[split] += len(part)
            n_docs += len(batch)
            progress.update(n_docs, sum(counts.values()))
        progress.update(n_docs, sum(counts.values()), final=True)
        for h in handles.values():
            h.flush()
            os.fsync(h.fileno())
    return counts, max_id, n_docs


LOCK_NAME = ".lock"


def lock_dataset(folder: Path, exclusive: bool):
    """An advisory lock on a dataset folder: shared while a loader reads it, exclusive while it is
    prepared. Returns the open lock file (closing it releases the lock), or None where the folder
    cannot hold one (read-only data). Raises DataError when the other kind is held."""
    try:
        handle = open(folder / LOCK_NAME, "a+b")
    except OSError:
        return None
    try:
        fcntl.flock(handle, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        if exclusive:
            raise DataError(f"dataset {folder} is being read by a running training job (or prepared by another "
                            "process); prepare into another --name, or stop that job first") from None
        raise DataError(f"dataset {folder} is being prepared by another process; wait for it to finish") from None
    return handle


def inputs_fingerprint(files: list[str], **settings) -> str:
    """What a prepared dataset was made from: each input's path, size and modification time, and
    the settings. The same fingerprint means preparing again would write the same files."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path in files:
        try:
            st = os.stat(path)
            digest.update(f"{os.path.abspath(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{path}\0missing\n".encode())
    return digest.hexdigest()


def already_prepared(folder: Path, fingerprint: str) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        return (meta.get("inputs_fingerprint") == fingerprint
                and (folder / "train.bin").stat().st_size == 2 * meta["train_tokens"]
                and (folder / "val.bin").stat().st_size == 2 * meta["val_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


def prepare_dataset(name: str, documents: Iterable[Document], out_root: str | Path, *, recipe: str,
                    total: int | None = None, val_fraction: float = 0.005,
                    split_by_tokens: bool = False, log: Callable[[str], None] = print,
                    fingerprint: str | None = None) -> Path:
    """Tokenise `documents` into `out_root/name/{train,val}.bin` + `meta.json`.

    Documents go whole to train or val by a hash of their name; with `split_by_tokens` (a corpus
    of few documents) each document's last `val_fraction` of tokens goes to val instead.
    Token files are streamed to disk in batches, so corpora larger than memory work.
    """
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not is_dataset_name(name):
        raise DataError(f"dataset name {name!r} must be a plain name (letters, digits, '.', '_', '-'): the "
                        "dataset is the folder of that name inside the data folder")
    out = Path(out_root) / name
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create dataset folder {out}: {e}") from None
    lock = lock_dataset(out, exclusive=True)  # not while a training job reads these files
    try:
        return _prepare_locked(name, documents, out, recipe, total, val_fraction, split_by_tokens, log, fingerprint)
    finally:
        if lock is not None:
            lock.close()


def _prepare_locked(name, documents, out, recipe, total, val_fraction, split_by_tokens, log, fingerprint) -> Path:
    (out / "meta.json").unlink(missing_ok=True)  # the folder is unfinished until meta.json returns
    enc = get_tokenizer()
    eot = enc.eot_token
    log(f"preparing dataset '{name}' ({recipe}): {f'{total:,} documents' if total else 'streaming'} -> {out}")
    paths = {split: out / f"{split}.bin" for split in ("train", "val")}
    tmp_paths = {split: p.with_suffix(".bin.tmp") for split, p in paths.items()}
    try:
        counts, max_id, n_docs = _tokenise(iter(documents), tmp_paths, enc, split_by_tokens, val_fraction,
                                           _Progress(total, log))
    except BaseException:
        for p in tmp_paths.values():
            p.unlink(missing_ok=True)
        raise
    if counts["val"] == 0 or counts["train"] == 0:
        for p in tmp_paths.values():
            p.unlink(missing_ok=True)
        empty = "val" if counts["val"] == 0 else "train"
        raise DataError(f"dataset '{name}': {n_docs} documents gave an empty {empty} split; "
                        "add documents or change --val-fraction")
    for split in paths:
        os.replace(tmp_paths[split], paths[split])
    meta = {"name": name, "recipe": recipe, "tokenizer": "gpt2", "vocab_size": enc.n_vocab,
            "eot_token": eot, "dtype": "uint16", "max_token_id": max_id, "documents": n_docs,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "inputs_fingerprint": fingerprint}
    text = json.dumps(meta, indent=2).encode()
    atomic_write(out / "meta.json", lambda f: f.write(text))
    log(f"dataset '{name}': {counts['train']:,} train tokens, {counts['val']:,} val tokens")
    return out


def prepare_recipe(recipe: str, data_dir: str | Path, *, name: str | None = None,
                   inputs: list[str] | None = None, val_fraction: float | None = None,
                   errors: str | None = None, log: Callable[[str], None] = print, force: bool = False) -> Path:
    """Run one of RECIPES; returns the dataset folder. `errors` (DECODE_ERRORS) handles input
    that is not UTF-8: strict by default, replace for the stdlib recipe (a few of the standard
    library's own test files are deliberately not UTF-8)."""
    inputs = inputs or []
    if name is not None and not is_dataset_name(name):
        raise DataError(f"--name {name!r} must be a plain name (letters, digits, '.', '_', '-'): the dataset "
                        "is the folder of that name inside --data-dir")
    errors = errors or ("replace" if recipe == "stdlib" else "strict")
    if recipe == "stdlib":
        files = text_documents(inputs) if inputs else stdlib_documents()
        default_val = 0.01
    elif recipe == "shakespeare":
        if inputs:
            files = text_documents(inputs)
        else:
            dest = Path(data_dir) / (name or recipe) / "input.txt"
            dest.parent.mkdir(parents=True, exist_ok=True)
            if not dest.exists():
                log(f"downloading {SHAKESPEARE_URL}")
                download(SHAKESPEARE_URL, dest, log, offline_hint="offline, pass --input FILE")
            files = [str(dest)]
        default_val = 0.1
    elif recipe == "text":
        if not inputs:
            raise DataError("recipe 'text' needs --input FILE_OR_GLOB (one or more)")
        files = text_documents(inputs)
        default_val = 0.01 if len(files) > 1 else 0.1
    else:
        raise DataError(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
    val_fraction = val_fraction or default_val
    folder = Path(data_dir) / (name or recipe)
    fingerprint = inputs_fingerprint(files, recipe=recipe, val_fraction=val_fraction, errors=errors)
    if not force and already_prepared(folder, fingerprint):
        log(f"dataset '{name or recipe}' is already prepared from the same inputs ({folder}); nothing to do "
            "(--force prepares it again)")
        return folder
    # Whole documents make the cleaner val split, but with fewer than ~10 expected val documents
    # chance can leave it empty or unrepresentative: then every document gives its tail instead.
    return prepare_dataset(name or recipe, file_documents(files, errors, log), data_dir, recipe=recipe,
                           total=len(files), val_fraction=val_fraction,
                           split_by_tokens=len(files) * val_fraction < 10, log=log, fingerprint=fingerprint)


# ----------------------------------------------------------------------------------------------
# Pre-tokenised FineWeb 10B: the public GPT-2 shards, downloaded rather than tokenised

FINEWEB10B_URL = "https://huggingface.co/datasets/kjj0/fineweb10B-gpt2/resolve/main/"
FINEWEB10B_TRAIN_SHARDS = 103  # of ~100M tokens each: ~10.3B tokens, ~20 GB
CHUNK_BYTES = 8 << 20


def fineweb10b_names(shards: int) -> dict[str, list[str]]:
    return {"val": ["fineweb_val_000000.bin"], "train": [f"fineweb_train_{i:06d}.bin" for i in range(1, shards + 1)]}


def prepare_fineweb10b(data_dir: str | Path, shards: int = FINEWEB10B_TRAIN_SHARDS, name: str = "fineweb10b",
                       log: Callable[[str], None] = print, base_url: str | None = None) -> Path:
    """Download the val shard and the first `shards` train shards of FineWeb 10B, pre-tokenised
    with GPT-2's BPE, into data_dir/name, and describe them in meta.json. Shards already complete
    (their header's token count matches their size) are kept; partial ones continue."""
    if not is_dataset_name(name):
        raise DataError(f"--name {name!r} must be a plain name (letters, digits, '.', '_', '-')")
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


# ----------------------------------------------------------------------------------------------
# Loading


def dataset_dir(cfg: DataConfig) -> Path:
    return Path(cfg.data_dir) / cfg.dataset


def ensure_prepared(cfg: DataConfig, log: Callable[[str], None] = print) -> Path:
    """The dataset folder for `cfg`, preparing it first when its recipe runs offline unaided."""
    folder = dataset_dir(cfg)
    if (folder / "meta.json").exists():
        return folder
    if cfg.auto_prepare and cfg.dataset in OFFLINE_RECIPES:
        return prepare_recipe(cfg.dataset, cfg.data_dir, log=log)
    if cfg.dataset in RECIPES:
        hint = f"python -m gptfast.prepare {cfg.dataset} --data-dir {cfg.data_dir}"
        if cfg.dataset == "shakespeare":
            hint += " [--input tinyshakespeare.txt]"
    else:
        hint = f"python -m gptfast.prepare text --name {cfg.dataset} --input 'FILES' --data-dir {cfg.data_dir}"
        if cfg.dataset in DOCUMENTED_ELSEWHERE:
            hint = DOCUMENTED_ELSEWHERE[cfg.dataset]
    raise DataError(f"dataset '{cfg.dataset}' is not prepared ({folder}/meta.json is missing); run: {hint}")


# Datasets that need the network; data/README.md has their recipes.
DOCUMENTED_ELSEWHERE = {
    "fineweb10b": "python -m gptfast.prepare fineweb10b --data-dir data (downloads ~20 GB of pre-tokenised "
                  "shards; --shards N for fewer, 100M tokens each)",
    "fineweb": "python data/hf_dataset.py fineweb (needs the network and `pip install datasets`; "
               "`python -m gptfast.prepare fineweb10b` downloads the same text pre-tokenised)",
    "openwebtext": "python data/hf_dataset.py openwebtext (needs the network and `pip install datasets`)",
}


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
