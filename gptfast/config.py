"""Run configuration: one dataclass per TOML section, strict loading, CLI overrides.

A config file maps 1:1 onto `Config`: `[model]` -> `ModelConfig`, `[data]` -> `DataConfig`, and so
on. Precedence is CLI (`--section.key=value`) > TOML > the defaults below. Unknown keys, wrong types
and impossible values raise `ConfigError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from gptfast.errors import ConfigError

# GPT-2's embedding is padded to a multiple of this so the lm_head matmul gets tensor-core
# friendly shapes (50257 -> 50304); the padded rows are never a target and are masked from the loss.
VOCAB_PAD_MULTIPLE = 64

DTYPES = ("bfloat16", "float16", "float32")
# A dataset name is one folder inside data_dir: no separators, no "..", nothing hidden.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# `python -m gptfast.prepare` recipes; those that need no arguments and no network let a config
# naming them prepare its dataset on its own.
RECIPES = ("stdlib", "shakespeare", "text")
OFFLINE_RECIPES = ("stdlib",)
# How input that is not UTF-8 is handled when a corpus is read.
DECODE_ERRORS = ("strict", "replace")


def is_dataset_name(name: str) -> bool:
    return bool(DATASET_NAME.fullmatch(name)) and ".." not in name
# Activation recomputation ([recompute]): none keeps every activation for backward, selective
# recomputes a block's cheap elementwise ops, full recomputes the whole block.
ARCHES = ("gpt2", "modern")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "relu2")
# The architecture switches and their values in each arch. gpt2 is fixed (it must stay OpenAI's
# model, which exports to Hugging Face); modern's are defaults a config may override one by one.
GPT2_SWITCHES = {"rotary": False, "norm": "layernorm", "qk_norm": False, "mlp": "gelu", "tie_embeddings": True,
                 "zero_init_proj": False, "logit_softcap": 0.0}
ARCH_DEFAULTS = {
    "gpt2": GPT2_SWITCHES,
    # modded-nanogpt's records (github.com/KellerJordan/modded-nanogpt): rotary, QK-norm, ReLU^2,
    # untied head, zero-init projections, soft cap 30, no biases.
    "modern": {"rotary": True, "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "tie_embeddings": False,
               "zero_init_proj": True, "logit_softcap": 30.0, "bias": False},
}
RECOMPUTE_POLICIES = ("none", "selective", "full")
# What train.compile compiles: the whole model as one graph, or each transformer block (regional
# compilation: one compiled block serves all n_layer of them, a much shorter start).
COMPILE_SCOPES = ("model", "blocks")
OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
# Sections that were renamed: an old name is an error that names the new one.
RENAMED_SECTIONS = {"checkpointing": "recompute"}
# Where metrics go ([log] backends); each but jsonl needs its optional extra (setup.py).
LOG_BACKENDS = ("jsonl", "tensorboard", "wandb")
WANDB_MODES = ("", "online", "offline", "disabled")


def _field(default, doc: str):
    """A dataclass field carrying a one-line doc, quoted in error messages."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    n_layer: int = _field(12, "number of transformer blocks")
    n_head: int = _field(12, "attention heads per block")
    n_embd: int = _field(768, "model width (residual stream size)")
    block_size: int = _field(1024, "context length in tokens")
    vocab_size: int = _field(50257, "tokenizer vocabulary size (GPT-2 BPE: 50257)")
    dropout: float = _field(0.0, "dropout probability in [0, 1); 0 for pretraining")
    bias: bool = _field(True, "biases in Linear and LayerNorm layers, as GPT-2 has")
    arch: str = _field("gpt2", "gpt2: OpenAI's 2019 architecture (exportable to Hugging Face), every switch below "
                               "at its GPT-2 value; modern: the switches default to the speedruns' values "
                               "(modded-nanogpt) and each may be set back for an ablation")
    rotary: bool = _field(False, "rotary position embeddings on queries and keys instead of learned positions "
                                 "(Su et al. 2021, RoFormer); modern: true")
    rotary_base: float = _field(10000.0, "rotary: the base of the rotation frequencies")
    norm: str = _field("layernorm", "layernorm (Ba et al. 2016) or rmsnorm (Zhang & Sennrich 2019, no centring or "
                                    "bias); modern: rmsnorm")
    qk_norm: bool = _field(False, "RMS-normalise each head's queries and keys before attention (Dehghani et al. "
                                  "2023; modded-nanogpt); modern: true")
    mlp: str = _field("gelu", "the MLP's activation: gelu (GPT-2's tanh approximation) or relu2 (squared ReLU, "
                              "So et al. 2021, Primer); modern: relu2")
    tie_embeddings: bool = _field(True, "the lm_head shares the token embedding's matrix (GPT-2); modern: false")
    zero_init_proj: bool = _field(False, "initialise the projections into the residual stream (attention and MLP "
                                         "c_proj) and an untied lm_head to zero (modded-nanogpt); modern: true")
    logit_softcap: float = _field(0.0, "logits -> cap * tanh(logits / cap) before the loss (Gemma 2; "
                                       "modded-nanogpt); 0: off; modern: 30")

    @classmethod
    def for_arch(cls, arch: str, **values) -> "ModelConfig":
        """A ModelConfig of `arch` with its switches' defaults (ARCH_DEFAULTS), then `values`:
        the TOML loader fills a section the same way."""
        return cls(**{"arch": arch, **ARCH_DEFAULTS.get(arch, {}), **values})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE


@dataclass
class DataConfig:
    dataset: str = _field("stdlib", "prepared dataset name: data_dir/<dataset>/{train,val}.bin")
    data_dir: str = _field("data", "folder holding prepared datasets")
    auto_prepare: bool = _field(True, "prepare a missing dataset whose recipe needs no arguments")


@dataclass
class OptimConfig:
    name: str = _field("adamw", "adamw, or muon (Muon for the blocks' matrices, AdamW at lr for embeddings, "
                                "head, gains and biases)")
    lr: float = _field(6e-4, "peak learning rate (AdamW's), reached after warmup")
    min_lr: float = _field(6e-5, "learning rate at the end of the decay")
    warmup_steps: int = _field(700, "optimizer steps of linear warmup from 0 to lr")
    schedule: str = _field("cosine", "cosine (warmup, cosine decay) or wsd (warmup, stable, linear decay over "
                                     "the last cooldown_fraction of the steps)")
    cooldown_fraction: float = _field(0.2, "wsd: the share of the steps spent decaying to min_lr")
    lr_decay_steps: int = _field(0, "optimizer step at which the decay reaches min_lr; 0: train.max_steps, so a "
                                    "shorter run gets the whole schedule")
    weight_decay: float = _field(0.1, "decoupled weight decay, applied to 2-D weights only")
    betas: tuple[float, float] = _field((0.9, 0.95), "AdamW (beta1, beta2)")
    eps: float = _field(1e-8, "AdamW epsilon")
    grad_clip: float = _field(1.0, "clip the global gradient norm to this; 0 disables clipping")
    muon_lr: float = _field(0.02, "muon: peak learning rate of the Muon matrices (scaled by the schedule "
                                  "as lr is)")
    muon_embedding_lr: float = _field(0.0, "muon: peak AdamW rate of an untied token embedding (model.tie_embeddings "
                                           "= false; modded-nanogpt trains it at ~150x the head's rate); 0: lr")
    muon_momentum: float = _field(0.95, "muon: momentum (Nesterov)")
    muon_ns_steps: int = _field(5, "muon: Newton-Schulz iterations of the orthogonalisation")
    muon_weight_decay: float = _field(0.0, "muon: decoupled weight decay of the Muon matrices")


@dataclass
class TrainConfig:
    micro_batch_size: int = _field(8, "sequences per forward/backward pass")
    grad_accum_steps: int = _field(64, "micro-batches accumulated per optimizer step")
    max_steps: int = _field(19073, "optimizer steps to train for")
    eval_interval: int = _field(250, "evaluate on the val split every this many steps")
    eval_steps: int = _field(20, "micro-batches per evaluation")
    log_interval: int = _field(10, "print and record metrics every this many steps")
    checkpoint_interval: int = _field(500, "write a checkpoint every this many steps")
    keep_checkpoints: int = _field(2, "how many of the newest checkpoints to keep on disk")
    max_bad_steps: int = _field(10, "stop after this many unhealthy optimizer steps in a row (NaN/Inf loss or "
                                    "gradient norm, loss spike, parameter-norm blow-up)")
    loss_spike_factor: float = _field(3.0, "a step whose loss exceeds this many times the mean of the recent "
                                           "healthy losses is skipped as unhealthy; 0 disables the check")
    max_param_growth: float = _field(1.5, "an update that multiplies the global parameter norm by more than "
                                          "this marks the run unhealthy; 0 disables the check")
    out_dir: str = _field("out", "run directory: checkpoints, metrics.jsonl, config.toml")
    resume: bool = _field(True, "continue from the newest healthy checkpoint in out_dir if there is one")
    allow_config_change: bool = _field(False, "on resume, accept changes to settings that change the "
                                              "trajectory (seed, data, batch, dropout); they are logged")
    seed: int = _field(1337, "seed for initialisation, data order and dropout")
    dtype: str = _field("bfloat16", "autocast dtype on CUDA: bfloat16, float16 or float32")
    compile: bool = _field(False, "torch.compile the model")
    compile_scope: str = _field("model", "with compile: model (the whole model, one graph) or blocks (each "
                                         "transformer block, one compilation shared by all of them: a shorter "
                                         "start; the embedding and the loss run uncompiled)")
    device: str = _field("auto", "auto, cpu, cuda or cuda:N")
    sample_tokens: int = _field(64, "tokens sampled at the end of the run; 0 for none")
    init_from: str = _field("", "a Hugging Face GPT-2 to start from: a directory, or a hub name (gpt2, gpt2-medium, "
                                "org/name) found in the Hugging Face cache or downloaded into it; its config.json sets "
                                "the architecture ([model] keeps only dropout)")
    memory_budget: str = _field("", "plan micro-batch and activation recomputation into this much GPU memory, e.g. "
                                    "\"12GiB\"; empty: train as configured")
    target_val_loss: float = _field(0.0, "stop at the first evaluation whose val loss is at or below this, and "
                                         "report the time, tokens and steps it took; 0: no target")


@dataclass
class KernelsConfig:
    layernorm: bool = _field(False, "Triton fused residual-add + LayerNorm")
    cross_entropy: bool = _field(False, "Triton fused linear + cross-entropy loss")
    adamw: bool = _field(False, "Triton fused AdamW with fused gradient clipping")


@dataclass
class RecomputeConfig:
    policy: str = _field("none", "activation recomputation in backward: none, selective (recompute only "
                                 "cheap ops) or full (the whole block)")
    every: int = _field(1, "recompute every k-th block (1: all of them)")


@dataclass
class EvalConfig:
    hellaswag_interval: int = _field(0, "evaluate HellaSwag every this many steps (and at the end); 0: never")
    hellaswag_limit: int = _field(0, "the first N HellaSwag items only; 0: all 10,042 of the val split")
    hellaswag_input: str = _field("", "the HellaSwag val jsonl, read offline; empty: download once into "
                                      "~/.cache/gptfast")


@dataclass
class LogConfig:
    backends: tuple[str, ...] = _field(("jsonl",), "where metrics go: jsonl (out_dir/metrics.jsonl), tensorboard "
                                                  "(event files in out_dir/tensorboard), wandb")
    progress_seconds: float = _field(10.0, "a progress line within an optimizer step or an evaluation that runs "
                                           "longer than this many seconds; 0 for none")
    wandb_project: str = _field("gptfast", "Weights & Biases project")
    wandb_run_name: str = _field("", "Weights & Biases run name; empty: the name of train.out_dir")
    wandb_mode: str = _field("", "online, offline (no account needed; sync later) or disabled; empty: "
                                 "wandb's own default (WANDB_MODE, else online)")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    kernels: KernelsConfig = field(default_factory=KernelsConfig)
    recompute: RecomputeConfig = field(default_factory=RecomputeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def tokens_per_step(self) -> int:
        """Tokens per optimizer step: micro-batch x accumulation x context."""
        return self.train.micro_batch_size * self.train.grad_accum_steps * self.model.block_size

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTION_TYPES: dict[str, type] = typing.get_type_hints(Config)
SECTIONS = tuple(SECTION_TYPES)


def _shown(name: str) -> str:
    """A user's section or key name as an error message quotes it: as typed when it is a plain
    name, else repr (a newline in a name must not split the one-line error)."""
    return name if name.isidentifier() else repr(name)


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(choices)}"


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
            raise ConfigError(f"{where}{_shown(key)}: unknown key{_suggest(key, names)}")
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
            raise ConfigError(f"{source}: [{_shown(name)}]: unknown section{_suggest(name, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{source}: {name}: expected a [{name}] table, got {values!r}")
        if name == "model" and values.get("arch") in ARCH_DEFAULTS:  # the arch's switch defaults, then the file's
            values = {**ARCH_DEFAULTS[values["arch"]], **values}
        sections[name] = _section_from_dict(SECTION_TYPES[name], values, f"{source}: {name}.")
    cfg = Config(**sections)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str = "<config>") -> None:
    """Raise ConfigError for values that are well-typed but impossible."""

    def fail(key: str, why: str):
        raise ConfigError(f"{source}: {key}: {why}")

    m, o, t = cfg.model, cfg.optim, cfg.train
    for section in dataclasses.fields(cfg):  # NaN passes every comparison below, so it is caught here
        for key, value in dataclasses.asdict(getattr(cfg, section.name)).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                fail(f"{section.name}.{key}", f"must be a finite number, got {value!r}")
    for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
        if getattr(m, key) <= 0:
            fail(f"model.{key}", f"must be positive, got {getattr(m, key)}")
    if m.n_embd % m.n_head:
        fail("model.n_embd", f"{m.n_embd} is not divisible by model.n_head = {m.n_head}")
    if m.vocab_size > 65536:
        fail("model.vocab_size", f"token files hold uint16 ids, so at most 65536, got {m.vocab_size}")
    if not 0.0 <= m.dropout < 1.0:
        fail("model.dropout", f"must be in [0, 1), got {m.dropout}")
    if m.arch not in ARCHES:
        fail("model.arch", f"expected one of {', '.join(ARCHES)}, got {m.arch!r}{_suggest(m.arch, ARCHES)}")
    if m.norm not in NORMS:
        fail("model.norm", f"expected one of {', '.join(NORMS)}, got {m.norm!r}{_suggest(m.norm, NORMS)}")
    if m.mlp not in MLPS:
        fail("model.mlp", f"expected one of {', '.join(MLPS)}, got {m.mlp!r}{_suggest(m.mlp, MLPS)}")
    if m.arch == "gpt2":
        for key, value in GPT2_SWITCHES.items():
            if getattr(m, key) != value:
                fail(f"model.{key}", f"{_toml_value(getattr(m, key))} is not GPT-2's architecture, which model.arch = "
                                     f"\"gpt2\" keeps exactly (it exports to Hugging Face); set model.arch = \"modern\" "
                                     f"to change it")
    if m.logit_softcap < 0:
        fail("model.logit_softcap", f"must be >= 0 (0: off), got {m.logit_softcap}")
    if m.rotary_base <= 1:
        fail("model.rotary_base", f"must be > 1, got {m.rotary_base}")
    if m.rotary and m.head_dim % 2:
        fail("model.rotary", f"rotary embeddings rotate pairs of channels: the head size "
                             f"(n_embd / n_head = {m.head_dim}) must be even")
    if t.init_from and m.arch != "gpt2":
        fail("train.init_from", f"loads OpenAI GPT-2 weights, which need model.arch = \"gpt2\", not {m.arch!r}")
    if not is_dataset_name(cfg.data.dataset):
        fail("data.dataset", f"must be a plain dataset name (letters, digits, '.', '_', '-'; a folder inside "
                             f"data.data_dir), got {cfg.data.dataset!r}")
    if o.lr <= 0:
        fail("optim.lr", f"must be positive, got {o.lr}")
    if not 0 <= o.min_lr <= o.lr:
        fail("optim.min_lr", f"must be in [0, optim.lr = {o.lr}], got {o.min_lr}")
    if o.warmup_steps < 0:
        fail("optim.warmup_steps", f"must be >= 0, got {o.warmup_steps}")
    if o.lr_decay_steps and o.lr_decay_steps < o.warmup_steps:
        fail("optim.lr_decay_steps", f"must be >= optim.warmup_steps = {o.warmup_steps} (or 0: train.max_steps)")
    if o.lr_decay_steps < 0:
        fail("optim.lr_decay_steps", f"must be >= 0 (0: train.max_steps), got {o.lr_decay_steps}")
    if o.name not in OPTIMIZERS:
        fail("optim.name", f"expected one of {', '.join(OPTIMIZERS)}, got {o.name!r}{_suggest(o.name, OPTIMIZERS)}")
    if o.schedule not in SCHEDULES:
        fail("optim.schedule", f"expected one of {', '.join(SCHEDULES)}, got {o.schedule!r}")
    if not 0.0 < o.cooldown_fraction <= 1.0:
        fail("optim.cooldown_fraction", f"must be in (0, 1], got {o.cooldown_fraction}")
    if o.muon_lr <= 0:
        fail("optim.muon_lr", f"must be positive, got {o.muon_lr}")
    if o.muon_embedding_lr < 0:
        fail("optim.muon_embedding_lr", f"must be >= 0 (0: optim.lr), got {o.muon_embedding_lr}")
    if not 0.0 <= o.muon_momentum < 1.0:
        fail("optim.muon_momentum", f"must be in [0, 1), got {o.muon_momentum}")
    if o.muon_ns_steps < 1:
        fail("optim.muon_ns_steps", f"must be >= 1, got {o.muon_ns_steps}")
    if o.muon_weight_decay < 0:
        fail("optim.muon_weight_decay", f"must be >= 0, got {o.muon_weight_decay}")
    if o.name == "muon" and t.dtype == "float16":
        fail("optim.name", "muon does not run with train.dtype = float16 (its loss scaler steps one torch optimizer); "
                           "use bfloat16")
    if t.target_val_loss < 0:
        fail("train.target_val_loss", f"must be >= 0 (0: no target), got {t.target_val_loss}")
    if o.weight_decay < 0:
        fail("optim.weight_decay", f"must be >= 0, got {o.weight_decay}")
    if not all(0.0 <= b < 1.0 for b in o.betas):
        fail("optim.betas", f"each must be in [0, 1), got {list(o.betas)}")
    if o.eps <= 0:
        fail("optim.eps", f"must be positive, got {o.eps}")
    if o.grad_clip < 0:
        fail("optim.grad_clip", f"must be >= 0 (0 disables clipping), got {o.grad_clip}")
    for key in ("micro_batch_size", "grad_accum_steps", "max_steps", "eval_interval", "eval_steps",
                "log_interval", "checkpoint_interval", "keep_checkpoints", "max_bad_steps"):
        if getattr(t, key) <= 0:
            fail(f"train.{key}", f"must be positive, got {getattr(t, key)}")
    if not 0 <= t.seed < 2**63:
        fail("train.seed", f"must be in [0, 2**63), got {t.seed}")
    if t.loss_spike_factor != 0 and t.loss_spike_factor <= 1:
        fail("train.loss_spike_factor", f"must be > 1, or 0 to disable the check, got {t.loss_spike_factor}")
    if t.max_param_growth != 0 and t.max_param_growth <= 1:
        fail("train.max_param_growth", f"must be > 1, or 0 to disable the check, got {t.max_param_growth}")
    if t.sample_tokens < 0:
        fail("train.sample_tokens", f"must be >= 0, got {t.sample_tokens}")
    if t.compile_scope not in COMPILE_SCOPES:
        fail("train.compile_scope", f"expected one of {', '.join(COMPILE_SCOPES)}, got {t.compile_scope!r}"
                                    f"{_suggest(t.compile_scope, COMPILE_SCOPES)}")
    if t.dtype not in DTYPES:
        fail("train.dtype", f"expected one of {', '.join(DTYPES)}, got {t.dtype!r}")
    device = t.device
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        fail("train.device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")
    if not t.out_dir:
        fail("train.out_dir", "must not be empty")
    if t.memory_budget:
        try:
            parse_bytes(t.memory_budget)
        except ValueError as e:
            fail("train.memory_budget", str(e))
    if cfg.recompute.policy not in RECOMPUTE_POLICIES:
        fail("recompute.policy", f"expected one of {', '.join(RECOMPUTE_POLICIES)}, got {cfg.recompute.policy!r}")
    if cfg.recompute.every <= 0:
        fail("recompute.every", f"must be positive, got {cfg.recompute.every}")
    for backend in cfg.log.backends:
        if backend not in LOG_BACKENDS:
            fail("log.backends", f"unknown backend {backend!r}{_suggest(backend, LOG_BACKENDS)}")
    if len(set(cfg.log.backends)) != len(cfg.log.backends):
        fail("log.backends", f"names a backend twice: {list(cfg.log.backends)}")
    if cfg.eval.hellaswag_interval < 0 or cfg.eval.hellaswag_limit < 0:
        fail("eval.hellaswag_interval" if cfg.eval.hellaswag_interval < 0 else "eval.hellaswag_limit",
             "must be >= 0 (0: off / all items)")
    if cfg.log.progress_seconds < 0:
        fail("log.progress_seconds", f"must be >= 0 (0: no progress lines), got {cfg.log.progress_seconds}")
    if cfg.log.wandb_mode not in WANDB_MODES:
        fail("log.wandb_mode", f"expected online, offline, disabled or empty, got {cfg.log.wandb_mode!r}")


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


def parse_bytes(text: str) -> int:
    """'12GiB', '12 GB', '11000MiB', '1.5TiB' -> bytes; anything else raises ValueError."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B)\s*", text)
    if not match:
        raise ValueError(f"expected a size with a unit, such as 12GiB or 11.5 GB, got {text!r}")
    value = float(match.group(1)) * {"KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KiB": 2**10, "MiB": 2**20,
                                     "GiB": 2**30, "TiB": 2**40}[match.group(2)]
    if value <= 0:
        raise ValueError(f"must be positive, got {text!r}")
    return int(value)


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
            head = f"  --{section}.{f.name}={_toml_value(defaults[f.name])}"
            doc = f.metadata.get("doc", "")
            wrapped = textwrap.wrap(doc, width - 8) or [""]
            lines.append(head)
            lines.extend(f"        {part}" for part in wrapped)
    return "\n".join(lines)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(cfg: Config) -> str:
    """The resolved config as a TOML document that `load_config` reads back to an equal Config."""
    lines = []
    for section, values in cfg.to_dict().items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
