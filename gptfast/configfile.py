"""Config files and the command line: strict TOML loading, `--section.key=value` overrides, the
resolved config written back as TOML, the keys described for --help, and what changed on resume.

Precedence is CLI > TOML > the defaults of `gptfast.config`'s dataclasses. Unknown keys, wrong
types and impossible values raise `ConfigError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

from gptfast.arch import with_arch_defaults
from gptfast.config import RENAMED_SECTIONS, Config
from gptfast.fields import suggest, toml_value
from gptfast.errors import ConfigError

SECTION_TYPES: dict[str, type] = typing.get_type_hints(Config)
SECTIONS = tuple(SECTION_TYPES)


def _shown(name: str) -> str:
    """A user's section or key name as an error message quotes it: as typed when it is a plain
    name, else repr (a newline in a name must not split the one-line error)."""
    return name if name.isidentifier() else repr(name)


def _type_name(tp) -> str:
    if typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,):
        return f"a list of {_type_name(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    if typing.get_origin(tp) is tuple:
        return "a list of " + ", ".join(t.__name__ for t in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _coerce(value, tp, where: str):
    """Check `value` against the annotated type `tp`; ints are accepted where floats are expected."""
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif tp is str:
        ok = isinstance(value, str)
    elif typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,):  # tuple[X, ...]
        if isinstance(value, str):  # --log.backends=jsonl,tensorboard from the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, typing.get_args(tp)[0], where) for v in value)
    elif typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            items = [_coerce(v, t, where) for v, t in zip(value, args, strict=True)]
            return tuple(items)
    else:  # pragma: no cover - a field type this loader does not know is a programming error
        raise TypeError(f"unsupported config type {tp}")
    if not ok:
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def _section_from_dict(cls, values: dict, where: str):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            elsewhere = [name for name, other in SECTION_TYPES.items()
                         if other is not cls and key in {f.name for f in dataclasses.fields(other)}]
            if elsewhere:  # the right key in the wrong section: name the section it lives in
                raise ConfigError(f"{where}{_shown(key)}: unknown key here; it is a key of [{elsewhere[0]}]: "
                                  f"{elsewhere[0]}.{key}")
            raise ConfigError(f"{where}{_shown(key)}: unknown key{suggest(key, names)}")
        doc = cls.__dataclass_fields__[key].metadata.get("doc", "")
        try:
            kwargs[key] = _coerce(value, hints[key], f"{where}{key}")
        except ConfigError as e:
            raise ConfigError(f"{e} ({doc})") from None
    return cls(**kwargs)


def config_from_dict(raw: dict, source: str = "<config>") -> Config:
    """Build and validate a Config from a nested dict (a parsed TOML document)."""
    sections = {}
    for name, values in raw.items():
        if name in RENAMED_SECTIONS:
            new = RENAMED_SECTIONS[name]
            raise ConfigError(f"{source}: [{name}]: this section is now [{new}] (same keys); rename it")
        if name not in SECTIONS:
            raise ConfigError(f"{source}: [{_shown(name)}]: unknown section{suggest(name, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {name}: expected a [{name}] table, got {values!r}")
        if name == "model":  # the arch's switch defaults, then the file's
            values = with_arch_defaults(values)
        sections[name] = _section_from_dict(SECTION_TYPES[name], values, f"{source}: {name}.")
    cfg = Config(**sections)
    cfg.validate(source)
    return cfg


# On resume, a change to one of these changes the training trajectory (the data windows, the batch,
# the dropout masks), so it is refused unless train.allow_config_change is set; the architecture is
# checked separately (a checkpoint of another model cannot load at all). Any other change is logged.
TRAJECTORY_KEYS = ("train.seed", "train.micro_batch_size", "train.grad_accum_steps", "data.dataset",
                   "model.dropout", "optim.name")
# Settings that say how to start this process, not what the run is: never reported as changes.
START_KEYS = ("train.resume", "train.allow_config_change")


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(trajectory changes, other changes) between a checkpoint's config dict and this run's, each
    as "section.key: old -> new"."""
    trajectory, other = [], []
    for section, values in current.items():
        for key, new in values.items():
            name = f"{section}.{key}"
            old = saved.get(section, {}).get(key, new)
            if isinstance(old, list):
                old = tuple(old)
            if old == (tuple(new) if isinstance(new, list) else new) or name in START_KEYS:
                continue
            (trajectory if name in TRAJECTORY_KEYS else other).append(f"{name}: {old!r} -> {new!r}")
    return trajectory, other


def parse_override(arg: str, source: str = "command line") -> tuple[str, str, object]:
    """`--section.key=value` -> (section, key, value); the value is read as TOML, else as a string."""
    if not arg.startswith("--") or "=" not in arg or "." not in arg.split("=", 1)[0]:
        raise ConfigError(f"{source}: {arg!r}: expected --section.key=value, e.g. --train.max_steps=100")
    dotted, text = arg[2:].split("=", 1)
    section, _, key = dotted.partition(".")
    if not section or not key or "." in key:
        raise ConfigError(f"{source}: {arg!r}: expected --section.key=value")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # a bare word such as `cpu` or `12GiB` is a string
    return section, key, value


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a TOML config (or the defaults when `path` is None) and apply CLI overrides."""
    raw: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{source}: config file not found") from None
        except IsADirectoryError:
            raise ConfigError(f"{source}: is a directory, not a config file") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: cannot read config: {e}") from None
    # Validate the file on its own first, so an error names the file rather than an override.
    config_from_dict(raw, source)
    for arg in overrides:
        section, key, value = parse_override(arg)
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{source}: {section}: expected a [{section}] table")
        raw.setdefault(section, {})[key] = value
    return config_from_dict(raw, f"{source} (with command-line overrides)" if overrides else source)


def describe_keys(width: int = 100) -> str:
    """Every config key as `--section.key=DEFAULT  doc`, section by section: the train CLI's help,
    generated from the dataclasses' field docs so it cannot fall behind them."""
    import textwrap

    lines = []
    for section, cls in SECTION_TYPES.items():
        lines.append(f"[{section}]")
        defaults = dataclasses.asdict(cls())
        for f in dataclasses.fields(cls):
            head = f"  --{section}.{f.name}={toml_value(defaults[f.name])}"
            doc = f.metadata.get("doc", "")
            wrapped = textwrap.wrap(doc, width - 8) or [""]
            lines.append(head)
            lines.extend(f"        {part}" for part in wrapped)
    return "\n".join(lines)


def to_toml(cfg: Config) -> str:
    """The resolved config as a TOML document that `load_config` reads back to an equal Config."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
