"""The run directory: one trainer at a time, and every file in it but the checkpoints' contents.

`out_dir/` holds `config.toml` (the resolved config), `metrics.jsonl` (one JSON record per line),
the checkpoints (`gptfast.checkpoint`), `old_<n>/` (earlier runs set aside by
`--train.resume=false`) and `.lock`. The lock is an advisory `flock` held for the trainer's
lifetime: the operating system releases it when the process dies, so a `kill -9` never leaves a
directory locked, and a second trainer on the same directory stops with an error naming the first.
Every write error (a full disk, a read-only mount, a quota) becomes one RunDirError line naming the
newest checkpoint, which a write never touches.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Callable

from gptfast import checkpoint as ckpt
from gptfast.errors import RunDirError
from gptfast.files import TMP_SUFFIX, atomic_write


class RunDir:
    def __init__(self, path: str | Path, log: Callable[[str], None] = print):
        self.path = Path(path)
        self.log = log
        self._lock_file = None
        self._created = False  # acquire made the directory (abandon may remove it)

    @property
    def config_path(self) -> Path:
        return self.path / "config.toml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def write_failed(self, what: Path, error: OSError) -> RunDirError:
        """The one-line error of a failed write into the run directory, naming what is intact."""
        return RunDirError(f"cannot write {what}: {error.strerror or error}; {ckpt.intact_note(self.path)}")

    # -- ownership -------------------------------------------------------------------------------

    def acquire(self) -> None:
        """Create the directory, take its lock and prove it writable before training time is spent.
        Temporary files left by a killed trainer are removed: holding the lock, nobody else writes here."""
        try:
            self._created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            lock_file = open(self.lock_path, "a+")
        except OSError as e:
            raise RunDirError(f"train.out_dir {str(self.path)!r} cannot be written: {e.strerror or e}") from None
        try:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # held: the one failure that means another trainer
            lock_file.seek(0)
            holder = lock_file.read().strip() or "another process"
            lock_file.close()
            raise RunDirError(f"train.out_dir {str(self.path)!r} is in use by another trainer ({holder}); "
                              "wait for it to finish, or give this run another --train.out_dir") from None
        except OSError as e:  # a file system without locks (some network mounts), say
            lock_file.close()
            raise RunDirError(f"train.out_dir {str(self.path)!r} cannot be locked ({e.strerror or e}): gptfast "
                              "needs a file system with flock to keep a second trainer out") from None
        try:
            lock_file.seek(0)
            lock_file.truncate()
            lock_file.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            lock_file.flush()
            for leftover in self.path.glob(f".*{TMP_SUFFIX}"):
                leftover.unlink()
        except OSError as e:
            lock_file.close()
            raise RunDirError(f"train.out_dir {str(self.path)!r} cannot be written: {e.strerror or e}") from None
        self._lock_file = lock_file

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor releases the flock
            self._lock_file = None

    def abandon(self) -> None:
        """Release the directory of a run that failed before it started: the lock file goes too
        when it is all there is, and the directory when this run created it."""
        held = self._lock_file is not None
        self.release()
        if not held:
            return
        try:
            if [p.name for p in self.path.iterdir()] == [self.lock_path.name]:
                self.lock_path.unlink()
                if self._created:
                    self.path.rmdir()
        except OSError:
            pass  # the directory stays as it is: nothing in it was ours to remove

    # -- files -----------------------------------------------------------------------------------

    def write_sample(self, step: int, text: str) -> Path:
        """The end-of-run sample, kept as sample_<step>.txt beside the checkpoint it came from."""
        path = self.path / f"sample_{step:08d}.txt"
        data = text.encode()
        try:
            atomic_write(path, lambda f: f.write(data))
        except OSError as e:
            raise self.write_failed(path, e) from None
        return path

    def write_config(self, text: str) -> None:
        data = text.encode()
        try:
            atomic_write(self.config_path, lambda f: f.write(data))
        except OSError as e:
            raise self.write_failed(self.config_path, e) from None

    def append_metrics(self, record: dict) -> None:
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise self.write_failed(self.metrics_path, e) from None

    def read_metrics(self) -> list[dict]:
        """The records of metrics.jsonl. A torn last line (a crash during an append) is dropped
        with a warning; a damaged line elsewhere is an error naming it."""
        if not self.metrics_path.exists():
            return []
        lines = self.metrics_path.read_text(errors="replace").splitlines()
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number == len(lines):
                    self.log(f"warning: {self.metrics_path}: dropped a torn last record (line {number}), "
                             "left by a run that stopped while writing it")
                    continue
                raise RunDirError(f"{self.metrics_path}: line {number} is not a JSON record; "
                                  "repair or move the file to resume") from None
        return records

    def truncate_metrics(self, step: int) -> None:
        """Keep only records up to `step`: a resumed run writes the later steps again."""
        if not self.metrics_path.exists():
            return
        kept = "".join(json.dumps(r) + "\n" for r in self.read_metrics() if r.get("step", 0) <= step).encode()
        try:
            atomic_write(self.metrics_path, lambda f: f.write(kept))
        except OSError as e:
            raise self.write_failed(self.metrics_path, e) from None

    def set_aside(self, paths: list[Path], reason: str) -> Path | None:
        """Move `paths` into a new `old_<n>/` folder: nothing of an earlier run is deleted."""
        paths = [p for p in paths if p.exists()]
        if not paths:
            return None
        n = 1
        while (self.path / f"old_{n}").exists():
            n += 1
        keep = self.path / f"old_{n}"
        try:
            keep.mkdir()
            for path in paths:
                path.rename(keep / path.name)
        except OSError as e:
            raise self.write_failed(keep, e) from None
        self.log(f"{reason}: moved {len(paths)} files to {keep}")
        return keep

    def set_aside_previous_run(self) -> None:
        """train.resume = false starts over; an earlier run's files move to old_<n>/."""
        self.set_aside(ckpt.run_files(self.path) + [self.metrics_path], "train.resume = false")
