"""Where a run's metrics go ([log] backends): metrics.jsonl, TensorBoard event files, Weights & Biases.

Every record the trainer makes (a dict with a "step": the logged training steps, evaluations,
skipped steps, the end-of-run summary) goes to every backend. Only rank 0 logs. TensorBoard and
wandb are optional extras; a config that names one that is not installed is rejected before the
run directory is touched (`check_backends`), with the command that installs it.
"""

from __future__ import annotations

import importlib.util
import math
import secrets
import threading
from pathlib import Path

from gptfast.config import Config, LogConfig
from gptfast.configfile import to_toml
from gptfast.errors import ConfigError
from gptfast.rundir import RunDir

# backend -> (module it needs, the extra that installs it)
REQUIREMENTS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


def check_backends(cfg: LogConfig) -> None:
    """ConfigError naming the extra to install when a backend's package is missing."""
    for backend in cfg.backends:
        if backend in REQUIREMENTS:
            module, extra = REQUIREMENTS[backend]
            if importlib.util.find_spec(module) is None:
                raise ConfigError(f"log.backends: {backend} needs the {module} package, which is not installed: "
                                  f"pip install -e \".[{extra}]\" (or drop {backend!r} from log.backends)")


def scalars(record: dict) -> dict[str, float]:
    """The record's finite numbers, under TensorBoard/wandb names: loss -> train/loss, val_loss -> val/loss."""
    out = {}
    for key, value in record.items():
        if key == "step" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if not math.isfinite(value):
            continue
        if key == "val_loss":
            name = "val/loss"
        elif key.startswith("hellaswag_"):
            name = "eval/" + key
        else:
            name = key.replace("val_", "val/") if key.startswith("val_") else f"train/{key}"
        out[name] = float(value)
    return out


class JsonlLogger:
    """metrics.jsonl in the run directory: one JSON object a line (what `gptfast.plot` reads)."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir

    def log(self, record: dict) -> None:
        self.run_dir.append_metrics(record)

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """Event files under out_dir/tensorboard, one scalar per metric against the optimizer step. A
    failed write (a full disk) is the run directory's one-line error: TensorBoard's writer thread
    re-raises it in this one, so that thread's own traceback is not printed as well."""

    def __init__(self, run_dir: RunDir, cfg: Config):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir, self.path = run_dir, run_dir.path / "tensorboard"
        self._previous_hook = threading.excepthook
        threading.excepthook = self._thread_failed
        self.writer = SummaryWriter(log_dir=str(self.path))
        self._write(lambda: self.writer.add_text("config", "```toml\n" + to_toml(cfg) + "\n```", 0))

    def _thread_failed(self, args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return  # said by the next write or flush in this thread, as one line
        self._previous_hook(args)

    def _write(self, action) -> None:
        try:
            action()
        except OSError as e:
            raise self.run_dir.write_failed(self.path, e) from None

    def log(self, record: dict) -> None:
        step = record.get("step", 0)
        summary = record.get("event") == "summary"

        def write():
            for name, value in scalars(record).items():
                self.writer.add_scalar("summary/" + name.split("/", 1)[-1] if summary else name, value, step)
            self.writer.flush()

        self._write(write)

    def close(self) -> None:
        try:
            self._write(self.writer.close)
        finally:
            threading.excepthook = self._previous_hook


class WandbLogger:
    """A wandb run in out_dir/wandb; its id is kept in the run directory so a resumed run continues
    the same wandb run."""

    def __init__(self, out_dir: Path, cfg: Config):
        import wandb

        id_file = out_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(8)
        self.run = wandb.init(project=cfg.log.wandb_project, name=cfg.log.wandb_run_name or out_dir.resolve().name,
                              id=run_id, resume="allow", dir=str(out_dir), config=cfg.to_dict(),
                              mode=cfg.log.wandb_mode or None)
        if not id_file.exists():
            from gptfast.files import atomic_write

            atomic_write(id_file, lambda f: f.write(run_id.encode()))

    def log(self, record: dict) -> None:
        values = scalars(record)
        if record.get("event") == "summary":
            self.run.summary.update({name.split("/", 1)[-1]: v for name, v in values.items()})
        elif values:
            self.run.log(values, step=record.get("step", 0))

    def close(self) -> None:
        self.run.finish()


class Loggers:
    """Every configured backend behind one `log(record)`."""

    def __init__(self, cfg: Config, run_dir: RunDir, enabled: bool = True):
        """The backends' packages were checked before the run started (check_backends)."""
        self.backends = []
        for name in cfg.log.backends if enabled else ():
            if name == "jsonl":
                self.backends.append(JsonlLogger(run_dir))
            elif name == "tensorboard":
                self.backends.append(TensorBoardLogger(run_dir, cfg))
            elif name == "wandb":
                self.backends.append(WandbLogger(run_dir.path, cfg))

    def log(self, record: dict) -> None:
        for backend in self.backends:
            backend.log(record)

    def close(self) -> None:
        """Close every backend, even after one fails; then raise the first failure."""
        failures = []
        for backend in self.backends:
            try:
                backend.close()
            except Exception as e:
                failures.append(e)
        self.backends = []
        if failures:
            raise failures[0]
