"""Training memory: measure what autograd saves, predict the peak, and plan a config into a budget.

The prediction mirrors what the model keeps (see `activation_bytes_per_token`): per token and
block, the tensors autograd saves for backward under each recompute policy, counted from the
ops of Block.forward; plus weights, gradients and AdamW moments, autocast's bf16 weight copies,
the loss path (the unfused path holds fp32 log-probabilities of the whole vocabulary; the fused
kernel holds one chunk), and one block's worth of transient gradients during backward.
`measure_saved_bytes` counts the same thing on a real forward, and `measure_peak_bytes` the peak
of a whole step (the loss path's term is checked with it), which is how the formulas are checked
(tests/test_memory.py), on any device.
"""

from __future__ import annotations

import dataclasses
import gc
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from gptfast.config import RECOMPUTE_POLICIES, Config, ModelConfig, RecomputeConfig, parse_bytes
from gptfast.errors import ConfigError

# Relative cost of a training step under each policy (forward = 1/3 of forward + backward):
# "full" recomputes every recomputed block's forward; "selective" only its cheap elementwise ops.
RECOMPUTE_COST = {"none": 0.0, "selective": 0.05, "full": 1 / 3}
# A plan fits when its predicted peak of allocated bytes, plus this share for the caching
# allocator's fragmentation (reserved beyond allocated), is within the budget.
ALLOCATOR_SLACK = 0.05


def budget_bytes(text: str, source: str = "memory budget") -> int:
    try:
        return parse_bytes(text)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


# ------------------------------------------------------------------------------------------------
# Measurement


class _AliveAfterForward(TorchDispatchMode):
    """Records the storage of every op output (weakly, with where it was made); whatever is still
    alive once the forward returns is held for backward: saved tensors, checkpoint inputs, and
    the outputs selective checkpointing caches. Storages that existed before (parameters,
    inputs) are left out."""

    def __init__(self, place: list[str], existing: set[int]):
        super().__init__()
        self.place, self.existing, self.records = place, existing, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                if storage.data_ptr() not in self.existing and storage.nbytes():
                    self.records.append((weakref.ref(storage), storage.nbytes(), self.place[0]))
        return out


def measure_saved_bytes(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor,
                        autocast_dtype: torch.dtype | None = None) -> dict[str, int]:
    """Bytes one training forward leaves held for backward, by where they were made:
    "embedding", "block 0" ... "block L-1", "head" (ln_f, lm_head and loss). Works on any device.

    saved_tensors_hooks alone cannot see inside checkpointed blocks (checkpointing installs hooks of
    its own, which take precedence), so every op output is tracked and counted if it is still
    alive after the forward: exactly what autograd, checkpointing and selective checkpointing keep.
    Each storage counts once; autocast's bf16 weight copies count where they are made."""
    place = ["embedding"]
    existing = {p.untyped_storage().data_ptr() for p in model.parameters()}
    existing |= {idx.untyped_storage().data_ptr(), targets.untyped_storage().data_ptr()}
    hooks = []
    for i, block in enumerate(model.transformer.h):
        # attn's pre-hook marks the start of block i on both paths (the fused one skips Block.forward)
        hooks.append(block.attn.register_forward_pre_hook(lambda m, a, i=i: place.__setitem__(0, f"block {i}")))
    hooks.append(model.transformer.ln_f.register_forward_pre_hook(lambda m, a: place.__setitem__(0, "head")))
    hooks.append(model.lm_head.register_forward_pre_hook(lambda m, a: place.__setitem__(0, "head")))
    tracker = _AliveAfterForward(place, existing)
    try:
        with torch.autocast(idx.device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
            with tracker:
                loss = model(idx, targets)
    finally:
        for h in hooks:
            h.remove()
    loss_storage = loss.untyped_storage().data_ptr()
    gc.collect()
    seen: set[int] = set()
    by_place: dict[str, int] = {}
    for ref, nbytes, where in tracker.records:
        storage = ref()
        if storage is None or storage.data_ptr() in seen or storage.data_ptr() == loss_storage:
            continue
        seen.add(storage.data_ptr())
        by_place[where] = by_place.get(where, 0) + nbytes
    del loss
    return by_place


class _LiveBytes(TorchDispatchMode):
    """The bytes of op outputs alive at once, and their peak: each new storage is counted when an op
    makes it and uncounted when it is freed. Storages that existed before (`existing`) are left out."""

    def __init__(self, existing: set[int]):
        super().__init__()
        self.live = self.peak = 0
        self.counted = set(existing)

    def _freed(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self.counted.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if nbytes and key not in self.counted:
                    self.counted.add(key)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, nbytes)
        return out


def measure_peak_bytes(fn: Callable[[], object], existing: list[torch.Tensor] = ()) -> int:
    """The peak of bytes that torch ops allocate and hold at once while `fn()` runs (forward,
    backward, anything), on any device: what torch.cuda.max_memory_allocated would add during
    `fn`, less the allocator's rounding. Tensors in `existing` (parameters, inputs) are not counted
    even when an op returns them. Factory calls (torch.empty, torch.zeros) dispatch like any op
    and count; memory that never passes through torch's dispatcher (a numpy array) does not."""
    tracker = _LiveBytes({t.untyped_storage().data_ptr() for t in existing})
    with tracker:
        fn()
    return tracker.peak


# ------------------------------------------------------------------------------------------------
# Prediction


def activation_bytes_per_token(cfg: ModelConfig, policy: str, act_bytes: int, fused_ln: bool,
                               fp8: str = "off") -> float:
    """Bytes one block holds for backward per token. C = width, H = heads, a = activation bytes
    (2 under bf16 autocast, 4 in fp32); the residual stream is always fp32 (4 B).
    none:      the two LayerNorms' fp32 inputs (the block input and the stream after attention,
               2 x 4C) and stats (2 x 8); the matmul inputs (ln_1 and ln_2 outputs in the
               activation dtype, 2aC); q, k, v (3aC); attention's output (aC, which c_proj also
               reads) and fp32 log-sum-exp per head (4H); the c_fc output that GELU saves (4aC)
               and the GELU output that c_proj saves (4aC): 8C + 16 + 14aC + 4H.
               The modern switches (measured per switch, tests/test_memory.py):
               - rmsnorm: one fp32 stat per norm instead of two (-8); on the PyTorch path also the
                 fp32 normalised input the gain's gradient needs (+2 x 4C; the kernel keeps none);
               - rotary or qk_norm: attention saves new q and k, not views of c_attn's output (+2aC);
               - qk_norm: the fp32 1/rms per head of q and k (+8H), and under bf16 the fp32 copies
                 of q and k that F.rms_norm computes in (+8C);
               - ReLU^2 keeps the same two 4C tensors as GELU (relu's output, which the square reads).
    selective: the block's fp32 input (4C), the matmul outputs (qkv 3aC, attention's c_proj aC,
               c_fc 4aC, mlp c_proj aC) and attention's outputs (aC + 4H); LayerNorm, GELU, the
               adds and the autocast copies are recomputed: 4C + 10aC + 4H, whatever the arch.
    full:      the block's fp32 input only (4C).
    The fused-norm path keeps the same tensors: a checkpointed block there starts from the
    stream alone and recomputes its first normalisation, so `fused_ln` changes nothing in the
    count but RMSNorm's fp32 normalised input.
    Round 2's ingredients, per block (measured per switch, tests/test_memory.py):
    - embed_skip: the mix a * x + b * x0 runs outside the block, whatever the policy; its input
      stays held for a's gradient (+4C; in block 0 that input is x0, already held);
    - value_embeds, under none: the mixed values a * v + b * ve are a new tensor attention saves
      (+aC), and under bf16 the bf16 copy of ve that b's gradient reads (+2C), in the 2k blocks
      that have one: averaged over the L blocks. The lookups are in `round2_bytes_per_token`.
    - doc_mask, attn_window: with FlexAttention nothing beyond plain attention's log-sum-exp;
      SDPA's dense mask is `predict_peak`'s "attention mask" part.
    kernels.fp8 with the MLP (gptfast.fp8), under none: c_fc and c_proj save their inputs' FP8
    transposes (1 B an element) instead of their activation-dtype copies: C + 4C for aC + 4aC,
    -5(a - 1)C. Under selective and full the casts are recomputed: no change."""
    C, a = cfg.n_embd, act_bytes
    total = 4 * C if cfg.embed_skip else 0
    if policy == "none" and cfg.value_embeds:
        total += 2 * cfg.value_embeds / cfg.n_layer * (a * C + (2 * C if a == 2 else 0))
    if policy == "none" and "mlp" in fp8:
        total -= 5 * (a - 1) * C
    return total + _block_bytes_per_token(cfg, policy, a, fused_ln)


def _block_bytes_per_token(cfg: ModelConfig, policy: str, a: int, fused_ln: bool) -> float:
    C, H = cfg.n_embd, cfg.n_head
    if policy == "none":
        total = 8 * C + 16 + 14 * a * C + 4 * H
        if cfg.norm == "rmsnorm":
            total += -8 + (0 if fused_ln else 8 * C)
        if cfg.rotary or cfg.qk_norm:
            total += 2 * a * C
        if cfg.qk_norm:
            total += 8 * H + (8 * C if a == 2 else 0)
        return total
    if policy == "selective":
        return 4 * C + 10 * a * C + 4 * H
    if policy == "full":
        return 4 * C
    raise ValueError(f"unknown policy {policy!r}")


def round2_bytes_per_token(cfg: ModelConfig, policy: str, act_bytes: int) -> float:
    """Bytes per token that round 2's ingredients hold outside the blocks: each value-embedding
    table's fp32 lookup and its
    product (2 x 4C a table), except without recomputation under bf16, where the blocks' bf16
    copies are held instead (activation_bytes_per_token); and the stream entering the first
    decoder block, which the U-net skip makes new while its mirror's output stays held (4C,
    n_layer even). Measured per switch and policy, tests/test_memory.py."""
    C = cfg.n_embd
    total = 0
    if not (policy == "none" and act_bytes == 2):
        total += 8 * C * cfg.value_embeds
    if cfg.unet_skips and cfg.n_layer % 2 == 0:
        total += 4 * C
    return total


def padded_param_count(m: ModelConfig) -> int:
    """Parameters as allocated (the vocabulary padded, a tied head counted once), by formula: a
    config too large to build is still counted in no time (tests/test_memory.py holds it to the
    model's own count)."""
    C, b = m.n_embd, int(m.bias)
    norm = C if m.norm == "rmsnorm" else C + b * C
    block = (2 * norm + C * 3 * C + b * 3 * C + C * C + b * C  # ln_1, ln_2, attention in and out
             + C * 4 * C + b * 4 * C + 4 * C * C + b * C)  # MLP in and out
    embeddings = m.padded_vocab_size * C * (1 if m.tie_embeddings else 2) + (0 if m.rotary else m.block_size * C)
    embeddings += m.padded_vocab_size * C * m.value_embeds
    scalars = 2 * m.n_layer * m.embed_skip + 2 * 2 * m.value_embeds + m.n_layer // 2 * m.unet_skips
    return embeddings + m.n_layer * block + norm + scalars


def muon_param_count(m: ModelConfig) -> int:
    """The parameters Muon trains: every block's 2-D matrices (q, k, v, the attention projection,
    the MLP's two), 12 C^2 a block."""
    return 12 * m.n_embd ** 2 * m.n_layer


def optimizer_state_bytes(cfg: Config, n_params: int) -> dict[str, int]:
    """The optimizer's own state, by optimizer: AdamW's two fp32 moments (8 B a parameter); under
    Muon, one fp32 momentum buffer (4 B) for its matrices and AdamW's moments for the rest."""
    if cfg.optim.name == "muon":
        muon = muon_param_count(cfg.model)
        return {"muon momentum": 4 * muon, "adamw moments": 8 * (n_params - muon)}
    return {"adamw moments": 8 * n_params}


@dataclass
class Prediction:
    micro_batch_size: int
    grad_accum_steps: int
    policy: str
    every: int
    peak_bytes: int
    parts: dict[str, int]  # what the peak is made of
    relative_speed: float  # expected throughput relative to the fastest conceivable candidate
    modelled_seconds: float | None = None  # the step-cost model's ESTIMATE of one optimizer step on a named card


def predict_peak(cfg: Config, micro_batch_size: int, policy: str, every: int = 1,
                 act_bytes: int = 2, fused_ce: bool | None = None, fused_adamw: bool | None = None,
                 n_params: int | None = None) -> Prediction:
    """Predicted torch.cuda.max_memory_allocated for training `cfg` at this micro-batch and
    recompute policy (every k-th block recomputed; the rest keep everything)."""
    m = cfg.model
    fused_ce = cfg.kernels.cross_entropy if fused_ce is None else fused_ce
    fused_adamw = cfg.kernels.adamw if fused_adamw is None else fused_adamw
    tokens = micro_batch_size * m.block_size
    n_params = n_params or padded_param_count(m)
    recomputed = 0 if policy == "none" else len(range(0, m.n_layer, every))
    fp8 = cfg.kernels.fp8
    ln = cfg.kernels.layernorm
    per_token = (recomputed * activation_bytes_per_token(m, policy, act_bytes, ln, fp8)
                 + (m.n_layer - recomputed) * activation_bytes_per_token(m, "none", act_bytes, ln, fp8))
    vocab = m.vocab_size
    # kernels.fp8: the weights its matmuls read in FP8 have no bf16 copy (autocast's, or
    # fused_grad_accum's); each has an e4m3 copy and its transpose (1 B a weight each): both kept
    # from step to step with fused_grad_accum, else made at each forward, the transpose saved for
    # backward
    fp8_params = (8 * m.n_embd ** 2 * m.n_layer if "mlp" in fp8 else 0) \
        + (m.padded_vocab_size * m.n_embd if "head" in fp8 else 0)
    autocast_copies = n_params - fp8_params
    head_input = 1 if "head" in fp8 and not fused_ce else act_bytes  # FP8: ln_f's output saved as e4m3
    parts = {
        "weights + grads": 8 * n_params,
        **optimizer_state_bytes(cfg, n_params),
        "bf16 weight copies": 2 * autocast_copies if act_bytes == 2 else 0,
        "activations": int(per_token * tokens),
        # embedding output + ln_f input (fp32 stream), ln_f output for the head matmul (and
        # RMSNorm's fp32 normalised input on the PyTorch path)
        "embedding + head": int(tokens * (4 * m.n_embd * 2 + head_input * m.n_embd + 16
                                          + (4 * m.n_embd if m.norm == "rmsnorm" and not ln else 0))),
    }
    if fp8_params:
        parts["fp8 weight copies"] = fp8_params * (2 if cfg.kernels.fused_grad_accum else 1)
    if m.embed_skip or m.unet_skips or m.value_embeds:
        parts["round-2 streams"] = int(tokens * round2_bytes_per_token(m, policy, act_bytes))
    if m.masked_attention and not cfg.kernels.flex_attention:
        # SDPA's dense mask: the bool (B or 1, 1, T, T) once, and in each block that keeps its
        # activations, the fp32 additive mask SDPA converts it into (measured on the CPU, which
        # trains in fp32; kernels.flex_attention = false on CUDA is not measured)
        mask_batch = micro_batch_size if m.doc_mask else 1
        kept_blocks = m.n_layer - recomputed
        parts["attention mask"] = mask_batch * m.block_size ** 2 * (1 + 4 * kept_blocks)
    if fused_ce:
        # one chunk of logits (in place, also its gradient), grad_hidden, fp32 grad_weight
        chunk = min(tokens * vocab * act_bytes, cfg.kernels.loss_chunk_mib * 2**20)
        parts["loss"] = chunk + tokens * m.n_embd * act_bytes + vocab * m.n_embd * 4
        if "head" in fp8:
            # a chunk's e4m3 rows and their transpose, its logits' gradient in e5m2 and its
            # transpose (1 B each), and each chunk's fp32 weight-gradient product before it is added
            rows = chunk // (vocab * act_bytes)
            parts["loss"] += 2 * rows * (m.n_embd + m.padded_vocab_size) \
                + (m.padded_vocab_size * m.n_embd * 4 if tokens > rows else 0)  # a second chunk's product
    else:
        # The peak is in the log-softmax's backward: three fp32 (tokens, V_pad) tensors at once (the
        # log-probabilities saved by the forward, their gradient, the input's gradient), whatever the
        # activation dtype (autocast hands cross_entropy fp32 logits); a soft cap also keeps its
        # fp32 tanh for backward: 12 (+ 4) bytes per token and class (measured on the model's own
        # loss path: tests/test_memory.py).
        parts["loss"] = tokens * m.padded_vocab_size * (12 + (4 if m.logit_softcap else 0))
    # Backward of one block: gradients of its saved activations, plus a recomputed block's
    # activations when it is recomputed.
    parts["backward transient"] = int(tokens * activation_bytes_per_token(m, "none", act_bytes, cfg.kernels.layernorm))
    if cfg.optim.name == "muon":
        # Muon's step holds every matrix's fp32 update at once, then per shape one stacked fp32
        # batch, its fp32 result and about five Newton-Schulz iterates alive at once (bf16 on CUDA,
        # fp32 on the CPU, as act_bytes): 8 + 5a B per parameter of the largest shape group (q, k,
        # v and the projections, 4 L C^2). Measured on the CPU (tests/test_memory.py); the bf16
        # figure is the same count, not yet measured on a GPU.
        parts["optimizer transient"] = (4 * muon_param_count(m)
                                        + (8 + 5 * act_bytes) * 4 * m.n_layer * m.n_embd ** 2)
    elif not fused_adamw:
        parts["optimizer transient"] = 4 * max(p for p in (m.padded_vocab_size * m.n_embd, 4 * m.n_embd ** 2))
    peak = sum(parts.values())
    # Expected speed: recompute cost, and efficiency growing with the tokens per micro-batch as
    # fixed per-micro-step costs (launches, Python, small-matmul tails) are amortised; half speed at
    # 1024 tokens is a heuristic, not yet calibrated on a GPU.
    recompute = RECOMPUTE_COST[policy] * recomputed / m.n_layer
    efficiency = 1.0 / (1.0 + 1024.0 / tokens)
    speed = efficiency / (1.0 + recompute)
    accum = cfg.tokens_per_step // tokens
    return Prediction(micro_batch_size, accum, policy, every, int(peak), parts, speed)


MAX_MICRO_BATCH = 64  # sequences; beyond this a 124M-350M model gains nothing from a larger micro-batch


def candidates(cfg: Config, act_bytes: int = 2) -> list[Prediction]:
    """Every power-of-two micro-batch up to MAX_MICRO_BATCH that divides the configured sequences
    per optimizer step (under a batch-size schedule, those of its first, smallest step: every
    later stage is a multiple of it), under every policy."""
    total_sequences = cfg.train.micro_batch_size * (cfg.train.grad_accum_start or cfg.train.grad_accum_steps)
    sizes = [b for b in range(1, min(total_sequences, MAX_MICRO_BATCH) + 1)
             if total_sequences % b == 0 and b & (b - 1) == 0] or [1]
    n_params = padded_param_count(cfg.model)  # once, not per candidate
    return [predict_peak(cfg, b, policy, act_bytes=act_bytes, n_params=n_params) for b in sizes for policy in RECOMPUTE_POLICIES]


def fits(candidate: Prediction, budget_bytes: int) -> bool:
    return candidate.peak_bytes * (1 + ALLOCATOR_SLACK) <= budget_bytes


@dataclass
class Plan:
    choice: Prediction
    considered: list[Prediction]
    budget_bytes: int
    card: str | None = None  # the card the step-cost model timed the candidates for
    tokens_per_sequence: int = 0  # the context: tokens per step = micro-batch x accumulation x this


def plan(cfg: Config, budget_bytes: int, act_bytes: int = 2, card: str | None = None) -> Plan:
    """The fastest candidate whose predicted peak fits the budget; tokens per step are kept.
    A budget nothing fits in is a ConfigError naming the smallest budget that would work.
    act_bytes: 2 for bf16 / fp16 autocast (CUDA), 4 for fp32. card: time every candidate with the
    step-cost model (gptfast.stepcost) for that card and choose by its ESTIMATE; without it, by
    relative_speed's rule of thumb."""
    considered = candidates(cfg, act_bytes)
    if card:
        from gptfast.hardware import card_of
        from gptfast.stepcost import plan_times

        card = card_of(card).name
        times = plan_times(cfg, sorted({c.micro_batch_size for c in considered}),
                           list(dict.fromkeys(c.policy for c in considered)), card)
        considered = [dataclasses.replace(c, modelled_seconds=times[(c.micro_batch_size, c.policy)]) for c in considered]
    fitting = [c for c in considered if fits(c, budget_bytes)]
    if not fitting:
        smallest = min(considered, key=lambda c: c.peak_bytes)
        raise ConfigError(
            f"memory budget {format_bytes(budget_bytes)}: no micro-batch and recompute policy fits this model; "
            f"the smallest plan (micro-batch {smallest.micro_batch_size}, recompute {smallest.policy}) needs "
            f"{format_bytes(smallest.peak_bytes * (1 + ALLOCATOR_SLACK))}")
    if card:
        best = min(fitting, key=lambda c: (c.modelled_seconds, -c.micro_batch_size))
    else:
        best = max(fitting, key=lambda c: (c.relative_speed, c.micro_batch_size))
    return Plan(best, considered, budget_bytes, card, cfg.model.block_size)


def apply_plan(cfg: Config, chosen: Prediction) -> Config:
    """`cfg` with the plan's micro-batch, accumulation and recomputation (and the batch-size
    schedule's first accumulation, at the same tokens)."""
    t = cfg.train
    start = t.grad_accum_start * t.micro_batch_size // chosen.micro_batch_size
    return replace(cfg,
                   train=replace(t, micro_batch_size=chosen.micro_batch_size, grad_accum_steps=chosen.grad_accum_steps,
                                 grad_accum_start=start),
                   recompute=RecomputeConfig(policy=chosen.policy, every=chosen.every))


def format_plan(p: Plan, log: Callable[[str], None] = print) -> None:
    fastest = max(c.relative_speed for c in p.considered)
    log(f"memory plan for a budget of {format_bytes(p.budget_bytes)} (a plan fits when its predicted peak "
        f"+ {ALLOCATOR_SLACK:.0%} allocator slack does):")
    timed = p.card is not None
    if timed:
        log(f"modelled step times on an {p.card} are ESTIMATES of the step-cost model (gptfast.stepcost; "
            "efficiencies in gptfast.hardware), not measurements")
    speed = f" {'step s (est.)':>13} {'tokens/s (est.)':>15}" if timed else f" {'speed':>6}"
    log(f"  {'micro-batch':>11} {'accum':>6} {'recompute':>13} {'predicted peak':>15}{speed}  fits")
    for c in sorted(p.considered, key=lambda c: (c.micro_batch_size, RECOMPUTE_POLICIES.index(c.policy))):
        mark = "  <- chosen" if c is p.choice else ""
        tokens = c.micro_batch_size * c.grad_accum_steps * p.tokens_per_sequence
        speed = (f" {c.modelled_seconds:>13.2f} {tokens / c.modelled_seconds:>15,.0f}" if timed
                 else f" {c.relative_speed / fastest:>6.2f}")
        log(f"  {c.micro_batch_size:>11} {c.grad_accum_steps:>6} {c.policy:>13} {format_bytes(c.peak_bytes):>15}"
            f"{speed}  {'yes' if fits(c, p.budget_bytes) else 'no'}{mark}")
    parts = ", ".join(f"{k} {format_bytes(v)}" for k, v in p.choice.parts.items())
    log(f"chosen: micro-batch {p.choice.micro_batch_size} x {p.choice.grad_accum_steps} accumulation, "
        f"recompute {p.choice.policy}; predicted peak {format_bytes(p.choice.peak_bytes)} ({parts})")
