"""Errors that mean "the user's input is wrong": the CLIs print them as one line and exit 2."""

import sys
from typing import Callable


class GptfastError(Exception):
    """Base class for errors caused by bad input (config, data, checkpoint, output directory)."""


class ConfigError(GptfastError):
    """A config file or override is unreadable, has an unknown key, a wrong type or a bad value."""


class DataError(GptfastError):
    """A dataset is missing, unreadable or holds tokens the model cannot use."""


class CheckpointError(GptfastError):
    """A checkpoint is unreadable, or belongs to a different model."""


class RunDirError(GptfastError):
    """The run directory cannot be created or written."""


class PreStartProblems(GptfastError):
    """Every problem found before a run starts (device, memory fit, dataset), said together: a
    user fixes them in one go, not one per try. Printed as one `error: ...` line each."""

    def __init__(self, problems: list[GptfastError]):
        self.problems = problems
        super().__init__("\nerror: ".join(str(p) for p in problems))


class TrainingDiverged(GptfastError):
    """Too many steps in a row had a non-finite loss or gradient norm."""


def run_cli(action: Callable[[], object]) -> int:
    """Run a CLI's work: bad input becomes one `error: ...` line on stderr and exit code 2."""
    try:
        action()
    except GptfastError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
