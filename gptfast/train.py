"""`python -m gptfast.train CONFIG [--section.key=value ...]`: train, or resume, a GPT-2 model.

SIGINT (Ctrl-C), SIGTERM or SIGHUP (a closed terminal or ssh session): the current optimizer step
finishes, a checkpoint is written, and the process exits 0 with the command that resumes. A
second SIGINT quits at once.
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import typing

from gptfast.configfile import describe_keys, load_config
from gptfast.errors import run_cli

if typing.TYPE_CHECKING:
    from gptfast.trainer import Trainer

USAGE = """usage: python -m gptfast.train CONFIG.toml [--section.key=value ...]

Trains the model CONFIG describes, resuming from the newest checkpoint in train.out_dir.
Overrides follow the config path, e.g. --train.max_steps=100 --train.device=cpu."""


def full_help() -> str:
    return (USAGE + "\n\nEvery key, with its default (a config file sets them under [section]; the command "
            "line overrides the file; values are TOML, bare words are strings):\n\n" + describe_keys())


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def stop_on_signals(trainer: Trainer):
    """While training, SIGINT / SIGTERM / SIGHUP ask the trainer to stop after the current step."""

    def request_stop(signum, frame):
        if trainer.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: quit now
        trainer.stop_requested = True
        print(f"\n{signal.Signals(signum).name}: finishing step {trainer.step + 1}, then writing a checkpoint "
              "(Ctrl-C again to quit at once)", flush=True)

    previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train(argv: list[str]) -> None:
    import torch  # here, not at the top: --help and argument errors answer without loading torch

    from gptfast.trainer import Trainer

    try:
        trainer = Trainer(load_config(argv[0], argv[1:]))
        with stop_on_signals(trainer):
            result = trainer.run()
    finally:
        if torch.distributed.is_initialized():  # under torchrun
            torch.distributed.destroy_process_group()
    if result.stopped and trainer.dist.main:
        print(f"stopped at step {result.step}; checkpoint {result.checkpoint}\n"
              f"resume with: python -m gptfast.train {shlex.join(argv)}", flush=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(full_help())
        return 0
    if not argv or argv[0].startswith("--"):
        print("error: the config path comes first\n" + USAGE, file=sys.stderr)
        return 2
    try:
        return run_cli(lambda: train(argv))
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
