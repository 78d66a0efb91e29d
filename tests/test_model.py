import math

import pytest
import torch

from gptfast.config import ModelConfig
from gptfast.model import GPT


def meta_model(**kw) -> GPT:
    with torch.device("meta"):  # shapes only: no 1.4 GB allocation for medium
        return GPT(ModelConfig(**kw))


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


def test_autocast_hands_each_kernel_its_dtypes(monkeypatch):
    """The production GPU path, run on the CPU under bf16 autocast: the residual stream stays fp32,
    the LayerNorm kernels write bf16 for the next matmul, and the fused loss gets bf16 hidden states
    with a bf16 compute dtype; kernels on and off agree within bf16 rounding. Mutant caught: a
    model that ignores autocast (out_dtype / compute_dtype left None)."""
    import kernels
    from gptfast.config import KernelsConfig

    device = "cuda" if torch.cuda.is_available() else "cpu"
    seen = []

    def spy(name, fn, pick):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.append((name,) + pick(args, kwargs, out))
            return out
        monkeypatch.setattr(kernels, name, wrapped)

    spy("layer_norm", kernels.layer_norm, lambda a, k, out: (a[0].dtype, out.dtype))
    spy("add_layer_norm", kernels.add_layer_norm, lambda a, k, out: (a[0].dtype, a[1].dtype, out[0].dtype, out[1].dtype))
    spy("linear_cross_entropy", kernels.linear_cross_entropy,
        lambda a, k, out: (a[0].dtype, a[1].dtype, k["compute_dtype"]))
    torch.manual_seed(8)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=101)
    reference = GPT(cfg).to(device)
    fused = GPT(cfg, KernelsConfig(layernorm=True, cross_entropy=True)).to(device)
    fused.load_state_dict(reference.state_dict())
    x, y = torch.randint(0, 101, (2, 4, 16), device=device)
    results = []
    for model in (reference, fused):
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(x, y)
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    bf16, fp32 = torch.bfloat16, torch.float32
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        assert reference(x).dtype == bf16  # the PyTorch path's lm_head runs in bf16 too
    assert seen[0] == ("layer_norm", fp32, bf16)  # embedding stream in, bf16 for the first matmul out
    assert [s for s in seen if s[0] == "add_layer_norm"] == [("add_layer_norm", bf16, fp32, bf16, fp32)] * 4
    assert seen[-1] == ("linear_cross_entropy", bf16, fp32, bf16)
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
