"""[model]: the architecture, GPT-2's or the modern one, each switch its own setting."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gptfast.fields import Fail, check_choice, doc_field, toml_value

# GPT-2's embedding is padded to a multiple of this so the lm_head matmul gets tensor-core
# friendly shapes (50257 -> 50304); the padded rows are never a target and are masked from the loss.
VOCAB_PAD_MULTIPLE = 64

ARCHES = ("gpt2", "modern", "modern2")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "relu2")
# The architecture switches and their values in each arch. gpt2 is fixed (it must stay OpenAI's
# model, which exports to Hugging Face); modern's are defaults a config may override one by one.
GPT2_SWITCHES = {"rotary": False, "norm": "layernorm", "qk_norm": False, "mlp": "gelu", "tie_embeddings": True,
                 "zero_init_proj": False, "logit_softcap": 0.0, "embed_skip": False, "unet_skips": False,
                 "value_embeds": 0, "doc_mask": False, "attn_window": 0}
MODERN = {"rotary": True, "norm": "rmsnorm", "qk_norm": True, "mlp": "relu2", "tie_embeddings": False,
          "zero_init_proj": True, "logit_softcap": 30.0, "bias": False}
ARCH_DEFAULTS = {
    "gpt2": GPT2_SWITCHES,
    # modded-nanogpt's records (github.com/KellerJordan/modded-nanogpt): rotary, QK-norm, ReLU^2,
    # untied head, zero-init projections, soft cap 30, no biases.
    "modern": MODERN,
    # Round 2: the ingredients of modded-nanogpt's later records (9-18), each a switch below:
    # embedding skips, U-net skips, 3 value-embedding tables, attention masked to the document,
    # a 512-token sliding window (grown over training by train.window_start), soft cap 15.
    "modern2": {**MODERN, "logit_softcap": 15.0, "embed_skip": True, "unet_skips": True, "value_embeds": 3,
                "doc_mask": True, "attn_window": 512},
}
# Sliding windows are whole multiples of this many tokens: FlexAttention's block size on CUDA
# (a partly used block costs a whole one), and a bounded number of distinct windows.
WINDOW_MULTIPLE = 64

def with_arch_defaults(values: dict) -> dict:
    """A [model] section's values over its arch's switch defaults (ARCH_DEFAULTS): the one place
    they are merged, for the TOML loader and for ModelConfig.for_arch alike."""
    arch = values.get("arch")
    return {**(ARCH_DEFAULTS.get(arch, {}) if isinstance(arch, str) else {}), **values}


@dataclass
class ModelConfig:
    n_layer: int = doc_field(12, "number of transformer blocks")
    n_head: int = doc_field(12, "attention heads per block")
    n_embd: int = doc_field(768, "model width (residual stream size)")
    block_size: int = doc_field(1024, "context length in tokens")
    vocab_size: int = doc_field(50257, "tokenizer vocabulary size (GPT-2 BPE: 50257)")
    dropout: float = doc_field(0.0, "dropout probability in [0, 1); 0 for pretraining")
    bias: bool = doc_field(True, "biases in Linear and LayerNorm layers, as GPT-2 has")
    arch: str = doc_field("gpt2", "gpt2: OpenAI's 2019 architecture (exportable to Hugging Face), every switch below "
                                  "at its GPT-2 value; modern: the switches default to the speedruns' values "
                                  "(modded-nanogpt record 8) and each may be set back for an ablation; modern2: "
                                  "modern plus round 2's ingredients (records 9-18: embedding and U-net skips, value "
                                  "embeddings, document mask, sliding window, soft cap 15)")
    rotary: bool = doc_field(False, "rotary position embeddings on queries and keys instead of learned positions "
                                    "(Su et al. 2021, RoFormer); modern: true")
    rotary_base: float = doc_field(10000.0, "rotary: the base of the rotation frequencies")
    norm: str = doc_field("layernorm", "layernorm (Ba et al. 2016) or rmsnorm (Zhang & Sennrich 2019, no centring or "
                                       "bias); modern: rmsnorm")
    qk_norm: bool = doc_field(False, "RMS-normalise each head's queries and keys before attention (Dehghani et al. "
                                     "2023; modded-nanogpt); modern: true")
    mlp: str = doc_field("gelu", "the MLP's activation: gelu (GPT-2's tanh approximation) or relu2 (squared ReLU, "
                                 "So et al. 2021, Primer); modern: relu2")
    tie_embeddings: bool = doc_field(True, "the lm_head shares the token embedding's matrix (GPT-2); modern: false")
    zero_init_proj: bool = doc_field(False, "initialise the projections into the residual stream (attention and MLP "
                                            "c_proj) and an untied lm_head to zero (modded-nanogpt); modern: true")
    logit_softcap: float = doc_field(0.0, "logits -> cap * tanh(logits / cap) before the loss (Gemma 2; "
                                          "modded-nanogpt); 0: off; modern: 30")

    embed_skip: bool = doc_field(False, "each block's input is a learned mix of the stream and the initial token "
                                        "embedding, a * x + b * x0, per block, from a = 1, b = 0 (modded-nanogpt "
                                        "record 9); modern2: true")
    unet_skips: bool = doc_field(False, "U-net skips: the outputs of the first n_layer // 2 blocks are added, each "
                                        "with a learned weight from 1, into the input of its mirror in the second "
                                        "half (record 11); modern2: true")
    value_embeds: int = doc_field(0, "k extra token-embedding tables mixed into the attention values, table i in "
                                     "block i and in block n_layer - k + i, v -> a * v + b * ve (learned, from "
                                     "0.5, 0.5; record 14); they train with the token embedding's AdamW rate; "
                                     "0: none; modern2: 3")
    doc_mask: bool = doc_field(False, "attention stays within a document: a token attends to no position before "
                                      "the latest end-of-text token (eot_token), which opens the document after "
                                      "it (record 12); modern2: true")
    eot_token: int = doc_field(50256, "doc_mask: the token id that separates documents (GPT-2's <|endoftext|>)")
    attn_window: int = doc_field(0, f"sliding-window attention: a token attends to the last attn_window positions "
                                    f"(itself included), a multiple of {WINDOW_MULTIPLE}; train.window_start grows it "
                                    "from smaller; 0: the whole context; modern2: 512")

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
        check_choice(fail, "model.arch", self.arch, ARCHES)
        check_choice(fail, "model.norm", self.norm, NORMS)
        check_choice(fail, "model.mlp", self.mlp, MLPS)
        if self.arch == "gpt2":
            for key, value in GPT2_SWITCHES.items():
                if getattr(self, key) != value:
                    fail(f"model.{key}", f"{toml_value(getattr(self, key))} is not GPT-2's architecture, which "
                                         "model.arch = \"gpt2\" keeps exactly (it exports to Hugging Face); set "
                                         "model.arch = \"modern\" to change it")
        if self.logit_softcap < 0:
            fail("model.logit_softcap", f"must be >= 0 (0: off), got {self.logit_softcap}")
        if self.rotary_base <= 1:
            fail("model.rotary_base", f"must be > 1, got {self.rotary_base}")
        if self.rotary and self.head_dim % 2:
            fail("model.rotary", f"rotary embeddings rotate pairs of channels: the head size "
                                 f"(n_embd / n_head = {self.head_dim}) must be even")

        if self.value_embeds < 0 or 2 * self.value_embeds > self.n_layer:
            fail("model.value_embeds", f"tables go to the first and last k blocks: must be in [0, n_layer / 2 = "
                                       f"{self.n_layer // 2}], got {self.value_embeds}")
        if self.attn_window < 0 or self.attn_window % WINDOW_MULTIPLE:
            fail("model.attn_window", f"must be 0 (the whole context) or a positive multiple of {WINDOW_MULTIPLE} "
                                      f"tokens, got {self.attn_window}")
        if self.attn_window > self.block_size:
            fail("model.attn_window", f"{self.attn_window} is longer than the context (model.block_size = "
                                      f"{self.block_size}); 0 attends to the whole context")
        if self.doc_mask and not 0 <= self.eot_token < self.vocab_size:
            fail("model.eot_token", f"must be a token id below model.vocab_size = {self.vocab_size}, got "
                                    f"{self.eot_token}")
        if self.masked_attention and self.dropout:
            fail("model.dropout", "must be 0 with model.doc_mask or model.attn_window: masked attention "
                                  "(FlexAttention) has no attention dropout")

    @property
    def masked_attention(self) -> bool:
        """Whether attention needs a mask beyond plain causality (a document mask or a window)."""
        return self.doc_mask or self.attn_window > 0

    @property
    def final_window(self) -> int:
        """The sliding window at the end of training: attn_window, or the whole context."""
        return self.attn_window or self.block_size

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
