"""`python -m gptfast.train CONFIG [--section.key=value ...]`: train, or resume, a GPT-2 model."""

from __future__ import annotations

import sys

from gptfast.config import load_config
from gptfast.errors import run_cli
from gptfast.trainer import Trainer

USAGE = """usage: python -m gptfast.train CONFIG.toml [--section.key=value ...]

Trains the model CONFIG describes, resuming from the newest checkpoint in train.out_dir.
Overrides follow the config path, e.g. --train.max_steps=100 --train.device=cpu."""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if not argv or argv[0].startswith("--"):
        print("error: the config path comes first\n" + USAGE, file=sys.stderr)
        return 2
    return run_cli(lambda: Trainer(load_config(argv[0], argv[1:])).run())


if __name__ == "__main__":
    sys.exit(main())
