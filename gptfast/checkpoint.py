"""Checkpoints: written atomically, found by step, checked against the model they are loaded into.

A checkpoint is `out_dir/ckpt_<step>.pt`, a dict of plain tensors and Python values (model and
optimizer state, the resolved config, the step count, RNG states) that `torch.load` reads, and
beside it `ckpt_<step>.pt.sha256`, the SHA-256 of its bytes. Both are written to temporary files
in the same folder and fsynced; the checksum is renamed into place first, the checkpoint last, so
a crash at any moment leaves either the old set of checkpoints or the new one, never a torn file.
Loading verifies the checksum: a file damaged later (a bad disk, a partial copy) is reported
rather than loaded.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch

from gptfast.errors import CheckpointError, RunDirError

CKPT_PATTERN = re.compile(r"ckpt_(\d+)\.pt")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:08d}.pt"


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Finished checkpoints in `out_dir`, oldest first (temporary files are not listed)."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_PATTERN.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Call `write(file)` on a temporary sibling of `path`, fsync it, and rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class _HashingWriter:
    """A file wrapper that hashes what passes through it, so the checksum costs no second read."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def save_checkpoint(state: dict, out_dir: str | Path, step: int, keep: int) -> Path:
    """Write `state` as the checkpoint of `step` (with its checksum), then delete all but the
    newest `keep`."""
    path = checkpoint_path(out_dir, step)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        digest = writer.sha.hexdigest().encode()
        atomic_write_bytes(checksum_path(path), lambda f: f.write(digest + b"\n"))
        os.replace(tmp, path)  # last: the checkpoint exists only once its checksum does
        _fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunDirError(f"cannot write checkpoint {path}: {e}; the previous checkpoints are intact") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep]:
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
    return path


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint onto the CPU; an unreadable file is a CheckpointError, not a traceback."""
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path} holds no checkpoint (ckpt_<step>.pt)")
        path = found
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    sidecar = checksum_path(path)
    if sidecar.exists():
        expected = sidecar.read_text().strip()
        if file_sha256(path) != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match {sidecar.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # torch.load raises many types for a truncated or foreign file
        first_line = (str(e).strip().splitlines() or [""])[0]  # torch's messages run to paragraphs
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {first_line})") from None
    if not isinstance(state, dict) or not {"model", "config", "step"} <= state.keys():
        raise CheckpointError(f"{path} is not a gptfast checkpoint (missing model, config or step)")
    state["path"] = str(path)
    return state


def check_same_model(saved_model_cfg: dict, model_cfg: dict, path: str) -> None:
    """A checkpoint can only resume a run of the same architecture; name every field that differs."""
    fields = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
    diffs = [f"{k}: checkpoint {saved_model_cfg.get(k)!r}, config {model_cfg[k]!r}"
             for k in fields if saved_model_cfg.get(k) != model_cfg[k]]
    if diffs:
        raise CheckpointError(f"{path} was written for a different model ({'; '.join(diffs)}); "
                              "use another train.out_dir or --train.resume=false")
