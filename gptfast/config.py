"""Run configuration: one dataclass per TOML section, strict loading, CLI overrides.

A config file maps 1:1 onto `Config`: `[model]` -> `ModelConfig`, `[data]` -> `DataConfig`, and so
on. Precedence is CLI (`--section.key=value`) > TOML > the defaults below. Unknown keys, wrong types
and impossible values raise `ConfigError` naming the file, the key and what was expected.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from gptfast.arch import WINDOW_MULTIPLE, ModelConfig
from gptfast.errors import ConfigError
from gptfast.fields import Fail, check_choice, doc_field, suggest

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


@dataclass
class DataConfig:
    dataset: str = doc_field("stdlib", "prepared dataset name: data_dir/<dataset>/{train,val}.bin")
    data_dir: str = doc_field("data", "folder holding prepared datasets")
    auto_prepare: bool = doc_field(True, "prepare a missing dataset whose recipe needs no arguments")

    def validate(self, fail: Fail) -> None:
        if problem := dataset_name_problem(self.dataset):
            fail("data.dataset", problem)


@dataclass
class OptimConfig:
    name: str = doc_field("adamw", "adamw, or muon (Muon for the blocks' matrices, AdamW at lr for embeddings, "
                                   "head, gains and biases)")
    lr: float = doc_field(6e-4, "peak learning rate (AdamW's), reached after warmup")
    min_lr: float = doc_field(6e-5, "learning rate at the end of the decay")
    warmup_steps: int = doc_field(700, "optimizer steps of linear warmup from 0 to lr")
    schedule: str = doc_field("cosine", "cosine (warmup, cosine decay) or wsd (warmup, stable, linear decay over "
                                        "the last cooldown_fraction of the steps)")
    cooldown_fraction: float = doc_field(0.2, "wsd: the share of the steps spent decaying to min_lr")
    lr_decay_steps: int = doc_field(0, "optimizer step at which the decay reaches min_lr; 0: train.max_steps, so a "
                                       "shorter run gets the whole schedule")
    weight_decay: float = doc_field(0.1, "decoupled weight decay, applied to 2-D weights only")
    betas: tuple[float, float] = doc_field((0.9, 0.95), "AdamW (beta1, beta2)")
    eps: float = doc_field(1e-8, "AdamW epsilon")
    grad_clip: float = doc_field(1.0, "clip the global gradient norm to this; 0 disables clipping")
    muon_lr: float = doc_field(0.02, "muon: peak learning rate of the Muon matrices (scaled by the schedule "
                                     "as lr is)")
    muon_embedding_lr: float = doc_field(0.0, "muon: peak AdamW rate of an untied token embedding (model.tie_embeddings "
                                              "= false; modded-nanogpt trains it at ~150x the head's rate); 0: lr")
    muon_momentum: float = doc_field(0.95, "muon: momentum (Nesterov)")
    muon_ns_steps: int = doc_field(5, "muon: Newton-Schulz iterations of the orthogonalisation")
    muon_weight_decay: float = doc_field(0.0, "muon: decoupled weight decay of the Muon matrices")

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
        check_choice(fail, "optim.name", self.name, OPTIMIZERS)
        check_choice(fail, "optim.schedule", self.schedule, SCHEDULES)
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
    micro_batch_size: int = doc_field(8, "sequences per forward/backward pass")
    grad_accum_steps: int = doc_field(64, "micro-batches accumulated per optimizer step")
    max_steps: int = doc_field(19073, "optimizer steps to train for")
    eval_interval: int = doc_field(250, "evaluate on the val split every this many steps")
    eval_steps: int = doc_field(20, "micro-batches per evaluation")
    log_interval: int = doc_field(10, "print and record metrics every this many steps")
    checkpoint_interval: int = doc_field(500, "write a checkpoint every this many steps")
    keep_checkpoints: int = doc_field(2, "how many of the newest checkpoints to keep on disk")
    max_bad_steps: int = doc_field(10, "stop after this many unhealthy optimizer steps in a row (NaN/Inf loss or "
                                       "gradient norm, loss spike, parameter-norm blow-up)")
    loss_spike_factor: float = doc_field(3.0, "a step whose loss exceeds this many times the mean of the recent "
                                              "healthy losses is skipped as unhealthy; 0 disables the check")
    max_param_growth: float = doc_field(1.5, "an update that multiplies the global parameter norm by more than "
                                             "this marks the run unhealthy; 0 disables the check")
    out_dir: str = doc_field("out", "run directory: checkpoints, metrics.jsonl, config.toml")
    resume: bool = doc_field(True, "continue from the newest healthy checkpoint in out_dir if there is one")
    allow_config_change: bool = doc_field(False, "on resume, accept changes to settings that change the "
                                                 "trajectory (seed, data, batch, dropout); they are logged")
    seed: int = doc_field(1337, "seed for initialisation, data order and dropout")
    dtype: str = doc_field("bfloat16", "autocast dtype on CUDA: bfloat16, float16 or float32")
    compile: bool = doc_field(False, "torch.compile the model")
    compile_scope: str = doc_field("model", "with compile: model (the whole model, one graph) or blocks (each "
                                            "transformer block, one compilation shared by all of them: a shorter "
                                            "start; the embedding and the loss run uncompiled)")
    device: str = doc_field("auto", "auto, cpu, cuda or cuda:N")
    sample_tokens: int = doc_field(64, "tokens sampled at the end of the run; 0 for none")
    init_from: str = doc_field("", "a Hugging Face GPT-2 to start from: a directory, or a hub name (gpt2, gpt2-medium, "
                                   "org/name) found in the Hugging Face cache or downloaded into it; its config.json sets "
                                   "the architecture ([model] keeps only dropout)")
    memory_budget: str = doc_field("", "plan micro-batch and activation recomputation into this much GPU memory, e.g. "
                                       "\"12GiB\"; empty: train as configured")
    target_val_loss: float = doc_field(0.0, "stop at the first evaluation whose val loss is at or below this, and "
                                            "report the time, tokens and steps it took; 0: no target")
    window_start: int = doc_field(0, "the sliding window at step 0 (a multiple of 64 tokens), grown linearly to "
                                     "model.attn_window (or the whole context) at the last step, in multiples of "
                                     "64 (modded-nanogpt record 13); 0: the final window from the start")
    grad_accum_start: int = doc_field(0, "batch-size schedule: the accumulation steps at step 0, grown linearly "
                                         "over train.batch_warmup_steps to grad_accum_steps in whole multiples of "
                                         "grad_accum_start (tokens per step grow with it); 0: grad_accum_steps "
                                         "throughout")
    batch_warmup_steps: int = doc_field(0, "batch-size schedule: the optimizer steps over which accumulation grows "
                                           "from grad_accum_start to grad_accum_steps")

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
        check_choice(fail, "train.compile_scope", self.compile_scope, COMPILE_SCOPES)
        if self.dtype not in DTYPES:
            fail("train.dtype", f"expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        device = self.device
        if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
            fail("train.device", f"expected auto, cpu, cuda or cuda:N, got {device!r}")
        if not self.out_dir:
            fail("train.out_dir", "must not be empty")
        if self.grad_accum_start < 0 or self.batch_warmup_steps < 0:
            fail("train.grad_accum_start" if self.grad_accum_start < 0 else "train.batch_warmup_steps",
                 "must be >= 0 (0: no batch-size schedule)")
        if self.grad_accum_start:
            if self.grad_accum_steps % self.grad_accum_start:
                fail("train.grad_accum_start", f"the schedule grows in multiples of it, so train.grad_accum_steps "
                                               f"= {self.grad_accum_steps} must be one; got {self.grad_accum_start}")
            if not self.batch_warmup_steps:
                fail("train.batch_warmup_steps", "must be positive with train.grad_accum_start (the steps over "
                                                 "which the batch grows)")
        if self.window_start < 0 or self.window_start % WINDOW_MULTIPLE:
            fail("train.window_start", f"must be 0 or a positive multiple of {WINDOW_MULTIPLE} tokens, "
                                       f"got {self.window_start}")
        if self.memory_budget:
            try:
                parse_bytes(self.memory_budget)
            except ValueError as e:
                fail("train.memory_budget", str(e))


FP8_MODES = ("off", "mlp", "head", "head+mlp")


@dataclass
class KernelsConfig:
    layernorm: bool = doc_field(False, "Triton fused residual-add + LayerNorm")
    cross_entropy: bool = doc_field(False, "Triton fused linear + cross-entropy loss")
    adamw: bool = doc_field(False, "Triton fused AdamW with fused gradient clipping")
    flex_attention: bool = doc_field(True, "masked attention (model.doc_mask, model.attn_window) through "
                                           "FlexAttention, compiled, on CUDA; false, or on the CPU (torch has no "
                                           "FlexAttention backward there), through SDPA with a dense (T, T) mask")
    fused_grad_accum: bool = doc_field(False, "the Linears' weight gradients accumulate into fp32 in place (an "
                                              "fp32-output matmul on CUDA) and read a copy of the weights made once "
                                              "per optimizer step, not cast every micro-step (gptfast.gradaccum)")
    fp8: str = doc_field("off", "FP8 matmuls (e4m3 operands, e5m2 gradients, tensorwise scaling, torch._scaled_mm) "
                                "while training, for: off, mlp (the MLP's two Linears), head (the output "
                                "projection, inside the fused loss with kernels.cross_entropy), or head+mlp; needs "
                                "an sm_89+ GPU (Ada, Hopper) or the CPU, and Triton for the casts (gptfast.fp8)")
    loss_chunk_mib: int = doc_field(256, "cross_entropy: the fused loss holds at most this many MiB of logits at "
                                         "once (a fixed budget, which the memory planner counts: the same chunks, "
                                         "and the same fp32 summation order, on every run and every resume)")

    def validate(self, fail: Fail) -> None:
        if self.fp8 not in FP8_MODES:
            fail("kernels.fp8", f"expected one of {', '.join(FP8_MODES)}, got {self.fp8!r}")
        if self.loss_chunk_mib <= 0:
            fail("kernels.loss_chunk_mib", f"must be positive, got {self.loss_chunk_mib}")


@dataclass
class RecomputeConfig:
    policy: str = doc_field("none", "activation recomputation in backward: none, selective (recompute only "
                                    "cheap ops) or full (the whole block)")
    every: int = doc_field(1, "recompute every k-th block (1: all of them)")

    def validate(self, fail: Fail) -> None:
        if self.policy not in RECOMPUTE_POLICIES:
            fail("recompute.policy", f"expected one of {', '.join(RECOMPUTE_POLICIES)}, got {self.policy!r}")
        if self.every <= 0:
            fail("recompute.every", f"must be positive, got {self.every}")


@dataclass
class EvalConfig:
    hellaswag_interval: int = doc_field(0, "evaluate HellaSwag every this many steps (and at the end); 0: never")
    hellaswag_limit: int = doc_field(0, "the first N HellaSwag items only; 0: all 10,042 of the val split")
    hellaswag_input: str = doc_field("", "the HellaSwag val jsonl, read offline; empty: download once into "
                                         "~/.cache/gptfast")

    def validate(self, fail: Fail) -> None:
        for key in ("hellaswag_interval", "hellaswag_limit"):
            if getattr(self, key) < 0:
                fail(f"eval.{key}", "must be >= 0 (0: off / all items)")


@dataclass
class LogConfig:
    backends: tuple[str, ...] = doc_field(("jsonl",), "where metrics go: jsonl (out_dir/metrics.jsonl), tensorboard "
                                                     "(event files in out_dir/tensorboard), wandb")
    progress_seconds: float = doc_field(10.0, "a progress line within an optimizer step or an evaluation that runs "
                                              "longer than this many seconds; 0 for none")
    wandb_project: str = doc_field("gptfast", "Weights & Biases project")
    wandb_run_name: str = doc_field("", "Weights & Biases run name; empty: the name of train.out_dir")
    wandb_mode: str = doc_field("", "online, offline (no account needed; sync later) or disabled; empty: "
                                    "wandb's own default (WANDB_MODE, else online)")

    def validate(self, fail: Fail) -> None:
        for backend in self.backends:
            if backend not in LOG_BACKENDS:
                fail("log.backends", f"unknown backend {backend!r}{suggest(backend, LOG_BACKENDS)}")
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
        """Tokens per optimizer step at full batch: micro-batch x accumulation x context (a
        batch-size schedule reaches it after train.batch_warmup_steps; tokens_at(step))."""
        return self.train.micro_batch_size * self.train.grad_accum_steps * self.model.block_size

    def grad_accum_at(self, step: int) -> int:
        """Micro-batches of optimizer step `step` (0-based) under the batch-size schedule: from
        grad_accum_start, linearly to grad_accum_steps by batch_warmup_steps, in whole multiples of
        grad_accum_start. A function of the step alone, so a resumed run takes the same batches."""
        t = self.train
        if not t.grad_accum_start or step >= t.batch_warmup_steps:
            return t.grad_accum_steps
        stages = t.grad_accum_steps // t.grad_accum_start  # accumulation counts 1x .. stages x start
        return t.grad_accum_start * (1 + (stages - 1) * step // t.batch_warmup_steps)

    def tokens_at(self, step: int) -> int:
        """Tokens of optimizer step `step` (0-based)."""
        return self.train.micro_batch_size * self.grad_accum_at(step) * self.model.block_size

    def tokens_before(self, step: int) -> int:
        """Tokens of the first `step` optimizer steps: the x axis of every curve."""
        t = self.train
        warm = min(step, t.batch_warmup_steps) if t.grad_accum_start else 0
        return sum(self.tokens_at(s) for s in range(warm)) + (step - warm) * self.tokens_per_step

    def window_at(self, step: int) -> int:
        """The sliding window (tokens) of optimizer step `step` (0-based): train.window_start grown
        linearly to the final window at the last step, rounded down to a multiple of 64 tokens."""
        final, start = self.model.final_window, self.train.window_start
        last = self.train.max_steps - 1
        if not start or step >= last:
            return final
        grown = start + (final - start) * step / last
        return max(start, int(grown) // WINDOW_MULTIPLE * WINDOW_MULTIPLE)

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
        if self.train.window_start and not self.model.masked_attention:
            fail("train.window_start", "grows a sliding window: set model.attn_window (the final window), or "
                                       "model.doc_mask for masked attention over the whole context")
        if self.train.window_start > self.model.final_window:
            fail("train.window_start", f"{self.train.window_start} is longer than the final window "
                                       f"({self.model.final_window} tokens: model.attn_window, or the context)")
        if self.optim.name == "muon" and self.train.dtype == "float16":
            fail("optim.name", "muon does not run with train.dtype = float16 (its loss scaler steps one torch "
                               "optimizer); use bfloat16")


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


