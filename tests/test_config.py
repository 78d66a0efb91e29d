import dataclasses
import tomllib
from pathlib import Path

import pytest

from gptfast.config import Config, parse_bytes
from gptfast.configfile import config_from_dict, load_config, parse_override, to_toml
from gptfast.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.toml"))


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def error_of(tmp_path, text: str, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    return str(e.value)


def test_defaults_are_gpt2_small():
    cfg = load_config(None)
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd) == (12, 12, 768)
    assert cfg.model.padded_vocab_size == 50304 and cfg.model.head_dim == 64
    assert cfg.tokens_per_step == 8 * 64 * 1024


def test_typo_names_file_key_and_suggestion(tmp_path):
    msg = error_of(tmp_path, "[model]\nn_layr = 4\n")
    assert "run.toml" in msg and "model.n_layr" in msg and "did you mean 'n_layer'" in msg


def test_a_key_in_the_wrong_section_names_its_section(tmp_path):
    msg = error_of(tmp_path, "[train]\nlr = 1e-3\n")
    assert "run.toml" in msg and "train.lr" in msg and "it is a key of [optim]: optim.lr" in msg


def test_unknown_section_suggests(tmp_path):
    msg = error_of(tmp_path, "[optimizer]\nlr = 1.0\n")
    assert "[optimizer]" in msg and "did you mean 'optim'" in msg


@pytest.mark.parametrize("text, key, expected", [
    ('[model]\nn_layer = "4"\n', "model.n_layer", "an integer"),
    ("[model]\nn_layer = 4.5\n", "model.n_layer", "an integer"),
    ("[model]\nn_layer = true\n", "model.n_layer", "an integer"),
    ('[optim]\nlr = "fast"\n', "optim.lr", "a number"),
    ("[train]\ncompile = 1\n", "train.compile", "true or false"),
    ("[optim]\nbetas = [0.9]\n", "optim.betas", "a list of float, float"),
    ("[train]\nout_dir = 3\n", "train.out_dir", "a string"),
    ('[kernels]\nadamw = "yes"\n', "kernels.adamw", "true or false"),
])
def test_wrong_type_names_key_and_expected_type(tmp_path, text, key, expected):
    msg = error_of(tmp_path, text)
    assert key in msg and expected in msg and "run.toml" in msg


def test_int_accepted_where_float_expected(tmp_path):
    cfg = load_config(write(tmp_path, "[optim]\nlr = 1\nmin_lr = 0\n"))
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize("text, key, why", [
    ("[model]\nn_embd = 100\nn_head = 12\n", "model.n_embd", "not divisible by model.n_head"),
    ("[model]\nn_layer = 0\n", "model.n_layer", "must be positive"),
    ("[model]\nblock_size = -8\n", "model.block_size", "must be positive"),
    ("[model]\ndropout = 1.0\n", "model.dropout", "[0, 1)"),
    ("[train]\nmicro_batch_size = 0\n", "train.micro_batch_size", "must be positive"),
    ('[train]\ndtype = "fp8"\n', "train.dtype", "bfloat16, float16, float32"),
    ('[train]\ndevice = "tpu"\n', "train.device", "auto, cpu, cuda or cuda:N"),
    ('[train]\ncompile_scope = "block"\n', "train.compile_scope", "did you mean 'blocks'"),
    ("[optim]\nmin_lr = 0.1\nlr = 0.01\n", "optim.min_lr", "must be in [0, optim.lr"),
    ("[optim]\nbetas = [0.9, 1.5]\n", "optim.betas", "[0, 1)"),
])
def test_impossible_values(tmp_path, text, key, why):
    msg = error_of(tmp_path, text)
    assert key in msg and why in msg


def test_bad_toml_and_missing_file(tmp_path):
    assert "not valid TOML" in error_of(tmp_path, "[model\n")
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "absent.toml")


def test_section_must_be_a_table(tmp_path):
    assert "expected a [model] table" in error_of(tmp_path, "model = 3\n")


def test_overrides_beat_toml(tmp_path):
    path = write(tmp_path, "[train]\nmax_steps = 10\ndevice = \"cuda\"\n")
    cfg = load_config(path, ["--train.max_steps=20", "--train.device=cpu", "--optim.betas=[0.8, 0.9]",
                             "--train.out_dir=runs/x y", "--model.bias=false"])
    assert cfg.train.max_steps == 20 and cfg.train.device == "cpu"
    assert cfg.optim.betas == (0.8, 0.9) and cfg.train.out_dir == "runs/x y" and cfg.model.bias is False


@pytest.mark.parametrize("arg", ["train.max_steps=3", "--train=3", "--max_steps", "--a.b.c=1", "--.x=1"])
def test_malformed_override(arg):
    with pytest.raises(ConfigError, match="--section.key=value"):
        parse_override(arg)


def test_override_errors_name_the_key(tmp_path):
    msg = error_of(tmp_path, "", ["--train.max_stpes=5"])
    assert "train.max_stpes" in msg and "did you mean 'max_steps'" in msg and "command-line" in msg
    msg = error_of(tmp_path, "", ["--train.max_steps=abc"])
    assert "train.max_steps" in msg and "an integer" in msg


def test_toml_round_trip():
    cfg = load_config(None, ["--model.n_layer=3", "--optim.betas=[0.5, 0.6]", "--train.out_dir=a\"b\\c"])
    assert config_from_dict(tomllib.loads(to_toml(cfg))) == cfg


def test_a_run_directory_named_with_a_newline_and_a_quote_writes_a_config_that_reads_back(tiny_config, tmp_path):
    from gptfast.trainer import Trainer

    out = tmp_path / 'odd "run"\nname\ttab'
    cfg = tiny_config({"train.max_steps": 1, "train.checkpoint_interval": 1})
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(out)))
    Trainer(cfg, log=lambda _: None).run()
    written = config_from_dict(tomllib.loads((out / "config.toml").read_text()))
    assert written.train.out_dir == str(out) and written.model == cfg.model


def test_shipped_configs_load():
    assert {p.name for p in CONFIGS} >= {"cpu_smoke.toml", "small_4070.toml", "mid_4070.toml", "medium_4070.toml"}
    for path in CONFIGS:
        cfg = load_config(path)
        assert isinstance(cfg, Config)
    for name in ("small_4070", "mid_4070", "medium_4070"):
        cfg = load_config(REPO / "configs" / f"{name}.toml")
        assert cfg.model.block_size == 1024 and cfg.train.dtype == "bfloat16" and cfg.train.compile
        assert abs(cfg.tokens_per_step - 524_288) <= 524_288 * 0.05, name


def test_modern_arch_sets_its_switches_and_each_can_be_set_back(tmp_path):
    from gptfast.arch import ARCH_DEFAULTS, GPT2_SWITCHES, ModelConfig

    cfg = load_config(write(tmp_path, '[model]\narch = "modern"\n'))
    for key, value in ARCH_DEFAULTS["modern"].items():
        assert getattr(cfg.model, key) == value, key
    assert cfg.model == ModelConfig.for_arch("modern")
    ablated = load_config(write(tmp_path, '[model]\narch = "modern"\nrotary = false\n'), ["--model.logit_softcap=15"])
    assert not ablated.model.rotary and ablated.model.logit_softcap == 15.0 and ablated.model.qk_norm
    assert load_config(None, ["--model.arch=modern"]).model == cfg.model  # from the command line too
    assert config_from_dict(tomllib.loads(to_toml(ablated))) == ablated  # the written config is explicit
    default = load_config(None)
    assert {k: getattr(default.model, k) for k in GPT2_SWITCHES} == GPT2_SWITCHES


@pytest.mark.parametrize("text, key, why", [
    ('[model]\nrotary = true\n', "model.rotary", 'set model.arch = "modern"'),
    ('[model]\nlogit_softcap = 30\n', "model.logit_softcap", "is not GPT-2's architecture"),
    ('[model]\narch = "modrn"\n', "model.arch", "did you mean 'modern'"),
    ('[model]\narch = "modern"\nnorm = "rms"\n', "model.norm", "did you mean 'rmsnorm'"),
    ('[model]\narch = "modern"\nmlp = "swiglu"\n', "model.mlp", "expected one of gelu, relu2"),
    ('[model]\narch = "modern"\nlogit_softcap = -1\n', "model.logit_softcap", "must be >= 0"),
    ('[model]\narch = "modern"\nrotary_base = 0.5\n', "model.rotary_base", "must be > 1"),
    ('[model]\narch = "modern"\nn_embd = 36\nn_head = 12\n', "model.rotary", "must be even"),
    ('[model]\narch = "modern"\n[train]\ninit_from = "gpt2"\n', "train.init_from", 'model.arch = "gpt2"'),
])
def test_impossible_architectures(tmp_path, text, key, why):
    msg = error_of(tmp_path, text)
    assert key in msg and why in msg and "\n" not in msg, msg


@pytest.mark.parametrize("arg", ["--\n.0=1", "--train.max\nsteps=3"])
def test_a_name_with_a_newline_is_still_a_one_line_error(arg):
    """Found by the fuzz test: the name is quoted with repr, so the error stays one line."""
    with pytest.raises(ConfigError) as raised:
        load_config(None, [arg])
    assert "\n" not in str(raised.value) and "\\n" in str(raised.value)


@pytest.mark.parametrize("text, expected", [("12GiB", 12 * 2**30), ("8 GB", 8e9), ("512MiB", 2**29), ("1.5 TiB", 1.5 * 2**40)])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_rejects_garbage():
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes("twelve")
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes("1024")  # a unit is required: bytes or GiB is not a guess worth making
