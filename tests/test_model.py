import math

import pytest
import torch

from gptfast.config import ModelConfig
from gptfast.model import GPT


def meta_model(**kw) -> GPT:
    with torch.device("meta"):  # shapes only: no 1.4 GB allocation for medium
        return GPT(ModelConfig(**kw))


def perturbed(model: GPT, seed: int) -> GPT:
    """Zero-initialised projections and head make many gradients exactly zero at step 0; a small
    perturbation makes every parameter matter, so a comparison of gradients can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen).to(p.device) * 0.05)
    return model


@pytest.mark.parametrize("n_layer, n_head, n_embd, expected", [
    (12, 12, 768, 124_439_808),   # GPT-2 small
    (24, 16, 1024, 354_823_168),  # GPT-2 medium
    (36, 20, 1280, 774_030_080),  # GPT-2 large
])
def test_parameter_counts_match_gpt2(n_layer, n_head, n_embd, expected):
    assert meta_model(n_layer=n_layer, n_head=n_head, n_embd=n_embd).num_params() == expected


def test_flops_per_token_formula():
    model = meta_model(n_layer=12, n_head=12, n_embd=768, block_size=1024)
    n = 124_439_808 - 1024 * 768  # without the position embedding
    assert model.flops_per_token() == 6 * n + 12 * 12 * 768 * 1024
    assert model.flops_per_token() == 741_920_256 + 113_246_208  # by hand: 6 x 123,653,376 + attention


def test_padded_vocab_and_tied_head():
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    assert model.transformer.wte.weight.shape == (50304, 16)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert torch.all(model.transformer.wte.weight[50257:] == 0)
    logits = model(torch.randint(0, 50257, (2, 8)))
    assert logits.shape == (2, 8, 50257)


def test_init_statistics():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=4, n_head=4, n_embd=256, block_size=64))
    fc = model.transformer.h[0].mlp.c_fc.weight
    proj = model.transformer.h[0].mlp.c_proj.weight
    assert abs(fc.std().item() - 0.02) < 1e-3
    assert abs(proj.std().item() - 0.02 / math.sqrt(8)) < 5e-4
    assert torch.all(model.transformer.h[0].attn.c_attn.bias == 0)


def test_initial_loss_is_uniform_over_the_vocabulary():
    torch.manual_seed(1)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32))
    x, y = torch.randint(0, 50257, (2, 4, 32))
    with torch.no_grad():
        loss = model(x, y).item()
    assert abs(loss - math.log(50257)) < 0.2


def test_causal_future_tokens_do_not_change_past_logits():
    torch.manual_seed(2)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97)).eval()
    x = torch.randint(0, 97, (1, 16))
    x2 = x.clone()
    x2[0, 10:] = (x2[0, 10:] + 1) % 97
    with torch.no_grad():
        a, b = model(x), model(x2)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(3)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=101))
    x, y = torch.randint(0, 101, (2, 4, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(150):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 4.0 and loss.item() < 0.05


def test_block_size_is_enforced():
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=11))
    with pytest.raises(ValueError, match="longer than block_size 4"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_dropout_changes_training_not_eval_outputs():
    torch.manual_seed(4)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=31, dropout=0.5))
    x = torch.randint(0, 31, (2, 8))
    model.train()
    assert not torch.equal(model(x), model(x))
    model.eval()
    assert torch.equal(model(x), model(x))


def test_generate_greedy_is_deterministic_and_respects_context():
    torch.manual_seed(5)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=31)).eval()
    idx = torch.randint(0, 31, (2, 3))
    a = model.generate(idx, 12, temperature=0)
    b = model.generate(idx, 12, temperature=0)
    assert a.shape == (2, 15) and torch.equal(a, b) and torch.equal(a[:, :3], idx)
    g1, g2 = (torch.Generator().manual_seed(9) for _ in range(2))
    s1 = model.generate(idx, 12, temperature=1.0, top_k=5, generator=g1)
    s2 = model.generate(idx, 12, temperature=1.0, top_k=5, generator=g2)
    assert torch.equal(s1, s2) and int(s1.max()) < 31


@pytest.mark.parametrize("switches", [dict(layernorm=True), dict(cross_entropy=True),
                                      dict(layernorm=True, cross_entropy=True)], ids=["ln", "ce", "ln+ce"])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_kernels_match_the_pytorch_path(bias, switches):
    """Each [kernels] switch computes the same loss and gradients (fp32) as the PyTorch path;
    for cross_entropy the gradient reaches the tied embedding through both of its uses."""
    from gptfast.config import KernelsConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"  # where the kernels run: CUDA, or the interpreter
    torch.manual_seed(6)
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=64, block_size=16, vocab_size=101, bias=bias)
    reference = GPT(cfg).to(device)
    fused = GPT(cfg, KernelsConfig(**switches)).to(device)
    fused.load_state_dict(reference.state_dict())
    x, y = torch.randint(0, 101, (2, 3, 16), device=device)
    losses, grads = [], []
    for model in (reference, fused):
        loss = model(x, y)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    names = [name for name, _ in reference.named_parameters()]
    for name, got, want in zip(names, grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=name)


def test_ignored_targets_match_the_pytorch_path():
    """Targets of -100 (padding in a finetuning batch) count for nothing in either path: the fused
    loss and its gradients equal the PyTorch path's. Mutant caught: the CE kernel comparing the
    target against a wrong ignore_index."""
    from gptfast.config import KernelsConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(7)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=97)
    reference = GPT(cfg).to(device)
    fused = GPT(cfg, KernelsConfig(cross_entropy=True)).to(device)
    fused.load_state_dict(reference.state_dict())
    x, y = torch.randint(0, 97, (2, 3, 16), device=device)
    y[0, :5] = -100
    y[2, 9:] = -100
    results = []
    for model in (reference, fused):
        loss = model(x, y)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    torch.testing.assert_close(results[1][0], results[0][0], atol=1e-6, rtol=1e-6)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    kept = y != -100  # and the loss is the mean over the kept positions only
    logits = reference(x)
    torch.testing.assert_close(results[0][0], torch.nn.functional.cross_entropy(logits[kept], y[kept]))


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_autocast_hands_each_kernel_its_dtypes(monkeypatch, arch):
    """The production GPU path, run on the CPU under bf16 autocast: the residual stream stays fp32,
    the LayerNorm (modern: RMSNorm) kernels write bf16 for the next matmul, and the fused loss gets
    bf16 hidden states with a bf16 compute dtype (and, modern, the soft cap); kernels on and off
    agree within bf16 rounding. Mutant caught: a model that ignores autocast (out_dtype /
    compute_dtype left None)."""
    import kernels
    from gptfast.config import KernelsConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seen = []

    def spy(name, pick):
        fn = getattr(kernels, name)

        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.append((name,) + pick(args, kwargs, out))
            return out
        monkeypatch.setattr(kernels, name, wrapped)

    norm = "layer_norm" if arch == "gpt2" else "rms_norm"
    spy(norm, lambda a, k, out: (a[0].dtype, out.dtype))
    spy(f"add_{norm}", lambda a, k, out: (a[0].dtype, a[1].dtype, out[0].dtype, out[1].dtype))
    spy("linear_cross_entropy", lambda a, k, out: (a[0].dtype, a[1].dtype, k["compute_dtype"], k["softcap"]))
    torch.manual_seed(8)
    cfg = ModelConfig.for_arch(arch, n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=101)
    reference = perturbed(GPT(cfg), 18).to(device)
    fused = GPT(cfg, KernelsConfig(layernorm=True, cross_entropy=True)).to(device)
    fused.load_state_dict(reference.state_dict())
    x, y = torch.randint(0, 101, (2, 4, 16), device=device)
    results = []
    for model in (reference, fused):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(x, y)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    bf16, fp32 = torch.bfloat16, torch.float32
    if arch == "gpt2":
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            assert reference(x).dtype == bf16  # the PyTorch path's lm_head runs in bf16 too
    assert seen[0] == (norm, fp32, bf16)  # embedding stream in, bf16 for the first matmul out
    assert [s for s in seen if s[0] == f"add_{norm}"] == [(f"add_{norm}", bf16, fp32, bf16, fp32)] * 4
    assert seen[-1] == ("linear_cross_entropy", bf16, fp32, bf16, cfg.logit_softcap)
    assert results[1][0].dtype == fp32
    torch.testing.assert_close(results[1][0], results[0][0], atol=0, rtol=2e-2)
    for (name, _), got, want in zip(reference.named_parameters(), results[1][1], results[0][1], strict=True):
        assert got.dtype == want.dtype == fp32, name
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < 3e-2, (name, rel)  # bf16 matmuls in both; a dropped scale or sign is far beyond this


def test_the_pytorch_loss_masks_the_padding_columns():
    """The loss is over the real vocabulary: padding rows set to large values (as a trained or
    HF-loaded head may have) change neither the loss nor any real gradient, and get no gradient."""
    torch.manual_seed(11)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    with torch.no_grad():
        model.transformer.wte.weight[50257:] = 5.0  # would dominate the softmax if not masked
    x, y = torch.randint(0, 50257, (2, 2, 8))
    loss = model(x, y)
    loss.backward()
    hidden = model.hidden_states(x).detach()
    logits = hidden @ model.lm_head.weight.detach()[:50257].T  # (B, T, V): the real vocabulary only
    reference = torch.nn.functional.cross_entropy(logits.reshape(-1, 50257), y.reshape(-1))
    torch.testing.assert_close(loss, reference)
    assert torch.all(model.transformer.wte.weight.grad[50257:] == 0)


def test_the_pytorch_loss_follows_autocast(monkeypatch):
    """Under autocast the head matmul runs in the autocast dtype and cross_entropy receives those
    logits as they are (autocast runs the loss in fp32): no explicit cast copies the logits."""
    import gptfast.model as model_module

    torch.manual_seed(12)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8))
    x, y = torch.randint(0, 50257, (2, 2, 8))
    seen = []
    real = model_module.F.cross_entropy

    def spy(logits, *args, **kwargs):
        seen.append((logits.dtype, logits.shape, logits.is_contiguous()))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(model_module.F, "cross_entropy", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, y)
    assert seen == [(torch.bfloat16, (16, 50304), True)]  # padded, contiguous, not cast
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    with torch.no_grad():
        fp32 = model(x, y)
    assert abs(loss.item() - fp32.item()) < 0.05


# ------------------------------------------------------------------------------------------------
# model.arch = "modern"

MODERN_TINY = dict(n_layer=3, n_head=2, n_embd=64, block_size=16, vocab_size=101)


def test_modern_architecture_has_each_ingredient():
    from gptfast.config import ModelConfig as MC

    torch.manual_seed(9)
    model = GPT(MC.for_arch("modern", **MODERN_TINY))
    assert "wpe" not in model.transformer  # rotary: no learned positions
    assert isinstance(model.transformer.h[0].ln_1, torch.nn.RMSNorm) and isinstance(model.transformer.ln_f, torch.nn.RMSNorm)
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied
    for name, p in model.named_parameters():
        if name.endswith("c_proj.weight") or name == "lm_head.weight":
            assert torch.all(p == 0), name  # zero-initialised into the stream
        assert not name.endswith(".bias"), name
    x = torch.randint(0, 101, (2, 16))
    with torch.no_grad():  # a zero head gives every class logit 0: the loss is exactly uniform
        assert model(x, x).item() == pytest.approx(math.log(101), abs=1e-6)
    # tied + zero_init_proj: the head is the embedding, which stays N(0, 0.02)
    tied = GPT(MC.for_arch("modern", **MODERN_TINY, tie_embeddings=True))
    assert tied.lm_head.weight is tied.transformer.wte.weight and tied.lm_head.weight[:101].std() > 0.01


def test_modern_parameter_and_flop_counts():
    from gptfast.config import ModelConfig as MC

    with torch.device("meta"):
        model = GPT(MC.for_arch("modern", n_layer=12, n_head=12, n_embd=768, block_size=1024))
    # GPT-2 small without positions, biases and LayerNorm biases, plus an untied head
    blocks = 12 * (2 * 768 + 12 * 768 * 768)
    assert model.num_params() == 2 * 50257 * 768 + blocks + 768
    assert model.flops_per_token() == 6 * (50257 * 768 + blocks + 768) + 12 * 12 * 768 * 1024


def test_rotary_attention_scores_depend_on_relative_position_only():
    """q at position m and k at position n, rotated, have a dot product that depends on m - n:
    the property rotary embeddings exist for (Su et al. 2021)."""
    from gptfast.config import ModelConfig as MC
    from gptfast.model import apply_rotary, rotary_tables

    cfg = MC.for_arch("modern", n_layer=1, n_head=1, n_embd=16, block_size=64)
    gen = torch.Generator().manual_seed(10)
    q, k = torch.randn(2, 1, 1, 1, 16, generator=gen)  # (B, T, nh, hs) each
    rope = rotary_tables(cfg, 0, 64, torch.device("cpu"))  # fp32, as the model computes them

    def score(m, n):
        rot = lambda x, p: apply_rotary(x, tuple(t[p:p + 1] for t in rope))  # noqa: E731
        return (rot(q, m) * rot(k, n)).sum().item()

    assert score(5, 2) == pytest.approx(score(40, 37), rel=1e-5, abs=1e-6)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-2)
    assert score(0, 0) == pytest.approx((q * k).sum().item(), rel=1e-6)  # position 0 is no rotation


@pytest.mark.parametrize("switch", [{}, {"rotary": False}, {"qk_norm": False}, {"norm": "layernorm", "bias": True},
                                    {"logit_softcap": 0.0}, {"tie_embeddings": True}],
                         ids=["modern", "learned-positions", "no-qk-norm", "layernorm", "no-softcap", "tied"])
def test_modern_cached_generation_matches_uncached(switch):
    """The KV cache holds rotated keys: a cached greedy decode equals recomputing the whole
    context at every step, within and beyond block_size (where the window slides)."""
    from gptfast.config import ModelConfig as MC

    torch.manual_seed(11)
    model = perturbed(GPT(MC.for_arch("modern", **dict(MODERN_TINY, **switch))), 12).eval()
    idx = torch.randint(0, 101, (2, 5))
    cached = model.generate(idx, 20, temperature=0, use_cache=True)
    uncached = model.generate(idx, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached)


def test_modern_causal_future_tokens_do_not_change_past_logits():
    from gptfast.config import ModelConfig as MC

    torch.manual_seed(13)
    model = perturbed(GPT(MC.for_arch("modern", **MODERN_TINY)), 14)
    x = torch.randint(0, 101, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 101
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0, :10], model(y)[0, :10])
        assert not torch.allclose(model(x)[0, 10:], model(y)[0, 10:])


def test_modern_soft_cap_bounds_the_logits():
    from gptfast.config import ModelConfig as MC

    model = GPT(MC.for_arch("modern", **dict(MODERN_TINY, logit_softcap=2.0)))
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 5.0)
        x = torch.randint(0, 101, (2, 16))
        logits = model(x)
        raw = model.lm_head(model.hidden_states(x))[..., :101]
    assert logits.abs().max() <= 2.0 and raw.abs().max() > 10  # raw logits far beyond the cap, capped
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))


@pytest.mark.parametrize("switches", [dict(layernorm=True), dict(cross_entropy=True),
                                      dict(layernorm=True, cross_entropy=True)], ids=["rmsnorm", "ce+softcap", "both"])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_modern_fused_kernels_match_the_pytorch_path(switches, recompute):
    """The modern architecture with the fused add + RMSNorm and the soft-capped fused loss: the
    same loss and gradients (fp32) as its PyTorch path, under each recompute policy."""
    from gptfast.config import KernelsConfig, ModelConfig as MC, RecomputeConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(15)
    cfg = MC.for_arch("modern", **MODERN_TINY)
    reference = perturbed(GPT(cfg), 16).to(device)
    fused = GPT(cfg, KernelsConfig(**switches), RecomputeConfig(policy=recompute)).to(device)
    fused.load_state_dict(reference.state_dict())
    x, y = torch.randint(0, 101, (2, 3, 16), device=device)
    losses, grads = [], []
    for model in (reference, fused):
        loss = model(x, y)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for (name, _), got, want in zip(reference.named_parameters(), grads[1], grads[0], strict=True):
        assert want.abs().max() > 0, name  # every parameter matters here
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=name)


# -- regional compilation (train.compile_scope = "blocks")


@pytest.mark.parametrize("arch, layernorm, recompute", [("gpt2", False, "selective"), ("gpt2", True, "none"),
                                                       ("modern", True, "selective"), ("modern", False, "full")],
                         ids=["gpt2-selective", "gpt2+fused-ln", "modern+fused-rmsnorm-selective", "modern-full"])
def test_compiled_blocks_share_one_compilation_and_match_eager(arch, layernorm, recompute):
    """GPT.compile_blocks: every block of the model runs through one compiled function, traced
    once or twice (a recompute policy and a first call may each add a variant) however many
    blocks there are, not once per block; loss and gradients equal the uncompiled model's."""
    from torch._dynamo.utils import counters

    from gptfast.config import KernelsConfig, ModelConfig as MC, RecomputeConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(21)
    cfg = MC.for_arch(arch, n_layer=6, n_head=2, n_embd=32, block_size=16, vocab_size=101)
    kernels, recompute_cfg = KernelsConfig(layernorm=layernorm), RecomputeConfig(policy=recompute)
    reference = perturbed(GPT(cfg, kernels, recompute_cfg), 22).to(device)
    regional = GPT(cfg, kernels, recompute_cfg).to(device)
    regional.load_state_dict(reference.state_dict())
    torch._dynamo.reset()
    counters.clear()
    regional.compile_blocks(backend="aot_eager")  # traces autograd and the checkpoint as inductor would
    x, y = torch.randint(0, 101, (2, 2, 16), device=device)
    losses, grads = [], []
    for model in (reference, regional):
        for _ in range(2):  # a second step reuses the compilation
            loss = model(x, y)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, list(model.parameters())))
    assert 1 <= counters["stats"]["unique_graphs"] <= 2 < cfg.n_layer, dict(counters["stats"])
    traced = counters["stats"]["unique_graphs"]
    with torch.no_grad(), regional.uncompiled():  # another length, as HellaSwag's items: nothing compiled
        regional(x[:, :5])
    assert counters["stats"]["unique_graphs"] == traced
    torch.testing.assert_close(losses[1], losses[0], atol=1e-6, rtol=1e-6)
    for (name, _), got, want in zip(reference.named_parameters(), grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=name)


@pytest.mark.parametrize("prompt_len, new_tokens", [(5, 20), (30, 25)], ids=["within_context", "past_context"])
def test_cached_and_uncached_greedy_generation_agree(prompt_len, new_tokens):
    torch.manual_seed(2)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=97)).eval()
    idx = torch.randint(0, 97, (2, prompt_len))
    cached = model.generate(idx, new_tokens, temperature=0, use_cache=True)
    uncached = model.generate(idx, new_tokens, temperature=0, use_cache=False)
    assert cached.shape == (2, prompt_len + new_tokens) and torch.equal(cached, uncached)


def test_seeded_sampling_is_reproducible_and_top_p_restricts():
    torch.manual_seed(3)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50)).eval()
    idx = torch.zeros(1, 1, dtype=torch.long)
    runs = [model.generate(idx, 30, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(9))
            for _ in range(2)]
    assert torch.equal(*runs)
    from gptfast.model import sample_next

    logits = torch.tensor([[3.0, 2.0, 1.0, -5.0]])  # softmax ~ [0.66, 0.24, 0.09, 0.0003]
    picks = {int(sample_next(logits, 1.0, None, 0.8, torch.Generator().manual_seed(s))) for s in range(200)}
    assert picks == {0, 1}  # 0.66 < 0.8, so the nucleus is the first two tokens
