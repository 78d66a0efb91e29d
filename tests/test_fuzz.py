"""Fuzzed configs and overrides: every input is a run or one clear error line, never a traceback.
Needs hypothesis (the test extra); only this file skips without it."""

import tomllib

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is in the test extra: pip install -e '.[test]'")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import tiny_overrides  # noqa: E402
from gptfast.fields import toml_value  # noqa: E402
from gptfast.configfile import SECTION_TYPES, load_config  # noqa: E402
from gptfast.errors import ConfigError, GptfastError  # noqa: E402
from gptfast.trainer import Trainer  # noqa: E402

KEYS = [f"{section}.{f}" for section, cls in SECTION_TYPES.items() for f in cls.__dataclass_fields__]
scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.text(max_size=12), st.lists(st.floats(-2, 2), max_size=3))
names = st.one_of(st.sampled_from(KEYS), st.text(min_size=1, max_size=10))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=st.dictionaries(st.one_of(st.sampled_from(list(SECTION_TYPES)), st.text(min_size=1, max_size=8)),
                           st.one_of(st.dictionaries(names.map(lambda k: k.split(".")[-1]), scalars, max_size=4),
                                     scalars), max_size=4))
def test_fuzzed_toml_never_tracebacks(tmp_path, doc):
    lines = []
    for section, values in doc.items():
        if isinstance(values, dict):
            lines.append(f"[{toml_value(section) if not section.isidentifier() else section}]")
            lines += [f"{toml_value(k)} = {toml_value(v)}" for k, v in values.items()]
        else:
            lines.insert(0, f"{toml_value(section)} = {toml_value(values)}")
    path = tmp_path / "fuzz.toml"
    path.write_text("\n".join(lines) + "\n")
    try:
        tomllib.loads(path.read_text())
        valid_toml = True
    except tomllib.TOMLDecodeError:
        valid_toml = False
    try:
        load_config(path)
    except ConfigError as e:
        assert str(e).startswith(str(path)) and "\n" not in str(e)
        assert valid_toml or "not valid TOML" in str(e)  # an invalid document is reported as such
    else:
        assert valid_toml


@settings(max_examples=300, deadline=None)
@given(args=st.lists(st.one_of(st.builds(lambda k, v: f"--{k}={v}", names, st.text(max_size=10)),
                               st.text(max_size=16)), max_size=4))
def test_fuzzed_overrides_never_traceback(args):
    try:
        load_config(None, args)
    except ConfigError as e:
        assert "\n" not in str(e)


# Values that pass type checks but can break a run later: huge sizes, non-finite floats, negative
# seeds, and ordinary ones. The trainer is built from each (no training step is run).
run_values = st.one_of(st.integers(-1, 8), st.integers(-3, 70), st.sampled_from([0, 1, 2**31, 2**40, 10**12, -2**63]),
                       st.floats(allow_nan=True, allow_infinity=True), st.booleans())
run_keys = st.sampled_from([k for k in KEYS if k.split(".")[0] in ("model", "optim", "train", "recompute")
                            and k not in ("train.out_dir", "train.device", "train.init_from", "train.compile")])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(run_keys, run_values, min_size=1, max_size=2))
def test_fuzzed_values_build_a_trainer_or_one_error_line(data_dir, tmp_path_factory, changes):
    """What passes validation must build; what cannot run must be refused with one line, before
    anything is written."""
    out = tmp_path_factory.mktemp("fuzz") / "run"
    overrides = tiny_overrides(data_dir, out) + [f"--{k}={toml_value(v)}" for k, v in changes.items()]
    try:
        cfg = load_config(None, overrides)
    except ConfigError as e:
        assert "\n" not in str(e)
        hypothesis.event("refused by the config")
        return
    try:
        trainer = Trainer(cfg, log=lambda _: None)
    except GptfastError as e:
        assert "\n" not in str(e)
        assert not (out / "config.toml").exists()
        hypothesis.event(f"refused by the trainer: {type(e).__name__}")
        return
    trainer.close()
    assert (out / "config.toml").exists()
    hypothesis.event("built")


@given(hypothesis.strategies.text(), hypothesis.strategies.lists(hypothesis.strategies.text(max_size=5), max_size=3))
@settings(max_examples=300, deadline=None)
def test_every_string_the_project_writes_as_toml_reads_back_equal(text, texts):
    """Paths with quotes, backslashes, newlines, tabs or other control characters (an out_dir as
    a user may name it) survive config.toml."""
    import tomllib

    from gptfast.fields import toml_value

    assert tomllib.loads(f"a = {toml_value(text)}\nb = {toml_value(texts)}") == {"a": text, "b": texts}
