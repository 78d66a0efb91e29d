"""Checkpoints: written atomically, found by step, marked healthy or not, checked when loaded.

A checkpoint is `out_dir/ckpt_<step>.pt`, a dict of plain tensors and Python values (model and
optimizer state, the resolved config, the step count, RNG states) that `torch.load` reads, and
beside it `ckpt_<step>.pt.sha256`, the SHA-256 of its bytes. Both are written to temporary files
in the same folder and fsynced; the checksum is renamed into place first, the checkpoint last, so
a crash at any moment leaves either the old set of checkpoints or the new one, never a torn file.
Loading verifies the checksum: a file damaged later (a bad disk, a partial copy) is reported
rather than loaded.

A checkpoint written while the run was unhealthy (a loss spike, a parameter-norm blow-up, a
non-finite step: see `gptfast.health`) has a marker file `ckpt_<step>.pt.unhealthy` beside it,
created before the checkpoint appears; a checkpoint later found to hold the weights that caused a
loss spike is marked afterwards. Rotation never deletes the newest healthy checkpoint, and a
resume starts from it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import zipfile
from pathlib import Path
from typing import Callable

import torch

from gptfast.config import ModelConfig
from gptfast.errors import CheckpointError, RunDirError
from gptfast.files import atomic_write, fsync_dir, tmp_path

CKPT_PATTERN = re.compile(r"ckpt_(\d+)\.pt")


def checkpoint_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"ckpt_{step:08d}.pt"


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def unhealthy_marker(path: Path) -> Path:
    return path.with_name(path.name + ".unhealthy")


def is_healthy(path: Path) -> bool:
    return not unhealthy_marker(path).exists()


def list_checkpoints(out_dir: str | Path, healthy_only: bool = False) -> list[Path]:
    """Finished checkpoints in `out_dir`, oldest first (temporary files are not listed)."""
    folder = Path(out_dir)
    if not folder.is_dir():
        return []
    found = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := CKPT_PATTERN.fullmatch(p.name)))
    return [p for _, p in found if not healthy_only or is_healthy(p)]


def latest_checkpoint(out_dir: str | Path, healthy_only: bool = False) -> Path | None:
    found = list_checkpoints(out_dir, healthy_only)
    return found[-1] if found else None


def checkpoint_step(path: Path) -> int:
    return int(CKPT_PATTERN.fullmatch(path.name).group(1))


def run_files(out_dir: str | Path, after_step: int = -1) -> list[Path]:
    """The checkpoints of steps after `after_step` with their sidecar files (checksum, marker)."""
    files = []
    for path in list_checkpoints(out_dir):
        if checkpoint_step(path) > after_step:
            files += [p for p in (path, checksum_path(path), unhealthy_marker(path)) if p.exists()]
    return files


def intact_note(out_dir: str | Path) -> str:
    """What a failed write leaves: said in every write error, so the user knows what to resume from."""
    newest = latest_checkpoint(out_dir, healthy_only=True)
    return f"the newest healthy checkpoint {newest} is intact" if newest else "no healthy checkpoint was written yet"


def mark_unhealthy(path: Path) -> None:
    marker = unhealthy_marker(path)
    if path.exists() and not marker.exists():
        atomic_write(marker, lambda f: f.write(b"holds the weights that the next step found unhealthy\n"))


class _HashingWriter:
    """A file wrapper that hashes what passes through it, so the checksum costs no second read.
    It keeps the OSError of a failed write: torch.save wraps it in a RuntimeError of its own."""

    def __init__(self, f):
        self.f, self.sha, self.error = f, hashlib.sha256(), None

    def write(self, data) -> int:
        self.sha.update(data)
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(state: dict, out_dir: str | Path, step: int, keep: int, healthy: bool = True) -> Path:
    """Write `state` as the checkpoint of `step` (with its checksum, and its marker when not
    healthy), then delete all but the newest `keep` and the newest healthy one. A write error
    (full disk, read-only, quota) is a RunDirError; the checkpoints already there are untouched."""
    path = checkpoint_path(out_dir, step)
    tmp = tmp_path(path)
    writer = None
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        digest = writer.sha.hexdigest().encode()
        atomic_write(checksum_path(path), lambda f: f.write(digest + b"\n"))
        if not healthy:  # before the checkpoint appears, so it is never taken for a healthy one
            atomic_write(unhealthy_marker(path), lambda f: f.write(b"written while the run was unhealthy\n"))
        os.replace(tmp, path)  # the checkpoint exists only once its checksum does
        fsync_dir(path.parent)
        if healthy:  # after: a crash in between leaves a healthy checkpoint marked, never the reverse
            unhealthy_marker(path).unlink(missing_ok=True)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else (writer.error if writer is not None else None)
        if cause is None:  # a RuntimeError that is not a failed write is a bug: keep its traceback
            raise
        raise RunDirError(f"cannot write checkpoint {path}: {cause.strerror or cause}; {intact_note(out_dir)}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    rotate(out_dir, keep)
    return path


def rotate(out_dir: str | Path, keep: int) -> None:
    """Delete all checkpoints but the newest `keep` and the newest healthy one."""
    found = list_checkpoints(out_dir)
    newest_healthy = latest_checkpoint(out_dir, healthy_only=True)
    for old in found[:-keep]:
        if old == newest_healthy:
            continue
        old.unlink(missing_ok=True)
        checksum_path(old).unlink(missing_ok=True)
        unhealthy_marker(old).unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            sha.update(chunk)
    return sha.hexdigest()


def load_checkpoint(path: str | Path, log: Callable[[str], None] = print, bless: bool = False) -> dict:
    """Read a checkpoint onto the CPU; an unreadable file is a CheckpointError, not a traceback.
    A directory loads its newest healthy checkpoint, chosen again once if a running trainer's
    rotation removes it while it is read. A missing checksum file is a warning, and
    what can be verified without it is: the zip's own CRCs and finite weights (damage is a
    CheckpointError, so a resume falls back to the previous checkpoint). With `bless` (the caller
    holds the run directory: the trainer) its checksum is then written so later loads verify it;
    readers (sample, export, eval) never write into a run directory."""
    path = Path(path)
    if not path.is_dir():
        return _load_file(path, log, bless)
    for attempt in range(2):
        found = latest_checkpoint(path, healthy_only=True)
        if found is None:
            newest = latest_checkpoint(path)
            raise CheckpointError(f"{path} holds no checkpoint (ckpt_<step>.pt)" if newest is None else
                                  f"{path} holds no healthy checkpoint (the newest, {newest.name}, is marked "
                                  "unhealthy); name a checkpoint file to use it anyway")
        try:
            return _load_file(found, log, bless, vanished_ok=attempt == 0)
        except _Vanished:
            log(f"{found.name} was rotated away while it was read; choosing again")
    raise AssertionError("unreachable")


class _Vanished(Exception):
    """The checkpoint file went away while it was read (a trainer's rotation)."""


def _load_file(path: Path, log: Callable[[str], None], bless: bool, vanished_ok: bool = False) -> dict:
    try:
        return _read_checkpoint(path, log, bless)
    except FileNotFoundError:
        if vanished_ok:
            raise _Vanished from None
        raise CheckpointError(f"checkpoint {path} does not exist") from None


def _read_checkpoint(path: Path, log: Callable[[str], None], bless: bool) -> dict:
    if not path.exists():
        raise FileNotFoundError(path)
    sidecar = checksum_path(path)
    digest = file_sha256(path)
    expected = sidecar.read_text().strip() if sidecar.exists() else None
    if expected is not None and digest != expected:
        raise CheckpointError(f"checkpoint {path} is corrupt: its SHA-256 does not match {sidecar.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torch.load raises many types for a truncated or foreign file
        first_line = (str(e).strip().splitlines() or [""])[0]  # torch's messages run to paragraphs
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {first_line})") from None
    if not isinstance(state, dict) or not {"model", "config", "step"} <= state.keys():
        raise CheckpointError(f"{path} is not a gptfast checkpoint (missing model, config or step)")
    if expected is None:
        verify_unchecksummed(path, state)
        log(f"warning: {path} has no {sidecar.name}, so its checksum could not be verified; its zip CRCs and "
            "weights were checked" + (", and its checksum is now written beside it" if bless else ""))
        if bless:
            try:
                atomic_write(sidecar, lambda f: f.write(digest.encode() + b"\n"))
            except OSError as e:
                log(f"warning: could not write {sidecar}: {e.strerror or e}")
    state["path"] = str(path)
    return state


def verify_unchecksummed(path: Path, state: dict) -> None:
    """What a checkpoint without its checksum can still be checked for: every zip member's CRC
    (a flipped bit) and finite model weights (a damaged tensor saved whole)."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged ({e})") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {bad} fails its CRC")
    model = state["model"] if isinstance(state.get("model"), dict) else {}
    for name, tensor in model.items():
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {path} has no checksum and its weight {name} holds non-finite values: "
                                  "damaged, not resumed from")


def same_shapes(saved: dict, current: dict) -> bool:
    """Whether a checkpoint's model tensors have this model's names and shapes."""
    return saved.keys() == current.keys() and all(
        not torch.is_tensor(v) or v.shape == current[k].shape for k, v in saved.items())


def check_same_model(saved_model_cfg: dict, model_cfg: dict, path: str) -> None:
    """A checkpoint can only resume a run of the same architecture; name every field that differs."""
    # A checkpoint written before a field existed has that field's default (GPT-2's switches).
    defaults = dataclasses.asdict(ModelConfig())
    fields = [k for k in defaults if k not in ("dropout", "zero_init_proj")]  # those two shape no weights
    saved, current = ({k: cfg.get(k, defaults[k]) for k in fields} for cfg in (saved_model_cfg, model_cfg))
    diffs = [f"{k}: checkpoint {saved[k]!r}, config {current[k]!r}" for k in fields if saved[k] != current[k]]
    if diffs:
        raise CheckpointError(f"{path} was written for a different model ({'; '.join(diffs)}); "
                              "use another train.out_dir or --train.resume=false")
