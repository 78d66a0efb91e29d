"""Crash-safe file writes: a temporary sibling named for this process, fsynced, renamed into place."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, IO

TMP_SUFFIX = ".tmp"


def tmp_path(path: Path) -> Path:
    """The temporary sibling `path` is written as: hidden, and named for this process, so two
    processes writing the same file never share (or delete) each other's half-written copy."""
    return path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")


def default_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Call `write(file)` on a temporary sibling of `path`, fsync it, and rename it into place: a
    crash leaves the old file or the new one, never a torn one. Errors propagate (OSError for a
    full or read-only disk); the temporary file is removed."""
    tmp = tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
