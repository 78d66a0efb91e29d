"""Round 2 of the time-to-quality ingredients (model.arch = "modern2"): embedding and U-net skips,
value embeddings, the document mask and the sliding window (SDPA's dense mask and FlexAttention),
the window and batch-size schedules, their FLOPs and their memory terms."""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from conftest import crash_at_step
from gptfast.config import RECOMPUTE_POLICIES, Config, KernelsConfig, ModelConfig, RecomputeConfig, TrainConfig
from gptfast.configfile import load_config
from gptfast.errors import ConfigError
from gptfast.memory import activation_bytes_per_token, measure_saved_bytes, predict_peak, round2_bytes_per_token
from gptfast.model import GPT, attend, attention_mask, attended_fraction, block_mask_from_dense, document_ids
from gptfast.optim import build_optimizer
from gptfast.trainer import Trainer

EOT = 7
TINY2 = dict(n_layer=6, n_head=2, n_embd=32, block_size=128, vocab_size=101, eot_token=EOT, value_embeds=2,
             attn_window=64)
NO_MASK = KernelsConfig(flex_attention=False)


def quiet(_):
    pass


def perturbed(model: GPT, seed: int) -> GPT:
    """The model with every parameter moved off its initial value (zero-initialised projections
    and head would make most gradients zero, hiding wiring mistakes)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return model


def assert_same_loss_and_grads(reference: GPT, model: GPT, x: torch.Tensor, rtol: float, calls: int = 1,
                               every_grad_nonzero: bool = False) -> None:
    """The next-token loss on x and every parameter's gradient of `model` equal `reference`'s (the
    loss computed `calls` times, the gradient of the last: a compiled model's second call reuses)."""
    results = []
    for m in (reference, model):
        for _ in range(calls):
            loss = m(x, x.roll(-1, 1))
        results.append((loss, torch.autograd.grad(loss, list(m.parameters()))))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    for (name, _), got, want in zip(reference.named_parameters(), results[1][1], results[0][1], strict=True):
        assert not every_grad_nonzero or want.abs().max() > 0, name  # every parameter matters here
        torch.testing.assert_close(got, want, atol=1e-6, rtol=rtol, msg=name)


def tokens_with_documents(batch: int, length: int, seed: int, eot_rate: float = 0.05) -> torch.Tensor:
    """(batch, length) ids in [0, 101) with an EOT at each position with probability eot_rate."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(8, 101, (batch, length), generator=gen)
    idx[torch.rand(batch, length, generator=gen) < eot_rate] = EOT
    return idx


# -- the config: each switch on and off, each impossible value one line

def test_modern2_switches_default_on_and_set_back_one_by_one():
    cfg = ModelConfig.for_arch("modern2")
    assert (cfg.embed_skip, cfg.unet_skips, cfg.value_embeds, cfg.doc_mask, cfg.attn_window, cfg.logit_softcap) == \
        (True, True, 3, True, 512, 15.0)
    assert cfg.rotary and cfg.qk_norm and cfg.mlp == "relu2"  # modern's switches stay
    off = ModelConfig.for_arch("modern2", embed_skip=False, value_embeds=0, attn_window=0)
    assert (off.embed_skip, off.value_embeds, off.attn_window, off.unet_skips) == (False, 0, 0, True)
    model = GPT(ModelConfig.for_arch("modern2", **dict(TINY2, embed_skip=False, unet_skips=False, value_embeds=0)))
    assert model.skip_weights is None and len(model.value_embeds) == 0
    assert all(b.embed_mix is None and b.attn.ve_mix is None for b in model.transformer.h)


@pytest.mark.parametrize("override, message", [
    ("--model.attn_window=2048", "model.attn_window: 2048 is longer than the context"),
    ("--model.attn_window=100", "model.attn_window: must be 0 (the whole context) or a positive multiple of 64"),
    ("--model.value_embeds=7", "model.value_embeds: tables go to the first and last k blocks"),
    ("--model.eot_token=60000", "model.eot_token: must be a token id below model.vocab_size"),
    ("--model.dropout=0.1", "model.dropout: must be 0 with model.doc_mask or model.attn_window"),
    ("--train.window_start=1024", "train.window_start: 1024 is longer than the final window (512 tokens"),
    ("--train.window_start=96", "train.window_start: must be 0 or a positive multiple of 64"),
    ("--train.grad_accum_start=3", "train.grad_accum_start: the schedule grows in multiples of it"),
    ("--train.grad_accum_start=2", "train.batch_warmup_steps: must be positive with train.grad_accum_start"),
])
def test_impossible_round2_values_are_one_line_each(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, ['--model.arch="modern2"', "--train.grad_accum_steps=8", override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_gpt2_keeps_its_architecture_and_a_window_start_needs_masked_attention():
    with pytest.raises(ConfigError, match="model.unet_skips: true is not GPT-2's architecture"):
        load_config(None, ["--model.unet_skips=true"])
    with pytest.raises(ConfigError, match="train.window_start: grows a sliding window"):
        load_config(None, ['--model.arch="modern"', "--train.window_start=64"])


# -- attention masks

def per_document_reference(q, k, v, docs):
    """Plain causal attention run on each document alone, then put back in place."""
    out = torch.empty_like(q)
    for b in range(q.size(0)):
        for d in docs[b].unique():
            where = (docs[b] == d).nonzero().squeeze(1)
            assert torch.equal(where, torch.arange(where[0], where[-1] + 1))  # a document is contiguous
            sl = slice(int(where[0]), int(where[-1]) + 1)
            out[b, :, sl] = F.scaled_dot_product_attention(q[b:b + 1, :, sl], k[b:b + 1, :, sl], v[b:b + 1, :, sl],
                                                           is_causal=True)[0]
    return out


def test_document_mask_equals_attention_within_each_document():
    idx = tokens_with_documents(3, 97, seed=1)
    docs = document_ids(idx, EOT)
    assert docs[0, 0] == int(idx[0, 0] == EOT) and torch.all(docs.diff(dim=1) == (idx[:, 1:] == EOT))
    q, k, v = torch.randn(3, 3, 2, 97, 16).unbind(0)  # (B, nh, T, hs) each
    got = attend(q, k, v, attention_mask(torch.arange(97), 97, 97, docs), 0.0, True)
    torch.testing.assert_close(got, per_document_reference(q, k, v, docs), atol=1e-5, rtol=1e-5)


def test_sliding_window_keeps_exactly_the_last_window_positions():
    keep = attention_mask(torch.arange(50), 50, 16, None)[0, 0]
    for query in range(50):
        assert keep[query].nonzero().squeeze(1).tolist() == list(range(max(0, query - 15), query + 1))
    # with a cache: queries 40.. over keys 0..44 follow the same rule
    torch.testing.assert_close(attention_mask(torch.arange(40, 45), 45, 16, None)[0, 0], keep[40:45, :45])


@pytest.mark.parametrize("length", [128, 200])
@pytest.mark.parametrize("window", [64, 1024])
def test_flex_attention_block_mask_equals_the_dense_mask(length, window):
    """FlexAttention (forward: torch has no FlexAttention backward on the CPU) through the BlockMask
    built from the dense mask, against SDPA with the dense mask, also at a length that is not a
    multiple of the 128-token tile."""
    idx = tokens_with_documents(2, length, seed=2, eot_rate=0.01)  # documents of ~100 tokens
    docs = document_ids(idx, EOT)
    keep = attention_mask(torch.arange(length), length, window, docs)

    def mask_mod(b, h, q, kv):
        return (kv <= q) & (q - kv < window) & (docs[b, q] == docs[b, kv])

    q, k, v = torch.randn(3, 2, 2, length, 16).unbind(0)
    block_mask = block_mask_from_dense(keep, mask_mod, block=32)  # small tiles: skipped, full and partial ones
    counts = block_mask.kv_num_blocks.sum() + block_mask.full_kv_num_blocks.sum()
    assert 0 < block_mask.full_kv_num_blocks.sum() and counts < 2 * (-(-length // 32)) ** 2
    with warnings.catch_warnings():  # uncompiled FlexAttention warns (once) that it materialises the scores
        warnings.simplefilter("ignore", UserWarning)
        got = attend(q, k, v, block_mask, 0.0, True)
    torch.testing.assert_close(got, attend(q, k, v, keep, 0.0, True), atol=1e-5, rtol=1e-5)


def test_masked_attention_with_nothing_masked_equals_plain_causal_sdpa():
    """Loss and every gradient of the masked path equal the unmasked model's when the masks keep
    plain causality: no EOT in the tokens, a window the length of the context."""
    torch.manual_seed(3)
    plain = ModelConfig.for_arch("modern2", **dict(TINY2, doc_mask=False, attn_window=0))
    masked = ModelConfig.for_arch("modern2", **dict(TINY2, attn_window=128))
    reference = perturbed(GPT(plain, NO_MASK), 4)
    model = GPT(masked, NO_MASK)
    model.load_state_dict(reference.state_dict())
    assert_same_loss_and_grads(reference, model, torch.randint(8, 101, (2, 128)), rtol=1e-5)


def test_a_token_never_sees_past_its_document_or_window():
    torch.manual_seed(5)
    model = perturbed(GPT(ModelConfig.for_arch("modern2", **TINY2), NO_MASK), 6).eval()
    x = tokens_with_documents(1, 128, seed=7)
    x[0, 100] = EOT  # a document starts at 100
    changed = x.clone()
    changed[0, 50:100] = torch.randint(8, 101, (50,))  # the previous document's tokens, and before
    changed[0, 30:40] = torch.randint(8, 101, (10,))
    with torch.no_grad():
        a, b = model(x), model(changed)
    torch.testing.assert_close(a[0, 100:], b[0, 100:])  # the new document sees nothing before its EOT
    assert not torch.allclose(a[0, 50:100], b[0, 50:100])
    # one block (deeper, each block's window reaches further back), one document: only the window limits
    model = perturbed(GPT(ModelConfig.for_arch("modern2", **dict(TINY2, n_layer=1, value_embeds=0)), NO_MASK), 6)
    y = torch.randint(8, 101, (1, 128))
    far = y.clone()
    far[0, :20] = torch.randint(8, 101, (20,))
    with torch.no_grad():
        a, b = model.eval()(y), model(far)
    torch.testing.assert_close(a[0, 84:], b[0, 84:])  # positions 84.. see 21.. and no earlier
    assert not torch.allclose(a[0, 20:83], b[0, 20:83])


# -- the skips and the value embeddings, wired where they should be

def block_inputs(model: GPT, x: torch.Tensor) -> list[torch.Tensor]:
    """The stream entering each block (its first norm's input) on a forward of x."""
    seen = []
    hooks = [b.ln_1.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach())) for b in model.transformer.h]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def block_outputs(model: GPT, x: torch.Tensor) -> list[torch.Tensor]:
    outputs = []
    hooks = [b.register_forward_hook(lambda m, a, out: outputs.append(out.detach())) for b in model.transformer.h]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return outputs


def test_embedding_and_unet_skips_feed_each_block_its_mix():
    torch.manual_seed(8)
    cfg = ModelConfig.for_arch("modern2", **dict(TINY2, value_embeds=0))
    model = perturbed(GPT(cfg, NO_MASK), 9)
    x = tokens_with_documents(2, 128, seed=10)
    inputs, outputs = block_inputs(model, x), block_outputs(model, x)
    x0 = model.transformer.wte(x)
    L = cfg.n_layer
    for i, block in enumerate(model.transformer.h):
        stream = x0 if i == 0 else outputs[i - 1]
        if i >= L - L // 2:  # the second half: its mirror's output, weighted
            stream = stream + model.skip_weights[L - 1 - i] * outputs[L - 1 - i]
        a, b = block.embed_mix
        torch.testing.assert_close(inputs[i], a * stream + b * x0, msg=f"block {i}")


def test_each_value_embedding_reaches_its_two_blocks_only():
    torch.manual_seed(11)
    cfg = ModelConfig.for_arch("modern2", **dict(TINY2, embed_skip=False, unet_skips=False, value_embeds=2))
    model = perturbed(GPT(cfg, NO_MASK), 12)
    assert model.ve_blocks() == [0, 1, 4, 5]
    x = tokens_with_documents(1, 64, seed=13)
    loss = model(x, x.roll(-1, 1))
    loss.backward()
    for table, blocks in ((0, (0, 4)), (1, (1, 5))):
        grad = model.value_embeds[table].weight.grad
        assert grad[x.unique()].abs().sum() > 0
        for i in blocks:  # with its mix weight zeroed in both of its blocks, a table no longer matters
            model.transformer.h[i].attn.ve_mix.data[1] = 0.0
        model.zero_grad()
        model(x, x.roll(-1, 1)).backward()
        assert torch.all(model.value_embeds[table].weight.grad == 0), table
    for table in model.value_embeds:  # padding rows are never a token: they stay zero, as wte's
        assert torch.all(GPT(cfg).value_embeds[0].weight[cfg.vocab_size:] == 0)
        assert table.weight.grad[cfg.vocab_size:].abs().sum() == 0


def test_value_embeddings_train_at_the_embedding_rate_and_scalars_without_decay():
    from gptfast.config import OptimConfig

    model = GPT(ModelConfig.for_arch("modern2", **TINY2), NO_MASK)
    opt = build_optimizer(model, OptimConfig(name="muon", lr=1e-3, muon_embedding_lr=0.3, weight_decay=0.1),
                          torch.device("cpu"))
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    for table in model.value_embeds:
        assert group_of[id(table.weight)]["peak_lr"] == 0.3
    scalars = [model.skip_weights] + [b.embed_mix for b in model.transformer.h] + \
              [model.transformer.h[i].attn.ve_mix for i in model.ve_blocks()]
    for p in scalars:
        assert group_of[id(p)]["weight_decay"] == 0.0 and group_of[id(p)]["peak_lr"] == 1e-3
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


# -- the other paths: kernels, recomputation, sampling

@pytest.mark.parametrize("switches", [dict(layernorm=True), dict(cross_entropy=True)], ids=["rmsnorm", "ce"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_modern2_fused_kernels_and_recomputation_match_the_pytorch_path(switches, recompute):
    torch.manual_seed(14)
    cfg = ModelConfig.for_arch("modern2", **dict(TINY2, n_layer=4, block_size=64, value_embeds=1))
    reference = perturbed(GPT(cfg, NO_MASK), 15)
    fused = GPT(cfg, KernelsConfig(flex_attention=False, **switches), RecomputeConfig(policy=recompute))
    fused.load_state_dict(reference.state_dict())
    x = tokens_with_documents(2, 64, seed=16)
    fused.set_window(64)
    reference.set_window(64)
    assert_same_loss_and_grads(reference, fused, x, rtol=1e-4, every_grad_nonzero=True)


def test_modern2_cached_generation_matches_uncached():
    """The KV cache applies the document mask and the window too: with an EOT in the prompt and a
    window shorter than what is generated, cached and uncached greedy tokens agree."""
    torch.manual_seed(17)
    model = perturbed(GPT(ModelConfig.for_arch("modern2", **TINY2), NO_MASK), 18).eval()
    prompt = tokens_with_documents(2, 30, seed=19)
    prompt[:, 12] = EOT
    cached = model.generate(prompt, 150, temperature=0)  # past the 128-token context too
    assert torch.equal(cached, model.generate(prompt, 150, temperature=0, use_cache=False))


# -- FLOPs

def test_flops_count_the_attention_the_window_and_documents_leave():
    cfg = ModelConfig.for_arch("modern2", **TINY2)
    model = GPT(cfg)
    full = GPT(ModelConfig.for_arch("modern2", **dict(TINY2, attn_window=0)))
    attention = 12 * cfg.n_layer * cfg.n_embd * cfg.block_size
    assert attended_fraction(128, 128) == 1.0
    assert attended_fraction(128, 64) == pytest.approx((64 * 65 / 2 + 64 * 64) / (128 * 129 / 2))
    assert full.flops_per_token() - model.flops_per_token() == round(attention * (1 - attended_fraction(128, 64)))
    assert model.flops_per_token(doc_fraction=0.5) == model.flops_per_token() - round(
        attention * attended_fraction(128, 64) * 0.5)
    # value embeddings are lookups: no matmul FLOPs; their 2k mix weights neither
    no_ve = GPT(ModelConfig.for_arch("modern2", **dict(TINY2, value_embeds=0)))
    assert model.num_params() - no_ve.num_params() == 2 * cfg.vocab_size * cfg.n_embd + 2 * 2 * 2
    assert model.flops_per_token() - no_ve.flops_per_token() == 6 * 2 * 2 * 2


# -- memory: each ingredient's term, measured

VARIANTS = {"embed_skip": {"embed_skip": True}, "unet_skips": {"unet_skips": True}, "value_embeds": {"value_embeds": 2},
            "all": {"embed_skip": True, "unet_skips": True, "value_embeds": 2},
            "doc_mask": {"doc_mask": True}, "window": {"attn_window": 64}}
# SDPA's dense mask runs where FlexAttention cannot train: the CPU, which trains in fp32
CASES = [(v, a) for v in VARIANTS for a in (None, torch.bfloat16) if a is None or v not in ("doc_mask", "window")]


@pytest.mark.parametrize("variant, autocast", CASES,
                         ids=[f"{v}-{'bf16' if a else 'fp32'}" for v, a in CASES])
@pytest.mark.parametrize("fused", [False, True], ids=["pytorch", "fused_kernels"])
def test_round2_memory_terms_match_what_autograd_keeps(variant, autocast, fused):
    """Each ingredient's extra saved bytes (model with it minus model without, whole forward)
    within 10% of the planner's terms, under each recompute policy."""
    base = dict(n_layer=4, n_head=2, n_embd=64, block_size=64, vocab_size=101, eot_token=EOT, value_embeds=0,
                embed_skip=False, unet_skips=False, doc_mask=False, attn_window=0)
    kernels = KernelsConfig(layernorm=fused, cross_entropy=fused, flex_attention=False)
    x, y = tokens_with_documents(2, 64, seed=20), tokens_with_documents(2, 64, seed=21)
    act = 2 if autocast else 4
    for policy in RECOMPUTE_POLICIES:
        measured = []
        for switches in ({}, VARIANTS[variant]):
            torch.manual_seed(0)
            cfg = ModelConfig.for_arch("modern2", **{**base, **switches})
            measured.append(sum(measure_saved_bytes(GPT(cfg, kernels, RecomputeConfig(policy=policy)), x, y,
                                                    autocast).values()))
        plain = ModelConfig.for_arch("modern2", **base)
        per_token = (cfg.n_layer * (activation_bytes_per_token(cfg, policy, act, fused)
                                    - activation_bytes_per_token(plain, policy, act, fused))
                     + round2_bytes_per_token(cfg, policy, act))
        # SDPA's dense mask (the CPU path): the planner's "attention mask" part at this micro-batch
        mask = predict_peak(Config(model=cfg, kernels=kernels), x.size(0), policy).parts.get("attention mask", 0)
        predicted = per_token * x.numel() + mask
        assert abs(measured[1] - measured[0] - predicted) <= 0.10 * predicted, (policy, measured, predicted)


def test_the_dense_mask_term_is_planned_only_without_flex_attention():
    model = ModelConfig.for_arch("modern2", n_layer=12, n_head=12, n_embd=768, block_size=1024)
    cpu = predict_peak(Config(model=model, kernels=NO_MASK), 8, "none")
    cuda = predict_peak(Config(model=model), 8, "none")
    assert cpu.parts["attention mask"] == 8 * 1024 ** 2 * (1 + 4 * 12) and "attention mask" not in cuda.parts
    assert cuda.parts["round-2 streams"] > 0


# -- the schedules

def test_batch_size_schedule_grows_in_whole_stages():
    cfg = Config(train=TrainConfig(micro_batch_size=2, grad_accum_steps=8, grad_accum_start=2, batch_warmup_steps=8,
                                   max_steps=20))
    assert [cfg.grad_accum_at(s) for s in range(10)] == [2, 2, 2, 4, 4, 4, 6, 6, 8, 8]
    tokens = cfg.model.block_size * 2
    assert cfg.tokens_before(10) == tokens * (2 * 3 + 4 * 3 + 6 * 2 + 8 * 2)
    assert cfg.tokens_before(20) == cfg.tokens_before(10) + 10 * cfg.tokens_per_step
    plain = Config(train=TrainConfig(grad_accum_steps=8))
    assert plain.grad_accum_at(0) == 8 and plain.tokens_before(5) == 5 * plain.tokens_per_step


def test_window_schedule_grows_from_start_to_the_final_window():
    cfg = Config(model=ModelConfig.for_arch("modern2", block_size=1024, attn_window=512),
                 train=TrainConfig(window_start=128, max_steps=100))
    windows = [cfg.window_at(s) for s in range(101)]
    assert windows[0] == 128 and windows[-1] == 512 and windows == sorted(windows)
    assert all(w % 64 == 0 for w in windows) and len(set(windows)) == 7
    assert Config(model=ModelConfig.for_arch("modern2")).window_at(0) == 512  # no schedule: the final window


SCHEDULED = {"model.arch": '"modern2"', "model.n_layer": 4, "model.block_size": 256, "model.value_embeds": 1,
             "model.attn_window": 256, "model.eot_token": 198, "optim.name": '"muon"', "train.grad_accum_start": 1,
             "train.batch_warmup_steps": 4, "train.window_start": 64, "train.max_steps": 6,
             "train.micro_batch_size": 1}


def records(out_dir, key):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def test_interrupted_run_resumes_bit_exact_across_the_schedules(tiny_config, tmp_path):
    """The batch grows from 1 to 2 micro-batches at step 5 and the window from 64 to 256 tokens:
    a run killed during step 5 (its checkpoint is step 3's, after the change) resumes to the same
    losses and weights as one never interrupted; tokens per step are logged as they grew."""
    straight = Trainer(tiny_config(SCHEDULED, out_dir=tmp_path / "straight"), log=quiet)
    windows = []
    real_step = straight.train_step

    def watched():
        result = real_step()
        windows.append(int(straight.model.attn_window))
        return result

    straight.train_step = watched
    straight.run()
    assert windows == [64, 64, 128, 128, 192, 256]
    assert [t for _, t in records(tmp_path / "straight", "tokens_per_step")] == [256, 256, 256, 256, 512, 512]
    steps = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in steps if "tokens_per_step" in r] == [256, 512, 768, 1024, 1536, 2048]

    crashing = Trainer(tiny_config(SCHEDULED, out_dir=tmp_path / "resumed"), log=quiet)
    crash_at_step(crashing, 4)
    resumed = Trainer(tiny_config(SCHEDULED, out_dir=tmp_path / "resumed"), log=quiet)
    assert resumed.step == 3
    resumed.run()
    for key in ("loss", "grad_norm", "val_loss", "tokens"):
        assert records(tmp_path / "resumed", key)[-3:] == records(tmp_path / "straight", key)[-3:], key
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_compiled_blocks_carry_the_masks_and_value_embeddings():
    """Regional compilation of modern2 (dense mask, value embeddings, the stream mixed between
    blocks): loss and gradients equal the eager model's, and the blocks share a few compilations
    (those with a value embedding and those without), not one per block."""
    from torch._dynamo.utils import counters

    torch.manual_seed(22)
    cfg = ModelConfig.for_arch("modern2", **dict(TINY2, block_size=64, value_embeds=1))
    reference = perturbed(GPT(cfg, NO_MASK), 23)
    regional = GPT(cfg, NO_MASK)
    regional.load_state_dict(reference.state_dict())
    torch._dynamo.reset()
    counters.clear()
    regional.compile_blocks(backend="aot_eager")
    assert_same_loss_and_grads(reference, regional, tokens_with_documents(2, 64, seed=24), rtol=1e-4, calls=2)
    assert 1 <= counters["stats"]["unique_graphs"] <= 4 < cfg.n_layer, dict(counters["stats"])
