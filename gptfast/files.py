"""Files: crash-safe writes (a temporary sibling named for this process, fsynced, renamed into
place) and the one downloader (resumable), which datasets, HellaSwag and the hub share."""

from __future__ import annotations

import fcntl
import os
import threading
import time
import urllib.request
from pathlib import Path
from typing import Callable, IO

from gptfast.errors import DataError

TMP_SUFFIX = ".tmp"
CHUNK_BYTES = 8 << 20  # a download's read size


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


def download(url: str, dest: Path, log: Callable[[str], None] = print, offline_hint: str = "",
             stop: threading.Event | None = None) -> bool:
    """Download `url` to `dest` through `dest.part`, continuing a partial `.part` with an HTTP Range
    request (from the start when the server ignores it); a line of progress every 10 s. A failure
    is a DataError naming the URL, the kept partial file and `offline_hint`. When `stop` is set
    between two reads the partial file is kept for the next try and False returned; True: done."""
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
                    if stop is not None and stop.is_set():
                        return False
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
    return True


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
