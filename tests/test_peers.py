"""A second reference beside PyTorch: our kernels against the peer libraries' on the same inputs
(the `peers` extra). A peer that is not installed, or cannot run here (Liger's LayerNorm and Cut
Cross-Entropy do not run under Triton's interpreter), is skipped with that reason; on a GPU all
of them run."""

import pytest
import torch

import kernels

VOCAB = 50257


def peer_or_skip(provider: str, build, run_tiny):
    pytest.importorskip({"liger": "liger_kernel", "cce": "cut_cross_entropy"}[provider],
                        reason=f"{provider} is not installed (pip install -e \".[peers]\")")
    fn = build()
    try:
        run_tiny(fn)
    except Exception as e:  # the peer's own error types
        pytest.skip(f"{provider} cannot run here: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:150]}")
    return fn


def liger_flce():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    return liger_fused_linear_cross_entropy


def cce_lce():
    from cut_cross_entropy import linear_cross_entropy
    return linear_cross_entropy


def tiny_lce(fn, device="cpu"):
    h = torch.randn(4, 16, requires_grad=True, device=device)
    fn(h, torch.randn(100, 16, device=device), torch.randint(0, 100, (4,), device=device)).backward()


@pytest.mark.parametrize("provider, build", [("liger", liger_flce), ("cce", cce_lce)])
@pytest.mark.parametrize("dtype, loss_tol, grad_tol", [(torch.float32, 1e-4, 1e-4), (torch.bfloat16, 2e-2, 3e-2)])
def test_linear_cross_entropy_agrees_with_the_peer(provider, build, dtype, loss_tol, grad_tol):
    fn = peer_or_skip(provider, build, tiny_lce)
    torch.manual_seed(31)
    n, width, vocab = 37, 48, 1003  # odd sizes; a small vocabulary keeps the interpreter quick
    hidden = torch.randn(n, width, dtype=dtype, requires_grad=True)
    weight = (torch.randn(vocab, width) * 0.1).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,))
    targets[3] = -100  # ignored, in both
    ours = kernels.linear_cross_entropy(hidden, weight, targets, compute_dtype=dtype, chunk_bytes=4096)
    ours_grads = torch.autograd.grad(ours, (hidden, weight))
    theirs = fn(hidden, weight, targets)
    theirs_grads = torch.autograd.grad(theirs, (hidden, weight))
    assert abs(ours.item() - theirs.item()) <= loss_tol * max(1.0, abs(theirs.item()))
    for a, b in zip(ours_grads, theirs_grads, strict=True):
        scale = b.float().abs().max().item()
        assert (a.float() - b.float()).abs().max().item() <= grad_tol * scale


def test_layer_norm_agrees_with_liger():
    def build():
        from liger_kernel.transformers.functional import liger_layer_norm
        return liger_layer_norm

    def tiny(fn):
        x = torch.randn(4, 16, requires_grad=True)
        fn(x, torch.ones(16, requires_grad=True), torch.zeros(16, requires_grad=True), 1e-5).sum().backward()

    fn = peer_or_skip("liger", build, tiny)
    torch.manual_seed(32)
    x = torch.randn(37, 771, requires_grad=True)
    w = torch.randn(771, requires_grad=True)
    b = torch.randn(771, requires_grad=True)
    dy = torch.randn(37, 771)
    ours = kernels.layer_norm(x, w, b, 1e-5)
    theirs = fn(x, w, b, 1e-5)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    for a, c in zip(torch.autograd.grad(ours, (x, w, b), dy), torch.autograd.grad(theirs, (x, w, b), dy), strict=True):
        torch.testing.assert_close(a, c, rtol=1e-3, atol=1e-3)
