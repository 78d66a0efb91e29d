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
from dataclasses import dataclass, field
from typing import Callable

from gptfast.errors import ConfigError

# GPT-2's embedding is padded to a multiple of this so the lm_head matmul gets tensor-core
# friendly shapes (50257 -> 50304); the padded rows are never a target and are masked from the loss.
VOCAB_PAD_MULTIPLE = 64

DTYPES = ("bfloat16", "float16", "float32")
# A dataset name is one folder inside data_dir: no separators, no "..", nothing hidden.
DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")



def dataset_name_problem(name: str) -> str | None:
    """Why `name` cannot name a dataset, or None: the one check of data.dataset, `prepare --name`
    and every other place a dataset is named."""
    if DATASET_NAME.fullmatch(name) and ".." not in name:
        return None
    return (f"{name!r} must be a plain name (letters, digits, '.', '_', '-'): a dataset is the folder of "
            "that name inside the data folder")
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


# A section's validate() reports an impossible value through fail(key, why), which raises.
Fail = Callable[[str, str], None]


def with_arch_defaults(values: dict) -> dict:
    """A [model] section's values over its arch's switch defaults (ARCH_DEFAULTS): the one place
    they are merged, for the TOML loader and for ModelConfig.for_arch alike."""
    arch = values.get("arch")
    return {**(ARCH_DEFAULTS.get(arch, {}) if isinstance(arch, str) else {}), **values}


def _choice(fail: Fail, key: str, value: str, choices) -> None:
    if value not in choices:
        fail(key, f"expected one of {', '.join(choices)}, got {value!r}{_suggest(value, choices)}")


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
        return cls(**with_arch_defaults({"arch": arch, **values}))

    def validate(self, fail: Fail) -> None:
        for key in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            if getattr(self, key) <= 0:
                fail(f"model.{key}", f"must be positive, got {getattr(self, key)}")
        if self.n_embd % self.n_head:
            fail("model.n_embd", f"{self.n_embd} is not divisible by model.n_head = {self.n_head}")
        if self.vocab_size > 65536:
            fail("model.vocab_size", f"token files hold uint16 ids, so at most 65536, got {self.vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            fail("model.dropout", f"must be in [0, 1), got {self.dropout}")
        _choice(fail, "model.arch", self.arch, ARCHES)
        _choice(fail, "model.norm", self.norm, NORMS)
        _choice(fail, "model.mlp", self.mlp, MLPS)
        if self.arch == "gpt2":
            for key, value in GPT2_SWITCHES.items():
                if getattr(self, key) != value:
                    fail(f"model.{key}", f"{_toml_value(getattr(self, key))} is not GPT-2's architecture, which "
                                         "model.arch = \"gpt2\" keeps exactly (it exports to Hugging Face); set "
                                         "model.arch = \"modern\" to change it")
        if self.logit_softcap < 0:
            fail("model.logit_softcap", f"must be >= 0 (0: off), got {self.logit_softcap}")
        if self.rotary_base <= 1:
            fail("model.rotary_base", f"must be > 1, got {self.rotary_base}")
        if self.rotary and self.head_dim % 2:
            fail("model.rotary", f"rotary embeddings rotate pairs of channels: the head size "
                                 f"(n_embd / n_head = {self.head_dim}) must be even")

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

    def validate(self, fail: Fail) -> None:
        if problem := dataset_name_problem(self.dataset):
            fail("data.dataset", problem)


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

    def validate(self, fail: Fail) -> None:
        if self.lr <= 0:
            fail("optim.lr", f"must be positive, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            fail("optim.min_lr", f"must be in [0, optim.lr = {self.lr}], got {self.min_lr}")
        if self.warmup_steps < 0:
            fail("optim.warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if self.lr_decay_steps and self.lr_decay_steps < self.warmup_steps:
            fail("optim.lr_decay_steps", f"must be >= optim.warmup_steps = {self.warmup_steps} "
                                         "(or 0: train.max_steps)")
        if self.lr_decay_steps < 0:
            fail("optim.lr_decay_steps", f"must be >= 0 (0: train.max_steps), got {self.lr_decay_steps}")
        _choice(fail, "optim.name", self.name, OPTIMIZERS)
        _choice(fail, "optim.schedule", self.schedule, SCHEDULES)
        if not 0.0 < self.cooldown_fraction <= 1.0:
            fail("optim.cooldown_fraction", f"must be in (0, 1], got {self.cooldown_fraction}")
        if self.muon_lr <= 0:
            fail("optim.muon_lr", f"must be positive, got {self.muon_lr}")
        if self.muon_embedding_lr < 0:
            fail("optim.muon_embedding_lr", f"must be >= 0 (0: optim.lr), got {self.muon_embedding_lr}")
        if not 0.0 <= self.muon_momentum < 1.0:
            fail("optim.muon_momentum", f"must be in [0, 1), got {self.muon_momentum}")
        if self.muon_ns_steps < 1:
            fail("optim.muon_ns_steps", f"must be >= 1, got {self.muon_ns_steps}")
        for key in ("muon_weight_decay", "weight_decay"):
            if getattr(self, key) < 0:
                fail(f"optim.{key}", f"must be >= 0, got {getattr(self, key)}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            fail("optim.betas", f"each must be in [0, 1), got {list(self.betas)}")
        if self.eps <= 0:
            fail("optim.eps", f"must be positive, got {self.eps}")
        if self.grad_clip < 0:
            fail("optim.grad_clip", f"must be >= 0 (0 disables clipping), got {self.grad_clip}")


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

    def validate(self, fail: Fail) -> None:
        for key in ("micro_batch_size", "grad_accum_steps", "max_steps", "eval_interval", "eval_steps",
                    "log_interval", "checkpoint_interval", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, key) <= 0:
                fail(f"train.{key}", f"must be positive, got {getattr(self, key)}")
        if self.target_val_loss < 0:
            fail("train.target_val_loss", f"must be >= 0 (0: no target), got {self.target_val_loss}")
        if not 0 <= self.seed < 2**63:
            fail("train.seed", f"must be in [0, 2**63), got {self.seed}")
        for key in ("loss_spike_factor", "max_param_growth"):
            value = getattr(self, key)
            if value != 0 and value <= 1:
                fail(f"train.{key}", f"must be > 1, or 0 to disable the check, got {value}")
        if self.sample_tokens < 0:
            fail("train.sample_tokens", f"must be >= 0, got {self.sample_tokens}")
        _choice(fail, "train.compile_scope", self.compile_scope, COMPILE_SCOPES)
        if self.dtype not in DTYPES:
            fail("train.dtype", f"expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            fail("train.device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")
        if not self.out_dir:
            fail("train.out_dir", "must not be empty")
        if self.memory_budget:
            try:
                parse_bytes(self.memory_budget)
            except ValueError as e:
                fail("train.memory_budget", str(e))


@dataclass
class KernelsConfig:
    layernorm: bool = _field(False, "Triton fused residual-add + LayerNorm")
    cross_entropy: bool = _field(False, "Triton fused linear + cross-entropy loss")
    adamw: bool = _field(False, "Triton fused AdamW with fused gradient clipping")
    loss_chunk_mib: int = _field(256, "cross_entropy: the fused loss holds at most this many MiB of logits at "
                                      "once (a fixed budget, which the memory planner counts: the same chunks, "
                                      "and the same fp32 summation order, on every run and every resume)")

    def validate(self, fail: Fail) -> None:
        if self.loss_chunk_mib <= 0:
            fail("kernels.loss_chunk_mib", f"must be positive, got {self.loss_chunk_mib}")


@dataclass
class RecomputeConfig:
    policy: str = _field("none", "activation recomputation in backward: none, selective (recompute only "
                                 "cheap ops) or full (the whole block)")
    every: int = _field(1, "recompute every k-th block (1: all of them)")

    def validate(self, fail: Fail) -> None:
        if self.policy not in RECOMPUTE_POLICIES:
            fail("recompute.policy", f"expected one of {', '.join(RECOMPUTE_POLICIES)}, got {self.policy!r}")
        if self.every <= 0:
            fail("recompute.every", f"must be positive, got {self.every}")


@dataclass
class EvalConfig:
    hellaswag_interval: int = _field(0, "evaluate HellaSwag every this many steps (and at the end); 0: never")
    hellaswag_limit: int = _field(0, "the first N HellaSwag items only; 0: all 10,042 of the val split")
    hellaswag_input: str = _field("", "the HellaSwag val jsonl, read offline; empty: download once into "
                                      "~/.cache/gptfast")

    def validate(self, fail: Fail) -> None:
        for key in ("hellaswag_interval", "hellaswag_limit"):
            if getattr(self, key) < 0:
                fail(f"eval.{key}", "must be >= 0 (0: off / all items)")


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

    def validate(self, fail: Fail) -> None:
        for backend in self.backends:
            if backend not in LOG_BACKENDS:
                fail("log.backends", f"unknown backend {backend!r}{_suggest(backend, LOG_BACKENDS)}")
        if len(set(self.backends)) != len(self.backends):
            fail("log.backends", f"names a backend twice: {list(self.backends)}")
        if self.progress_seconds < 0:
            fail("log.progress_seconds", f"must be >= 0 (0: no progress lines), got {self.progress_seconds}")
        if self.wandb_mode not in WANDB_MODES:
            fail("log.wandb_mode", f"expected online, offline, disabled or empty, got {self.wandb_mode!r}")


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

    def validate(self, source: str = "<config>") -> None:
        """Raise ConfigError for values that are well-typed but impossible: each section's own
        checks, then those across sections."""

        def fail(key: str, why: str):
            raise ConfigError(f"{source}: {key}: {why}")

        for section in dataclasses.fields(self):  # NaN passes every comparison, so it is caught here
            for key, value in dataclasses.asdict(getattr(self, section.name)).items():
                values = value if isinstance(value, (list, tuple)) else [value]
                if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                    fail(f"{section.name}.{key}", f"must be a finite number, got {value!r}")
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate(fail)
        if self.train.init_from and self.model.arch != "gpt2":
            fail("train.init_from", f"loads OpenAI GPT-2 weights, which need model.arch = \"gpt2\", "
                                    f"not {self.model.arch!r}")
        if self.optim.name == "muon" and self.train.dtype == "float16":
            fail("optim.name", "muon does not run with train.dtype = float16 (its loss scaler steps one torch "
                               "optimizer); use bfloat16")


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f"; did you mean '{close[0]}'?" if close else f"; valid: {', '.join(choices)}"


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


