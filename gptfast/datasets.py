"""Making datasets: tokenise text into uint16 token files, or download pre-tokenised shards.

Recipes (`python -m gptfast.prepare RECIPE`):
- `stdlib`: the Python standard library's own source files on this machine; no download.
- `shakespeare`: tiny-shakespeare, downloaded, or read from `--input FILE` offline.
- `text`: any local text files or globs (`--input 'notes/**/*.md' --name notes`).
- `fineweb10b`: the public GPT-2 shards of FineWeb 10B, downloaded (`gptfast.fineweb`).
The folder format they write is `gptfast.loader`'s.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import os
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from gptfast.config import DataConfig, dataset_name_problem
from gptfast.errors import DataError
from gptfast.files import atomic_write, download, lock_dataset
from gptfast.tokenizer import TOKEN_DTYPE, get_tokenizer

# The recipes; those that need no arguments and no network let a config naming them prepare its
# dataset on its own.
RECIPES = ("stdlib", "shakespeare", "text")
OFFLINE_RECIPES = ("stdlib",)
# How input that is not UTF-8 is handled when a corpus is read.
DECODE_ERRORS = ("strict", "replace")
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


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
    if problem := dataset_name_problem(name):
        raise DataError(f"dataset name: {problem}")
    out = Path(out_root) / name
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create dataset folder {out}: {e}") from None
    lock = lock_dataset(out, exclusive=True)  # not while a training job reads these files
    try:
        return _prepare_locked(name, documents, out, recipe, total, val_fraction, split_by_tokens, log, fingerprint)
    except OSError as e:  # a full disk, say: the new files are gone, an earlier dataset is as it was
        raise DataError(f"preparing dataset '{name}' in {out} failed: {e.strerror or e}; "
                        + ("nothing was kept" if created else "the dataset there is as it was")) from None
    finally:
        if lock is not None:
            lock.close()
        if created and not (out / "meta.json").exists():  # a failed first prepare leaves no folder behind
            shutil.rmtree(out, ignore_errors=True)


def _prepare_locked(name, documents, out, recipe, total, val_fraction, split_by_tokens, log, fingerprint) -> Path:
    """Tokenise into temporary files beside the dataset; an earlier dataset stays whole and
    readable until the new files replace it (meta.json last: its token counts tie the files to
    it, so a kill between the renames is reported by the loader, never read silently)."""
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
    meta = {"name": name, "recipe": recipe, "tokenizer": "gpt2", "vocab_size": enc.n_vocab,
            "eot_token": eot, "dtype": "uint16", "max_token_id": max_id, "documents": n_docs,
            "train_tokens": counts["train"], "val_tokens": counts["val"], "inputs_fingerprint": fingerprint}
    text = json.dumps(meta, indent=2).encode()
    try:
        for split in paths:
            os.replace(tmp_paths[split], paths[split])
    finally:
        for p in tmp_paths.values():
            p.unlink(missing_ok=True)
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
    if name is not None and (problem := dataset_name_problem(name)):
        raise DataError(f"--name: {problem}")
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


def dataset_dir(cfg: DataConfig) -> Path:
    return Path(cfg.data_dir) / cfg.dataset


def ensure_prepared(cfg: DataConfig, log: Callable[[str], None] = print) -> Path:
    """The dataset folder for `cfg`, preparing it first when its recipe runs unaided (offline
    recipes; fineweb10b's val shard and first train shard, the rest fetched as the run needs them)."""
    folder = dataset_dir(cfg)
    if (folder / "meta.json").exists():
        return folder
    if problem := missing_dataset_problem(cfg):
        raise DataError(problem)
    if cfg.dataset == "fineweb10b":
        from gptfast.fineweb import start_fineweb10b

        return start_fineweb10b(cfg.data_dir, log=log)
    return prepare_recipe(cfg.dataset, cfg.data_dir, log=log)


def missing_dataset_problem(cfg: DataConfig) -> str | None:
    """Why `cfg`'s dataset cannot be had without the user's help, or None: it is prepared, or
    data.auto_prepare prepares it (an offline recipe, or fineweb10b's shards fetched)."""
    folder = dataset_dir(cfg)
    if (folder / "meta.json").exists() or (cfg.auto_prepare and cfg.dataset in OFFLINE_RECIPES + ("fineweb10b",)):
        return None
    if cfg.dataset in RECIPES:
        hint = f"python -m gptfast.prepare {cfg.dataset} --data-dir {cfg.data_dir}"
        if cfg.dataset == "shakespeare":
            hint += " [--input tinyshakespeare.txt]"
    else:
        hint = f"python -m gptfast.prepare text --name {cfg.dataset} --input 'FILES' --data-dir {cfg.data_dir}"
        if cfg.dataset in DOCUMENTED_ELSEWHERE:
            hint = DOCUMENTED_ELSEWHERE[cfg.dataset]
    return f"dataset '{cfg.dataset}' is not prepared ({folder}/meta.json is missing); run: {hint}"


# Datasets that need the network; data/README.md has their recipes.
DOCUMENTED_ELSEWHERE = {
    "fineweb10b": "python -m gptfast.prepare fineweb10b --data-dir data (downloads ~20 GB of pre-tokenised "
                  "shards; --shards N for fewer, 100M tokens each)",
    "fineweb": "python data/hf_dataset.py fineweb (needs the network and `pip install datasets`; "
               "`python -m gptfast.prepare fineweb10b` downloads the same text pre-tokenised)",
    "openwebtext": "python data/hf_dataset.py openwebtext (needs the network and `pip install datasets`)",
}
