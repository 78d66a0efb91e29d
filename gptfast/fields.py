"""Config fields: a one-line doc on each, choices checked with a suggestion, values written as TOML."""

from __future__ import annotations

import difflib
from dataclasses import field
from typing import Callable

# A section's validate() reports an impossible value through fail(key, why), which raises.
Fail = Callable[[str, str], None]


def doc_field(default, doc: str):
    """A dataclass field carrying a one-line doc, quoted in error messages and in --help."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


def suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(choices)}"


def check_choice(fail: Fail, key: str, value: str, choices) -> None:
    if value not in choices:
        fail(key, f"expected one of {', '.join(choices)}, got {value!r}{suggest(value, choices)}")


TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):  # a TOML basic string: quote, backslash and control characters escaped
        return '"' + "".join(TOML_ESCAPES.get(c) or (f"\\u{ord(c):04X}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
                             for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")
