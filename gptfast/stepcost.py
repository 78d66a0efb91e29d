"""The step-cost model: what one training step of a config computes and moves, counted on a CPU,
and the time that would take on a named card: an ESTIMATE, labelled so wherever it is printed.

`count_step` builds the config's model at its real shapes over fake tensors (no memory, no
arithmetic: GPT-2 medium counts in seconds on a CPU) and runs two micro-steps (forward and
backward, bf16 autocast as on a GPU) and one optimizer step under a dispatch mode that sees every
ATen op. Matmuls and attention are counted in FLOPs (2 per multiply-add, from the operands'
shapes), every other op in the bytes it reads and writes (its tensor operands and results; views
move nothing), grouped by what they are (CATEGORIES). The second micro-step is the steady state
(the first has no gradient to accumulate into), so a step is accumulation x it + the optimizer.

The byte count is op by op, as PyTorch's eager kernels move them: fusion (torch.compile's, or
gptfast's Triton kernels, which run through their custom ops' fake implementations here) is
visible as fewer bytes in its category. `modelled_time` turns the counts into seconds from a
card's peak and bandwidth (`gptfast.hardware.CARDS`) at the efficiencies stated there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from gptfast.config import Config
from gptfast.errors import ConfigError

CATEGORIES = ("matmuls", "fp8 matmuls", "attention", "norms", "loss", "weight casts", "fp8 casts", "gradient accumulation",
              "other elementwise", "optimizer")
MATMULS = {"mm", "addmm", "bmm", "baddbmm", "addbmm", "matmul", "_scaled_mm"}
COMPUTE_BOUND = ("matmuls", "fp8 matmuls", "attention")  # timed by their FLOPs alone
NORMS = ("layer_norm", "rms_norm", "gptfast::layernorm", "gptfast::add_norm", "gptfast::norm")
LOSS = ("log_softmax", "nll_loss", "cross_entropy", "gptfast::cross_entropy", "gptfast::linear_cross_entropy")
ATTENTION = ("scaled_dot_product", "flex_attention")
WRITE_ONLY = {"copy_", "zero_", "fill_"}  # in-place ops that do not read their destination
FREE = {"detach", "alias", "lift_fresh", "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
        "device", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "set_"}


@dataclass
class Counts:
    """FLOPs, bytes and kernels (ops that move or compute something) per category."""

    flops: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    # matmul FLOPs each divided by its size_efficiency: the time model's work
    work: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    bytes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0.0))
    kernels: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CATEGORIES, 0))

    def scaled(self, k: float) -> Counts:
        return Counts(*({c: v * k for c, v in part.items()} for part in (self.flops, self.work, self.bytes)),
                      {c: round(v * k) for c, v in self.kernels.items()})

    def __add__(self, other: Counts) -> Counts:
        return Counts(*({c: mine[c] + theirs[c] for c in CATEGORIES} for mine, theirs in
                        ((self.flops, other.flops), (self.work, other.work), (self.bytes, other.bytes),
                         (self.kernels, other.kernels))))


@dataclass
class StepCost:
    """One micro-step in the steady state, one optimizer step, and the accumulation between."""

    micro: Counts
    optimizer: Counts
    grad_accum_steps: int
    tokens_per_step: int

    @property
    def step(self) -> Counts:
        return self.micro.scaled(self.grad_accum_steps) + self.optimizer


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _op_name(func) -> str:
    name = func.name() if hasattr(func, "name") else str(func)  # "aten::mm.default", "gptfast::norm"
    return name.split(".")[0]


def _matmul_shape(name: str, args) -> tuple[float, int]:
    """(FLOPs, smallest of M, N, K) of a matmul op."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if name in ("aten::addmm", "aten::baddbmm", "aten::addbmm"):
        a, b = tensors[1], tensors[2]
    else:
        a, b = tensors[0], tensors[1]
    batch = math.prod(a.shape[:-2]) if a.dim() > 2 else 1
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    return 2.0 * batch * m * k * n, min(m, k, n)


def size_efficiency(smallest_dim: int) -> float:
    """The share of a matmul's sustained rate a GEMM this thin reaches (an assumed curve: half at
    MATMUL_HALF_DIM, 0.86 at 768, 0.89 at 1024): thin GEMMs (a small micro-batch's rows, the
    optimizer's) fill fewer tiles."""
    from gptfast.hardware import MATMUL_HALF_DIM

    return smallest_dim / (smallest_dim + MATMUL_HALF_DIM)


def _attention_flops(func, args, kwargs) -> float:
    """SDPA forward: QK^T and PV, 4 B H T S D (half under a causal mask); backward 2.5 x that
    (FlashAttention's backward recomputes the scores: 5 matmuls of the forward's 2)."""
    named = {a.name: v for a, v in zip(func._schema.arguments, args)} | kwargs
    q, k = named["query"], named["key"]
    b, h, t, d = q.shape[0], q.shape[1], q.shape[-2], q.shape[-1]
    flops = 4.0 * b * h * t * k.shape[-2] * d
    if named.get("is_causal"):
        flops /= 2
    return flops * (2.5 if "backward" in _op_name(func) else 1.0)


def _linear_cross_entropy(func, args, kwargs) -> tuple[str, float, float, float, float]:
    """(matmul category, FLOPs, work, bytes, FP8 cast bytes) of gptfast's fused linear +
    cross-entropy ops, whose matmuls run inside them (chunk by chunk): the logits h W^T, and with
    the gradients grad_h = g W and grad_W = g^T h; each chunk's logits written once by the matmul,
    read and rewritten by the loss kernel, read by the two gradient matmuls. With the weight's FP8
    copies (kernels.fp8 "head") the matmuls are FP8 ones, and each chunk casts its hidden rows (read
    twice, written twice: with the transpose) and, with the gradients, its logits' gradient (the
    same) through kernels/fp8.py; the FP8 operands are read instead of the bf16 ones."""
    named = {a.name: v for a, v in zip(func._schema.arguments, args)} | kwargs
    hidden, weight = named["hidden"], named["weight"]
    n, c, v = hidden.shape[0], hidden.shape[1], weight.shape[0]
    grads = named.get("want_grads", True) and named.get("reduction", "none") != "none" or "bwd" in _op_name(func)
    flops = 2.0 * n * v * c * (3 if grads else 1)
    item = torch.empty((), dtype=named.get("compute_dtype", torch.bfloat16)).element_size()
    logits = n * v * item * (5 if grads else 3)
    work = flops / size_efficiency(min(n, c, v))
    if named.get("weight_fp8") is None:
        return "matmuls", flops, work, logits + _nbytes(hidden) + _nbytes(weight), 0.0
    casts = n * c * (2 * hidden.element_size() + 2) + (n * v * (2 * item + 2) if grads else 0)
    # the GEMMs' 1 B operands: the rows (and their transpose), the weight's copy (and its transpose),
    # and with the gradients the logits' gradient and its transpose
    operands = (n * c + v * c) * (2 if grads else 1) + (2 * n * v if grads else 0)
    return "fp8 matmuls", flops, work, logits + operands, casts


CUSTOM_MATMULS = {"gptfast::linear_cross_entropy_fwd": _linear_cross_entropy,
                  "gptfast::linear_cross_entropy_fwd_into": _linear_cross_entropy,
                  "gptfast::linear_cross_entropy_bwd_rows": _linear_cross_entropy}


class _Counter(TorchDispatchMode):
    """Adds every op's FLOPs or bytes to `counts` under the category `phase` or the op's kind."""

    def __init__(self, grads: set[int], params: set[int]):
        super().__init__()
        self.counts = Counts()
        self.phase: str | None = None  # "optimizer" while the optimizer steps
        self.grads, self.params = grads, params  # ids of the parameters' .grad tensors, and of the parameters
        self.param_shapes: set[tuple[int, ...]] = set()  # the parameters' shapes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _op_name(func)
        short = name.split("::")[-1]
        if getattr(func, "is_view", False) or short in FREE or short.startswith("_to_dense"):
            return out
        inputs = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        outputs = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        moved = sum(_nbytes(t) for t in inputs) + sum(_nbytes(t) for t in outputs)
        if short in WRITE_ONLY and inputs:  # the destination is written (the result), never read
            moved -= _nbytes(inputs[0])
        flops, work = 0.0, 0.0
        if name in CUSTOM_MATMULS:  # its matmuls as matmuls, the rest of its traffic as the loss's
            matmuls, flops, work, loss_bytes, cast_bytes = CUSTOM_MATMULS[name](func, args, kwargs)
            self.counts.flops[matmuls] += flops
            self.counts.work[matmuls] += work
            self.counts.bytes["loss"] += loss_bytes + moved
            self.counts.kernels["loss"] += 1
            if cast_bytes:
                self._add("fp8 casts", 0.0, 0.0, cast_bytes)
            return out
        if name == "gptfast::fp8_cast":  # kernels/fp8.py: the amax pass reads the input once more
            self._add(self.phase or "fp8 casts", 0.0, 0.0, moved + _nbytes(inputs[0]))
            return out
        if name == "gptfast::accumulate_grad":  # an FP8 weight gradient added into its fp32 buffer
            self._add(self.phase or "gradient accumulation", 0.0, 0.0, moved + _nbytes(inputs[0]))
            return out
        if name == "gptfast::accumulate_weight_grad":
            # an fp32-output GEMM whose epilogue adds into the buffer (kernels.fused_grad_accum):
            # its 8 bytes per weight are the matmul's, whose time is its FLOPs
            main_grad, grad_out, x = args[:3]
            flops = 2.0 * grad_out.shape[0] * grad_out.shape[1] * x.shape[1]
            self._add(self.phase or "matmuls", flops, flops / size_efficiency(min(*grad_out.shape, x.shape[1])),
                      moved + _nbytes(main_grad))
            return out
        if short in MATMULS:
            flops, smallest = _matmul_shape(name, args)
            work = flops / size_efficiency(smallest)
            category = self.phase or ("fp8 matmuls" if short == "_scaled_mm" else "matmuls")
        elif self.phase:
            category = self.phase
        elif any(key in name for key in ATTENTION):
            category, flops = "attention", _attention_flops(func, args, kwargs)
            work = flops
        elif any(key in name for key in NORMS):
            category = "norms"
        elif any(key in name for key in LOSS):
            category = "loss"
        elif short == "_to_copy" and inputs and (id(inputs[0]) in self.params or (
                outputs and tuple(outputs[0].shape) in self.param_shapes and outputs[0].dtype == torch.float32
                and inputs[0].dtype != torch.float32)):  # a weight's cast, or its gradient's cast back
            category = "weight casts"
        elif short in ("add_", "copy_") and inputs and id(inputs[0]) in self.grads:
            category = "gradient accumulation"
        else:
            category = "other elementwise"
        self._add(category, flops, work, moved)
        return out

    def _add(self, category: str, flops: float, work: float, moved: float) -> None:
        self.counts.flops[category] += flops
        self.counts.work[category] += work
        self.counts.bytes[category] += moved
        self.counts.kernels[category] += 1


def count_step(cfg: Config, micro_batch_size: int | None = None, policy: str | None = None,
               every: int | None = None, amp_dtype: torch.dtype | None = torch.bfloat16) -> StepCost:
    """The counted cost of one training step of `cfg` (its model, optimizer and kernels), at
    micro-batch `micro_batch_size` and recompute `policy` / `every` (default: the config's), the
    accumulation keeping the config's tokens per step. amp_dtype None: fp32, no autocast."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gptfast.gradaccum import GradAccumulation
    from gptfast.model import GPT
    from gptfast.optim import build_optimizer

    t = cfg.train
    b = micro_batch_size or t.micro_batch_size
    sequences = t.micro_batch_size * t.grad_accum_steps
    recompute = dataclasses.replace(cfg.recompute, policy=policy or cfg.recompute.policy,
                                    every=every or cfg.recompute.every)
    kernels = dataclasses.replace(cfg.kernels, adamw=False, flex_attention=False)
    with FakeTensorMode(allow_non_fake_inputs=True), torch.device("cpu"):
        torch.manual_seed(0)
        model = GPT(cfg.model, kernels, recompute)
        model.loss_grad_scale = 1.0  # as the trainer promises the fused loss its upstream gradient (here 1)
        optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"), triton_adamw=False)
        x = torch.randint(0, cfg.model.vocab_size, (b, cfg.model.block_size))
        params = list(model.parameters())
        counter = _Counter(set(), {id(p) for p in params})
        counter.param_shapes = {tuple(p.shape) for p in params}
        # kernels.fused_grad_accum: the weight copies are made once per optimizer step (after the
        # update), the buffers zeroed once: both counted with the optimizer step, in their categories
        accumulation = GradAccumulation(model, amp_dtype) if cfg.kernels.fused_grad_accum else None
        per_step = Counts()
        if accumulation:
            for phase, work in (("weight casts", accumulation.refresh),
                                ("gradient accumulation", accumulation.begin_step)):
                counter.counts, counter.phase = Counts(), phase
                with counter:
                    work()
                per_step = per_step + counter.counts
            counter.phase = None
        micro = []
        for _ in range(2):
            counter.counts = Counts()
            counter.grads = {id(p.grad) for p in params if p.grad is not None}
            with counter:
                amp = torch.autocast("cpu", dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with amp:
                    loss = model(x, x)
                loss.backward()
            micro.append(counter.counts)
        counter.counts, counter.phase = Counts(), "optimizer"
        with counter, torch.no_grad():
            optimizer.step()
        optimizer_counts = counter.counts + per_step
    return StepCost(micro[1], optimizer_counts, max(1, sequences // b), sequences * cfg.model.block_size)


def modelled_time(cost: StepCost, card: str) -> dict[str, float]:
    """ESTIMATED seconds per category of one optimizer step on `card` (gptfast.hardware.CARDS):
    matmuls at the card's peak x MATMUL_EFFICIENCY x size_efficiency (FP8 ones at its FP8 peak; a
    card without FP8 cannot run them: ConfigError), attention at x ATTENTION_EFFICIENCY, every
    other op at its bandwidth x MEMORY_EFFICIENCY, each kernel at least KERNEL_OVERHEAD_S."""
    from gptfast.hardware import ATTENTION_EFFICIENCY, KERNEL_OVERHEAD_S, MATMUL_EFFICIENCY, MEMORY_EFFICIENCY, card_of

    spec = card_of(card)
    step = cost.step
    if step.flops["fp8 matmuls"] and not spec.fp8_flops:
        raise ConfigError(f"--device {spec.name!r}: this step has FP8 matmuls, and the card has no FP8 tensor cores")
    rates = {"fp8 matmuls": (spec.fp8_flops or spec.peak_flops) * MATMUL_EFFICIENCY,
             "attention": spec.peak_flops * ATTENTION_EFFICIENCY}
    seconds = {}
    for c in CATEGORIES:
        compute = step.work[c] / rates.get(c, spec.peak_flops * MATMUL_EFFICIENCY)
        memory = step.bytes[c] / (spec.bandwidth * MEMORY_EFFICIENCY)
        seconds[c] = (compute if c in COMPUTE_BOUND else max(compute, memory)) + step.kernels[c] * KERNEL_OVERHEAD_S
    return seconds


def plan_times(cfg: Config, sizes: list[int], policies: list[str], card: str) -> dict[tuple[int, str], float]:
    """ESTIMATED seconds per optimizer step on `card` for each (micro-batch, policy), tokens per
    step kept. Counted at micro-batches 1 and 2 per policy and extended linearly (every count is
    affine in the micro-batch: weight casts, accumulation and the optimizer per micro-step or
    step, everything else per token; exact while micro-batch x context exceeds the model width,
    where size_efficiency would see the rows)."""
    out = {}
    sequences = cfg.train.micro_batch_size * cfg.train.grad_accum_steps
    for policy in policies:
        one, two = count_step(cfg, 1, policy), count_step(cfg, 2, policy) if sequences > 1 else None
        for b in sizes:
            micro = one.micro if two is None else one.micro + (two.micro + one.micro.scaled(-1)).scaled(b - 1)
            cost = StepCost(micro, one.optimizer, max(1, sequences // b), one.tokens_per_step)
            out[(b, policy)] = sum(modelled_time(cost, card).values())
    return out
