"""GPT-2, as OpenAI built it: pre-LN blocks, learned position embeddings, tanh-GELU MLP,
token embedding tied to the lm_head. With `model.arch = "modern"`, the architecture of the public
speedruns (modded-nanogpt's records): rotary positions, RMSNorm on the stream and on queries and
keys, a squared-ReLU MLP, an untied head, zero-initialised projections into the stream and a tanh
soft cap on the logits; each is a switch of ModelConfig.

References: Radford et al. 2019 (GPT-2), Karpathy's nanoGPT model.py; Su et al. 2021 (rotary),
Zhang & Sennrich 2019 (RMSNorm), Dehghani et al. 2023 (QK-norm), So et al. 2021 (ReLU^2),
Gemma 2 (logit soft cap). Attention goes through `F.scaled_dot_product_attention(is_causal=True)`,
which picks the flash backend on CUDA.

`model.arch = "modern2"` adds round 2 of the speedruns' ingredients (modded-nanogpt records 9-18),
each a switch too: every block's input a learned mix of the stream and the initial embedding
(embed_skip), U-net skips from the first half's blocks into their mirrors (unet_skips), extra
token-embedding tables mixed into the attention values of the first and last blocks
(value_embeds), attention masked to the document and to a sliding window (doc_mask,
attn_window: FlexAttention on CUDA, SDPA with a dense mask elsewhere), and soft cap 15.
"""

from __future__ import annotations

import contextlib
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from gptfast.config import KernelsConfig, ModelConfig, RecomputeConfig
from gptfast.gradaccum import Linear

aten = torch.ops.aten
# Selective recomputation keeps the outputs of these (matmuls, attention: costly to recompute) and
# recomputes everything else in a recomputed block (LayerNorm, GELU, adds, dropout: cheap).
# Attention ops differ by backend and version, so only those this torch has are listed.
SAVED_OPS = frozenset(getattr(aten, name).default for name in (
    "mm", "addmm", "bmm", "_scaled_mm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) if hasattr(aten, name))


# RMSNorm's epsilon (on the stream and on queries and keys); LayerNorm keeps torch's 1e-5.
RMS_NORM_EPS = 1e-6


# FlexAttention's tile: the block mask marks each (128 queries x 128 keys) tile as skipped, full, or
# partly masked (only those evaluate the mask per element).
FLEX_BLOCK = 128


def document_ids(idx: torch.Tensor, eot_token: int) -> torch.Tensor:
    """(B, T) token ids -> (B, T) document numbers: an end-of-text token opens the document after
    it (it closes the previous one in the token files, and stands as the next one's first token,
    as at the start of a sampled text), so position t's document counts the EOTs up to t."""
    return (idx == eot_token).cumsum(dim=1)


def attention_mask(query_pos: torch.Tensor, n_keys: int, window: torch.Tensor | int,
                   docs: torch.Tensor | None) -> torch.Tensor:
    """Which keys each query attends to: (B or 1, 1, Tq, n_keys) bool, True = attend. Query i sits
    at position query_pos[i]; keys at positions 0 .. n_keys - 1. Causal, within the last `window`
    positions (the query's own included), and, given docs ((B, n_keys) document numbers), within
    the query's document. The diagonal is always kept, so no row is empty."""
    q = query_pos[:, None]  # (Tq, 1)
    k = torch.arange(n_keys, device=query_pos.device)[None, :]  # (1, Tk)
    keep = (k <= q) & (q - k < window)  # (Tq, Tk)
    if docs is not None:
        keep = keep & (docs[:, query_pos, None] == docs[:, None, :])  # (B, Tq, Tk)
    return keep.expand(docs.size(0) if docs is not None else 1, -1, -1)[:, None]  # (B, 1, Tq, Tk)


def block_mask_from_dense(keep: torch.Tensor, mask_mod, block: int = FLEX_BLOCK) -> BlockMask:
    """A FlexAttention BlockMask of a dense (B, 1, T, T) mask: each tile of `block` x `block` is
    skipped (nothing kept), full (all kept: no mask evaluated) or partial (mask_mod decides per
    element). Built with tensor ops only, so it compiles, and on the CPU too (create_block_mask's
    vmap over a mask_mod takes seconds per call there)."""
    B, T = keep.size(0), keep.size(-1)
    n = -(-T // block)
    padded = F.pad(keep[:, 0], (0, n * block - T, 0, n * block - T))  # (B, n*bs, n*bs), padding not kept
    tiles = padded.view(B, n, block, n, block)
    any_kept, all_kept = tiles.any(dim=4).any(dim=2), tiles.all(dim=4).all(dim=2)  # (B, nq, nk)

    def listed(tile_kept: torch.Tensor):
        """(counts (B, 1, nq) int32, indices (B, 1, nq, nk) int32: the kept tiles first, in order)."""
        counts = tile_kept.sum(dim=-1, dtype=torch.int32)
        order = torch.argsort(tile_kept.to(torch.int8), dim=-1, descending=True, stable=True)
        return counts[:, None], order.to(torch.int32)[:, None]

    return BlockMask.from_kv_blocks(*listed(any_kept & ~all_kept), *listed(all_kept), BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(T, T))


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process: uncompiled, it materialises the whole score matrix."""
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask, dropout_p: float, is_causal: bool):
    """Attention of (B, nh, Tq, hs) queries over (B, nh, Tk, hs) keys and values: plain causal
    SDPA when `mask` is None, SDPA with a dense bool mask (attention_mask), or FlexAttention with a
    BlockMask (block_mask_from_dense)."""
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=is_causal)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    flex = compiled_flex_attention() if q.device.type == "cuda" else flex_attention
    return flex(q, k, v, block_mask=mask)


def attended_fraction(query_len: int, window: int) -> float:
    """The share of a causal attention's (query, key) pairs a sliding window of `window` keeps."""
    kept = sum(min(p + 1, window) for p in range(query_len))
    return kept / (query_len * (query_len + 1) / 2)


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def call_block(recompute: str, fn, *args):
    """fn(*args) for one block, through torch's activation checkpointing under recompute "full"
    (all of it recomputed in backward) or "selective" (its cheap ops only); "none" keeps every
    activation. Dropout masks are the same in the recomputation (the RNG state is kept). Under
    regional compilation (GPT.compile_blocks) this is the compiled function, so the checkpoint is
    traced with the block and selective recomputation keeps its meaning."""
    if recompute == "none":
        return fn(*args)
    if recompute == "selective":
        context_fn = functools.partial(create_selective_checkpoint_contexts, _selective_policy)
        return checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn)
    return checkpoint(fn, *args, use_reentrant=False)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """The residual stream's normalisation: LayerNorm (GPT-2) or RMSNorm with a gain, no bias."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=RMS_NORM_EPS)
    return nn.LayerNorm(cfg.n_embd, bias=cfg.bias)


def rotary_tables(cfg: ModelConfig, start: int, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (length, head_dim / 2) fp32, for positions start .. start + length - 1:
    channel pair i of a head turns by position * base^(-2i / head_dim) (Su et al. 2021)."""
    half = cfg.head_dim // 2
    inv_freq = cfg.rotary_base ** (-torch.arange(half, device=device, dtype=torch.float32) / half)  # (hs/2,)
    angles = torch.arange(start, start + length, device=device, dtype=torch.float32)[:, None] * inv_freq  # (T, hs/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate (B, T, nh, hs) queries or keys by their positions: the first and second halves of a
    head are the pairs' two coordinates (the GPT-NeoX layout). In fp32, returned in x's dtype."""
    cos, sin = (t[:, None, :] for t in rope)  # (T, 1, hs/2): one angle per position and pair, every head
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, nh, hs/2) each
    return torch.cat((x1 * cos + x2 * sin, x2 * cos - x1 * sin), dim=-1).type_as(x)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.qk_norm = cfg.qk_norm
        self.dropout = cfg.dropout
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.ve_mix = None  # (2,): v -> ve_mix[0] * v + ve_mix[1] * ve, in blocks given a value embedding

    def forward(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None = None,
                start: int = 0, rope: tuple[torch.Tensor, torch.Tensor] | None = None, mask=None,
                ve: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C). With a KV cache (two (B, nh, block_size, hs) buffers), this
        call's keys and values are written at positions start.. and attention reads every cached
        position before them: a prompt is one call from start 0, then one call per new token.
        `rope`: the rotary tables of this call's positions (rotary_tables), or None. `mask`: None
        (causal), a dense bool mask or a BlockMask (`attend`). `ve`: this block's value embedding
        of the tokens (B, T, C), or None."""
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        if ve is not None:
            v = self.ve_mix[0] * v + self.ve_mix[1] * ve.type_as(v)
        q, k, v = (t.view(B, T, self.n_head, hs) for t in (q, k, v))  # (B, T, nh, hs)
        if self.qk_norm:
            q, k = F.rms_norm(q, (hs,), eps=RMS_NORM_EPS), F.rms_norm(k, (hs,), eps=RMS_NORM_EPS)
        if rope is not None:  # keys are cached rotated: a position's rotation never changes
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        is_causal = True
        if cache is not None:
            k_cache, v_cache = cache
            k_cache[:, :, start:start + T] = k
            v_cache[:, :, start:start + T] = v
            k, v = k_cache[:, :, :start + T], v_cache[:, :, :start + T]  # (B, nh, start + T, hs)
            # a prompt (start 0) is causal within itself; a single new token sees all that precedes it
            is_causal = T > 1
            if T > 1 and start:
                raise ValueError("a KV cache takes a prompt at position 0, then one token at a time")
        dropout_p = self.dropout if self.training else 0.0
        y = attend(q, k, v, mask, dropout_p, is_causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.relu2 = cfg.mlp == "relu2"
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.c_fc(x)  # (B, T, 4C)
        # ReLU^2 (Primer); GPT-2 was trained with the tanh approximation of GELU, and the exact erf
        # form drifts from it.
        h = F.relu(h).square() if self.relu2 else F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = make_norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        # embed_skip: the block's input is embed_mix[0] * x + embed_mix[1] * x0 (GPT._block_input)
        self.embed_mix = nn.Parameter(torch.tensor([1.0, 0.0])) if cfg.embed_skip else None

    def forward(self, x: torch.Tensor, cache=None, start: int = 0, rope=None, mask=None, ve=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, start, rope, mask, ve)
        return x + self.mlp(self.ln_2(x))


class MaskColumns(torch.autograd.Function):
    """logits[..., start:] = -inf in place; backward zeroes the same columns of the gradient, in
    place. Only the masked columns are written, both ways (an out-of-place mask or a sliced copy
    moves the whole (tokens, vocab) tensor)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, start: int) -> torch.Tensor:
        logits[..., start:] = float("-inf")
        ctx.mark_dirty(logits)
        ctx.start = start
        return logits

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # The loss's own gradient buffer, written in place; an expanded (stride-0) gradient, which
        # a caller differentiating the logits directly might pass, cannot be, so it is copied.
        grad = grad.clone() if not grad.is_contiguous() else grad
        grad[..., ctx.start:] = 0
        return grad, None


class GPT(nn.Module):
    """GPT-2, or the modern variant (ModelConfig.arch). `kernel_cfg` picks gptfast's Triton ops
    over PyTorch's, as plain settings: whether they can run on the device is decided once, before
    the model is built (`gptfast.resolve.available_kernels`). `recompute_cfg` recomputes blocks in backward
    (all of a block under "full", its cheap ops under "selective") instead of keeping their
    activations (torch's activation checkpointing); gradients are unchanged."""

    def __init__(self, cfg: ModelConfig, kernel_cfg: KernelsConfig | None = None,
                 recompute_cfg: RecomputeConfig | None = None):
        super().__init__()
        self.config = cfg
        self.kernel_cfg = kernel_cfg or KernelsConfig()
        self.recompute_cfg = recompute_cfg or RecomputeConfig()
        self._block_call = call_block  # compiled by compile_blocks
        modules = dict(wte=nn.Embedding(cfg.padded_vocab_size, cfg.n_embd))
        if not cfg.rotary:
            modules["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        modules.update(drop=nn.Dropout(cfg.dropout), h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                       ln_f=make_norm(cfg))
        self.transformer = nn.ModuleDict(modules)
        # value_embeds: table i feeds block i and block n_layer - k + i (ve_blocks)
        self.value_embeds = nn.ModuleList(nn.Embedding(cfg.padded_vocab_size, cfg.n_embd)
                                          for _ in range(cfg.value_embeds))
        for i in self.ve_blocks():
            self.transformer.h[i].attn.ve_mix = nn.Parameter(torch.tensor([0.5, 0.5]))
        # unet_skips: skip_weights[j] scales block j's output into block n_layer - 1 - j's input
        self.skip_weights = nn.Parameter(torch.ones(cfg.n_layer // 2)) if cfg.unet_skips else None
        # The sliding window in tokens, set per step by the trainer's schedule (set_window); a
        # tensor, so a new window is a new value, not a recompilation. Not saved: a loaded model
        # attends over its final window.
        self.register_buffer("attn_window", torch.tensor(cfg.final_window), persistent=False)
        # The upstream gradient the trainer promises the loss (1 / accumulation), set per step:
        # the fused loss then scales its gradients in the kernel (0: no promise, scaled after)
        self.loss_grad_scale = 0.0
        self.lm_head = Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # tied: one (V_pad, C) matrix
        # kernels.fp8: the Linears that train through FP8 matmuls (gptfast.fp8)
        for block in self.transformer.h:
            block.mlp.c_fc.fp8 = block.mlp.c_proj.fp8 = "mlp" in self.kernel_cfg.fp8
        self.lm_head.fp8 = "head" in self.kernel_cfg.fp8
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2 * n_layer)
        because each block adds two of them to the residual stream. With zero_init_proj those
        projections, and an untied lm_head, start at zero instead (modded-nanogpt): each block
        starts as the identity on the stream, and the first steps shape the head."""
        cfg = self.config
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                into_stream = name.endswith("c_proj") or (name == "lm_head" and not cfg.tie_embeddings)
                if cfg.zero_init_proj and into_stream:
                    nn.init.zeros_(module.weight)
                else:
                    std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith("c_proj") else 0.02
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.transformer.h:
            if block.embed_mix is not None:
                block.embed_mix.copy_(torch.tensor([1.0, 0.0]))  # the block starts on the plain stream
            if block.attn.ve_mix is not None:
                block.attn.ve_mix.fill_(0.5)
        if self.skip_weights is not None:
            self.skip_weights.fill_(1.0)
        for table in self.value_embeds:
            table.weight[cfg.vocab_size:].zero_()
        # Padding rows are never an input token nor a class; zero keeps them out of the weights' statistics.
        self.transformer.wte.weight[cfg.vocab_size:].zero_()
        self.lm_head.weight[cfg.vocab_size:].zero_()

    def ve_blocks(self) -> list[int]:
        """The blocks that read a value embedding: the first and the last value_embeds."""
        k, L = self.config.value_embeds, self.config.n_layer
        return [*range(k), *range(L - k, L)] if k else []

    def set_window(self, tokens: int) -> None:
        """The sliding window of the following forwards (the schedule's, train.window_start)."""
        self.attn_window.fill_(tokens)

    def num_params(self) -> int:
        """Parameters with a tied embedding counted once and the vocabulary padding left out:
        124,439,808 for GPT-2 small, 354,823,168 for medium."""
        total = sum(p.numel() for p in self.parameters())
        padded_matrices = (1 if self.config.tie_embeddings else 2) + self.config.value_embeds
        return total - padded_matrices * (self.config.padded_vocab_size - self.config.vocab_size) * self.config.n_embd

    def flops_per_token(self, window: int | None = None, doc_fraction: float = 1.0) -> int:
        """Training FLOPs per token, the PaLM appendix-B count: 6N for the matmuls of forward and
        backward plus 12 * L * C * T for attention scores and their weighted sum. N leaves out the
        embeddings that are lookups, not matmuls (positions; the token embedding when untied; the
        value embeddings), but keeps the lm_head. Masked attention does only the work its masks
        leave: the attention term is scaled by the share of causal (query, key) pairs a sliding
        window of `window` tokens keeps (default: the final window) and by `doc_fraction`, the
        share the document mask keeps of those (data-dependent: the trainer measures it)."""
        cfg = self.config
        n = self.num_params()
        if "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        if not cfg.tie_embeddings:
            n -= cfg.vocab_size * cfg.n_embd
        n -= cfg.value_embeds * cfg.vocab_size * cfg.n_embd
        kept = attended_fraction(cfg.block_size, window or cfg.final_window) * doc_fraction
        return 6 * n + round(12 * cfg.n_layer * cfg.n_embd * cfg.block_size * kept)

    def _embed(self, idx: torch.Tensor, start: int = 0):
        """Token ids (B, T) at positions start.. -> (the stream (B, T, C), the rotary tables or None)."""
        T = idx.size(1)
        x = self.transformer.wte(idx)  # (B, T, C)
        if self.config.rotary:
            return x, rotary_tables(self.config, start, T, idx.device)
        return x + self.transformer.wpe(torch.arange(start, start + T, device=idx.device)), None

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> padded logits (B, T, V_pad), soft-capped when the config asks: in fp32 then,
        as the capped logits go to the loss or to sampling, never to a matmul."""
        logits = self.lm_head(hidden)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits.float() / cap) if cap else logits

    def _attention_mask(self, tokens: torch.Tensor, start: int = 0, dense: bool = False):
        """The mask of this call's queries, positions start .. of `tokens` (B, start + T), the
        tokens of every position 0 .. start + T - 1: None (plain causal), a BlockMask
        (FlexAttention, kernels.flex_attention: on CUDA, which alone has its backward) or a dense
        bool mask (elsewhere, and with a KV cache: `dense`)."""
        cfg = self.config
        if not cfg.masked_attention:
            return None
        docs = document_ids(tokens, cfg.eot_token) if cfg.doc_mask else None
        n_keys = tokens.size(1)
        query_pos = torch.arange(start, n_keys, device=tokens.device)
        keep = attention_mask(query_pos, n_keys, self.attn_window, docs)  # (B or 1, 1, Tq, Tk)
        if dense or not (self.kernel_cfg.flex_attention and tokens.is_cuda):
            return keep
        window = self.attn_window

        def mask_mod(b, h, q, kv):  # the same rule, per element, in the partly masked tiles
            kept = (kv <= q) & (q - kv < window)
            return kept & (docs[b, q] == docs[b, kv]) if docs is not None else kept

        return block_mask_from_dense(keep.expand(tokens.size(0), -1, -1, -1), mask_mod)

    def _stream_extras(self, idx: torch.Tensor) -> list:
        """Each block's value embedding of the tokens (B, T, C), or None."""
        extras = [None] * self.config.n_layer
        for i, block in enumerate(self.ve_blocks()):
            extras[block] = self.value_embeds[i % self.config.value_embeds](idx)
        return extras

    @property
    def _mixes_stream(self) -> bool:
        return self.config.embed_skip or self.config.unet_skips

    def _block_input(self, i: int, x: torch.Tensor, x0: torch.Tensor, skips: list) -> torch.Tensor:
        """The stream entering block i: plus the U-net skip from its mirror in the first half
        (skips: the first half's block outputs), then mixed with the initial embedding x0."""
        L = self.config.n_layer
        if self.skip_weights is not None and i >= L - L // 2:
            x = x + self.skip_weights[L - 1 - i] * skips[L - 1 - i]
        mix = self.transformer.h[i].embed_mix
        if mix is not None:
            x = mix[0] * x + mix[1] * x0
        return x

    def hidden_states(self, idx: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) -> final normalisation's output (B, T, C)."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size {self.config.block_size}")
        x, rope = self._embed(idx)
        x = self.transformer.drop(x)  # (B, T, C)
        mask, ves = self._attention_mask(idx), self._stream_extras(idx)
        if self.kernel_cfg.layernorm:
            return self._blocks_with_fused_norm(x, rope, mask, ves)
        x0, skips = x, []
        for i, block in enumerate(self.transformer.h):
            if self._mixes_stream:
                x = self._block_input(i, x, x0, skips)
            x = self._run_block(i, block, x, None, 0, rope, mask, ves[i])
            if self.skip_weights is not None and i < self.config.n_layer // 2:
                skips.append(x)
        return self.transformer.ln_f(x)

    def compile_blocks(self, **options) -> None:
        """Regional compilation: torch.compile each block's step instead of the whole model. The
        blocks share their code, so dynamo traces one and every block reuses it (its weights are
        inputs, not constants): compile time is one block's, whatever n_layer. The embedding, the
        final norm and the loss run uncompiled around them."""
        self._block_call = torch.compile(call_block, **options)

    @contextlib.contextmanager
    def uncompiled(self):
        """The blocks uncompiled for the duration (compile_blocks' compilation is kept for after):
        for inputs of many lengths, which would each be a new compilation."""
        compiled, self._block_call = self._block_call, call_block
        try:
            yield self
        finally:
            self._block_call = compiled

    def _recomputed(self, i: int) -> bool:
        policy = self.recompute_cfg.policy
        return policy != "none" and i % self.recompute_cfg.every == 0 and torch.is_grad_enabled()

    def _run_block(self, i: int, fn, *args):
        """fn(*args) for block i, its activations recomputed in backward when the config asks
        for this block (call_block)."""
        return self._block_call(self.recompute_cfg.policy if self._recomputed(i) else "none", fn, *args)

    def _blocks_with_fused_norm(self, x: torch.Tensor, rope, mask, ves: list) -> torch.Tensor:
        """The Block loop and ln_f, computed the same way but with each residual add fused into
        the LayerNorm (or RMSNorm) that follows it: 2 * n_layer + 1 normalisations, each reading
        and writing the residual stream once. Under autocast the stream stays fp32 (as in
        Block.forward, where a bf16 branch adds into it) while the normalised outputs are written
        in the autocast dtype the next matmul reads. When the stream is mixed between blocks
        (embed_skip, unet_skips), a block's last add is a plain one: the mix comes between it and
        the next normalisation (the last block's still fuses into ln_f)."""
        import kernels

        device_type = x.device.type
        out_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        rms = self.config.norm == "rmsnorm"

        def norm(x, ln):
            if rms:
                return kernels.rms_norm(x, ln.weight, ln.eps, out_dtype)
            return kernels.layer_norm(x, ln.weight, ln.bias, ln.eps, out_dtype)

        def add_norm(branch, x, ln):
            if rms:
                return kernels.add_rms_norm(branch, x, ln.weight, ln.eps, out_dtype)
            return kernels.add_layer_norm(branch, x, ln.weight, ln.bias, ln.eps, out_dtype)

        def fused_block(y, x, block, next_ln, mask, ve):
            """A block from its normalised input y and stream x to the next block's (y, x)."""
            y, x = add_norm(block.attn(y, None, 0, rope, mask, ve), x, block.ln_2)
            return add_norm(block.mlp(y), x, next_ln)

        def fused_block_from_stream(x, block, next_ln, mask, ve):
            """The same from the stream alone: a recomputed block then holds only x, and
            recomputes its first normalisation (cheap) rather than keeping y."""
            return fused_block(norm(x, block.ln_1), x, block, next_ln, mask, ve)

        def mixed_block(x, block, mask, ve):
            """From the stream to the stream, when a mix comes before the next normalisation."""
            y, x = add_norm(block.attn(norm(x, block.ln_1), None, 0, rope, mask, ve), x, block.ln_2)
            return x + block.mlp(y)

        blocks, L = self.transformer.h, self.config.n_layer
        x0, skips = x, []
        y = None if self._mixes_stream else norm(x, blocks[0].ln_1)  # (B, T, C)
        for i, block in enumerate(blocks):
            last = i + 1 == L
            next_ln = self.transformer.ln_f if last else blocks[i + 1].ln_1
            if self._mixes_stream:
                x = self._block_input(i, x, x0, skips)
                if last:
                    y, x = self._run_block(i, fused_block_from_stream, x, block, next_ln, mask, ves[i])
                else:
                    x = self._run_block(i, mixed_block, x, block, mask, ves[i])
                if self.skip_weights is not None and i < L // 2:
                    skips.append(x)
            elif self._recomputed(i):
                y, x = self._run_block(i, fused_block_from_stream, x, block, next_ln, mask, ves[i])
            else:
                y, x = self._run_block(i, fused_block, y, x, block, next_ln, mask, ves[i])
        return y

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids (B, T) -> the mean cross-entropy loss against `targets` (B, T) when given,
        else logits over the real vocabulary (B, T, vocab_size)."""
        hidden = self.hidden_states(idx)  # (B, T, C)
        if targets is not None and self.kernel_cfg.cross_entropy:
            return self._fused_loss(hidden, targets)
        if targets is None:
            return self._head(hidden)[..., : self.config.vocab_size]  # (B, T, V), a view
        # The padding columns are set to -inf in place, so the softmax runs over the real vocabulary
        # only (a zero padding row would otherwise give logit 0, which dominates trained GPT-2's
        # logits): 47 columns written per row, and their gradient zeroed the same way. The matmul
        # keeps its aligned 50304-wide output, and autocast picks the loss dtype (fp32 for
        # cross_entropy). Slicing the columns off and casting instead copied the whole logits:
        # 1.21x slower per step than nanoGPT's loss on the CPU (bench/bench_nanogpt.py).
        logits = MaskColumns.apply(self._head(hidden), self.config.vocab_size)  # (B, T, V_pad)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def _fused_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy through the fused linear + cross-entropy kernel: the (B*T, V)
        logits are never held, only chunks of them. The kernel takes the whole padded tied
        embedding (aligned matmuls, 16-byte aligned rows) and masks the padding rows itself, so the
        gradient lands in the shared parameter and the softmax runs over the real vocabulary,
        exactly as in the unfused path. The soft cap is applied inside the kernel: the capped
        logits never exist."""
        import kernels

        device_type = hidden.device.type
        compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
        head, weight, into = self.lm_head, self.lm_head.weight, None
        fp8 = head.fp8 and head.training and torch.is_grad_enabled()  # kernels.fp8 "head": its chunks' matmuls
        if head.main_grad is not None and torch.is_grad_enabled() and self.loss_grad_scale and (
                fp8 or head.copy_in_use(hidden)):
            # kernels.fused_grad_accum: the head reads its once-per-step copy (bf16, or FP8 beside the
            # weight, which then only gives the shapes) and adds its gradient into the buffer itself
            # (which needs the trainer's promise of the upstream gradient)
            weight, into = head.weight if fp8 else head.weight_copy, head.main_grad
        return kernels.linear_cross_entropy(hidden.reshape(-1, hidden.size(-1)), weight,
                                            targets.reshape(-1), n_classes=self.config.vocab_size,
                                            compute_dtype=compute_dtype, softcap=self.config.logit_softcap,
                                            chunk_bytes=self.kernel_cfg.loss_chunk_mib * 2**20,
                                            grad_scale=self.loss_grad_scale, grad_weight_into=into, fp8=fp8,
                                            fp8_weight=head.fp8_weight if fp8 else None)

    def _logits_with_cache(self, tokens: torch.Tensor, caches: list, start: int) -> torch.Tensor:
        """Logits (B, V) of the last position of tokens (B, start + T), whose positions start..
        are new and whose earlier ones are in the caches (their ids still decide the document
        mask)."""
        idx = tokens[:, start:]
        x, rope = self._embed(idx, start)  # (B, T, C)
        mask, ves = self._attention_mask(tokens, start, dense=True), self._stream_extras(idx)
        x0, skips, L = x, [], self.config.n_layer
        for i, (block, cache) in enumerate(zip(self.transformer.h, caches, strict=True)):
            if self._mixes_stream:
                x = self._block_input(i, x, x0, skips)
            x = block(x, cache, start, rope, mask, ves[i])
            if self.skip_weights is not None and i < L // 2:
                skips.append(x)
        x = self.transformer.ln_f(x[:, -1:])  # (B, 1, C)
        return self._head(x)[:, 0, : self.config.vocab_size]  # (B, V)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to `idx` (B, T); temperature 0 is greedy.

        With `use_cache`, keys and values are kept per layer, so each new token costs one position
        of compute; once the context fills block_size, the last block_size tokens are recomputed
        per step, as without the cache. The two give the same tokens."""
        L = self.config.block_size
        caches, pos = None, 0
        if use_cache:
            dtype = torch.get_autocast_dtype(idx.device.type) if torch.is_autocast_enabled(idx.device.type) \
                else self.lm_head.weight.dtype
            shape = (idx.size(0), self.config.n_head, L, self.config.n_embd // self.config.n_head)
            caches = [(torch.empty(shape, dtype=dtype, device=idx.device), torch.empty(shape, dtype=dtype, device=idx.device))
                      for _ in self.transformer.h]
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -L:])[:, -1, :]
            elif pos == 0 or pos >= L:  # the prompt, or a full window: (re)compute the last L tokens
                context = idx[:, -L:]
                logits = self._logits_with_cache(context, caches, 0)
                pos = context.size(1)
            else:
                logits = self._logits_with_cache(idx[:, -(pos + 1):], caches, pos)
                pos += 1
            next_id = sample_next(logits.float(), temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B, 1) token ids: greedy at temperature 0, else sampled from the
    temperature-scaled distribution restricted to the top_k likeliest tokens and to the smallest
    set whose probability reaches top_p (nucleus sampling)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        # drop a token once the tokens before it already reach top_p (the first always stays)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), num_samples=1, generator=generator)
