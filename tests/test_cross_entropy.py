"""kernels.cross_entropy against F.cross_entropy: losses and gradients for every reduction, ignored
targets, awkward shapes, fp32 and bf16, poisoned outputs, the fused linear + cross-entropy's
memory, and the model with the kernel on and off."""

import pytest
import torch
import torch.nn.functional as F

from kernels import cross_entropy, linear_cross_entropy
from kernels.cross_entropy import chunk_rows, cross_entropy_launch
from reference import ATOL, assert_close_by_rule, cross_entropy_ref, soft_cap_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 5), (7, 50257), (130, 1000), (64, 50304), (33, 257)]
REDUCTIONS = ["mean", "sum", "none"]


def make_targets(n_rows, vocab, gen, ignore_share=0.2, ignore_index=-100):
    targets = torch.randint(0, vocab, (n_rows,), generator=gen)
    ignored = torch.rand(n_rows, generator=gen) < ignore_share
    ignored[0] = False  # at least one counted row, so "mean" is defined (all-ignored has its own test)
    targets[ignored] = ignore_index
    return targets.to(DEVICE)


def grad_output_for(loss, gen):
    """Not 1: a random scalar, or a random vector for reduction="none"."""
    return (torch.rand(loss.shape, generator=gen) * 2 + 0.5).to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_matches_torch(shape, dtype, reduction):
    seed = torch.seed() % 2**31  # fresh inputs every run; the seed is in any failure message
    gen = torch.Generator().manual_seed(seed)
    n_rows, vocab = shape
    logits = (torch.randn(n_rows, vocab, generator=gen) * 3).to(DEVICE, dtype).requires_grad_()
    targets = make_targets(n_rows, vocab, gen)
    ours = cross_entropy(logits, targets, reduction=reduction)
    same = cross_entropy_ref(logits, targets, reduction=reduction)  # fp32 math, as torch does under autocast
    ref64 = logits.detach().double().requires_grad_()
    exact = cross_entropy_ref(ref64, targets, reduction=reduction)
    go = grad_output_for(ours, gen)
    (g_ours,) = torch.autograd.grad(ours, logits, go)
    (g_same,) = torch.autograd.grad(same, logits, go)
    (g_exact,) = torch.autograd.grad(exact, ref64, go.double())
    assert ours.dtype == torch.float32 and ours.shape == exact.shape
    assert g_ours.dtype == dtype
    assert_close_by_rule(ours, same, exact, ATOL[torch.float32], f"loss (seed {seed})")
    assert_close_by_rule(g_ours, g_same, g_exact, ATOL[dtype], f"grad (seed {seed})")
    assert torch.all(g_ours[targets == -100] == 0)


def test_other_ignore_index_and_all_ignored():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 40, generator=gen).to(DEVICE).requires_grad_()
    targets = make_targets(9, 40, gen, ignore_share=0.5, ignore_index=3)
    ours = cross_entropy(logits, targets, ignore_index=3)
    want = F.cross_entropy(logits, targets, ignore_index=3)
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], torch.autograd.grad(want, logits)[0])
    everything = torch.full((9,), -100, device=DEVICE)
    loss = cross_entropy(logits, everything)
    assert torch.isnan(loss)  # 0 / 0, as F.cross_entropy gives
    assert torch.equal(torch.autograd.grad(loss, logits)[0], torch.zeros_like(logits))


def test_launcher_writes_every_element():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(21, 5000, generator=gen).to(DEVICE, torch.bfloat16)
    targets = make_targets(21, 5000, gen)
    nan = float("nan")
    lse, loss = torch.full((21, 2), nan, device=DEVICE), torch.full((21,), nan, device=DEVICE)
    grad = torch.full_like(logits, nan)
    n_valid = (targets != -100).sum().float()
    cross_entropy_launch(logits, targets, -100, lse, loss=loss, grad=grad,
                         grad_output=torch.ones(1, device=DEVICE), n_valid=n_valid)
    assert torch.isfinite(lse).all() and torch.isfinite(loss).all() and torch.isfinite(grad).all()
    torch.testing.assert_close(lse[:, 0], logits.float().max(dim=-1).values)  # (row max, log shifted sum)
    torch.testing.assert_close(lse.sum(-1), torch.logsumexp(logits.float(), dim=-1))
    with pytest.raises(ValueError, match=r"lse must be float32 \(21, 2\)"):
        cross_entropy_launch(logits, targets, -100, torch.empty(21, device=DEVICE), loss=loss)


def test_logits_are_kept_unless_inplace_is_asked():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(16, 300, generator=gen).to(DEVICE).requires_grad_()
    before = logits.detach().clone()
    targets = make_targets(16, 300, gen)
    (grad,) = torch.autograd.grad(cross_entropy(logits, targets), logits)
    assert torch.equal(logits.detach(), before)
    work = before.clone().requires_grad_()
    view = work * 1.0  # a non-leaf the caller no longer needs
    (grad_inplace,) = torch.autograd.grad(cross_entropy(view, targets, inplace_backward=True), work)
    torch.testing.assert_close(grad_inplace, grad)
    torch.testing.assert_close(view.detach(), grad)  # the logits' storage now holds the gradient


def test_bad_targets_and_arguments():
    logits = torch.randn(4, 10, device=DEVICE)
    with pytest.raises(RuntimeError, match=r"outside \[0, 10\)"):
        cross_entropy(logits, torch.tensor([0, 1, 10, 2], device=DEVICE))
    with pytest.raises(RuntimeError, match=r"outside \[0, 10\)"):
        cross_entropy(logits, torch.tensor([0, -1, 3, 2], device=DEVICE))
    with pytest.raises(ValueError, match="targets must be int64"):
        cross_entropy(logits, torch.tensor([0, 1, 2, 3], device=DEVICE, dtype=torch.int32))
    with pytest.raises(ValueError, match="reduction must be one of"):
        cross_entropy(logits, torch.tensor([0, 1, 2, 3], device=DEVICE), reduction="avg")
    with pytest.raises(ValueError, match="must share C"):
        linear_cross_entropy(torch.randn(4, 8, device=DEVICE), torch.randn(10, 9, device=DEVICE),
                             torch.zeros(4, dtype=torch.long, device=DEVICE), chunk_bytes=2**20)


def test_cpu_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        cross_entropy(torch.randn(2, 8), torch.tensor([1, 2]))


def test_deterministic_bits():
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(300, 32, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(700, 32, generator=gen).to(DEVICE).requires_grad_()
    targets = make_targets(300, 700, gen)
    runs = []
    for _ in range(2):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_bytes=700 * 4 * 128)
        runs.append((loss,) + torch.autograd.grad(loss, (hidden, weight)))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("n_rows, width, vocab", [(130, 64, 1000), (37, 48, 50257), (300, 24, 515)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_fp32(n_rows, width, vocab, reduction):
    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_rows, width, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) * 0.2).to(DEVICE).requires_grad_()
    targets = make_targets(n_rows, vocab, gen)
    # a small budget forces several chunks, the last one partial
    ours = linear_cross_entropy(hidden, weight, targets, reduction=reduction, chunk_bytes=vocab * 4 * 128)
    want = F.cross_entropy(hidden @ weight.T, targets, reduction=reduction)
    go = grad_output_for(ours, gen)
    got_grads = torch.autograd.grad(ours, (hidden, weight), go)
    want_grads = torch.autograd.grad(want, (hidden, weight), go)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5, msg=f"loss (seed {seed})")
    for name, a, b in zip(("grad_hidden", "grad_weight"), got_grads, want_grads, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=f"{name} (seed {seed})")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_bf16(reduction):
    """bf16 matmuls: error against an fp64 reference within twice the PyTorch bf16 path's."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(200, 64, generator=gen).to(DEVICE, torch.bfloat16).requires_grad_()
    weight = (torch.randn(3001, 64, generator=gen) * 0.2).to(DEVICE).requires_grad_()  # fp32 master weight
    targets = make_targets(200, 3001, gen)
    ours = linear_cross_entropy(hidden, weight, targets, reduction=reduction, compute_dtype=torch.bfloat16,
                                chunk_bytes=3001 * 2 * 64)
    same = cross_entropy_ref(hidden @ weight.to(torch.bfloat16).T, targets, reduction=reduction)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = F.cross_entropy(h64 @ w64.T, targets, reduction=reduction)
    go = grad_output_for(ours, gen)
    g_ours = torch.autograd.grad(ours, (hidden, weight), go)
    g_same = torch.autograd.grad(same, (hidden, weight), go)
    g_exact = torch.autograd.grad(exact, (h64, w64), go.double())
    assert g_ours[0].dtype == torch.bfloat16 and g_ours[1].dtype == torch.float32
    assert_close_by_rule(ours, same, exact, ATOL[torch.bfloat16], "loss")
    for name, a, b, c in zip(("grad_hidden", "grad_weight"), g_ours, g_same, g_exact, strict=True):
        assert_close_by_rule(a, b, c, ATOL[torch.bfloat16], name)


def test_linear_cross_entropy_saves_nothing_of_size_n_by_v():
    n_rows, width, vocab = 512, 32, 4000
    hidden = torch.randn(n_rows, width, device=DEVICE, requires_grad=True)
    weight = torch.randn(vocab, width, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, vocab, (n_rows,), device=DEVICE)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = linear_cross_entropy(hidden, weight, targets, chunk_bytes=vocab * 4 * 128)
    assert saved and max(saved) < n_rows * vocab / 4, saved
    loss.backward()
    assert hidden.grad.shape == hidden.shape and weight.grad.shape == weight.shape
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        reference = F.cross_entropy(hidden @ weight.T, targets)
    assert max(saved) >= n_rows * vocab  # the unfused path does keep the logits
    reference.backward()


def test_chunk_rows():
    assert chunk_rows(8192, 50257, 2, 256 * 2**20) == 2624  # ~256 MiB of bf16 logits per chunk
    assert chunk_rows(8192, 50257, 2, 1) == 128  # never tiny chunks
    assert chunk_rows(100, 50257, 2, 256 * 2**20) == 100
    assert chunk_rows(8192, 1000, 4, 256 * 2**20) == 8192


def test_compiles_without_graph_break():
    gen = torch.Generator().manual_seed(6)
    hidden = torch.randn(64, 16, generator=gen).to(DEVICE).requires_grad_()
    weight = torch.randn(300, 16, generator=gen).to(DEVICE).requires_grad_()
    targets = make_targets(64, 300, gen)

    def loss_fn(h, w, t):
        return linear_cross_entropy(torch.tanh(h), w, t, chunk_bytes=2**20) + cross_entropy(h @ w.T, t, reduction="sum") / 64

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(hidden, weight, targets)
    want = loss_fn(hidden, weight, targets)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, (hidden, weight)), torch.autograd.grad(want, (hidden, weight)), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_other_ignore_index(reduction):
    """A non-default, in-vocabulary ignore_index through the chunked path: those rows count for
    nothing, and every other row as F.cross_entropy counts it. Mutants caught: the kernel comparing
    with -100 (or `target < 0`) instead of ignore_index, the linear path not passing it on."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    n_rows, width, vocab, ignore = 300, 24, 517, 7
    hidden = torch.randn(n_rows, width, generator=gen).to(DEVICE).requires_grad_()
    weight = (torch.randn(vocab, width, generator=gen) * 0.3).to(DEVICE).requires_grad_()
    targets = make_targets(n_rows, vocab, gen, ignore_share=0.3, ignore_index=ignore)
    targets[1] = 0  # a class below the ignore_index still counts
    ours = linear_cross_entropy(hidden, weight, targets, ignore_index=ignore, reduction=reduction,
                                chunk_bytes=vocab * 4 * 128)
    want = F.cross_entropy(hidden @ weight.T, targets, ignore_index=ignore, reduction=reduction)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)
    go = grad_output_for(ours, gen)
    for got, exp in zip(torch.autograd.grad(ours, (hidden, weight), go),
                        torch.autograd.grad(want, (hidden, weight), go), strict=True):
        torch.testing.assert_close(got, exp, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_padded_vocabulary(reduction, dtype):
    """The model's call: the whole padded weight, n_classes the real vocabulary. The same loss and
    gradients as the unfused loss over the real rows; the padding rows get gradient 0, whatever
    their values (here large, so an unmasked softmax would be far off)."""
    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    n_rows, width, vocab, padded = 77, 40, 1003, 1024
    hidden = torch.randn(n_rows, width, generator=gen).to(DEVICE, dtype).requires_grad_()
    weight = (torch.randn(padded, width, generator=gen) * 0.2).to(DEVICE)
    weight[vocab:] = 3.0
    weight.requires_grad_()
    targets = make_targets(n_rows, vocab, gen)
    ours = linear_cross_entropy(hidden, weight, targets, n_classes=vocab, reduction=reduction, compute_dtype=dtype,
                                chunk_bytes=padded * 4 * 64)
    same = cross_entropy_ref(hidden @ weight[:vocab].to(dtype).T, targets, reduction=reduction)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = F.cross_entropy(h64 @ w64[:vocab].T, targets, reduction=reduction)
    go = grad_output_for(ours, gen)
    g_ours = torch.autograd.grad(ours, (hidden, weight), go)
    g_same = torch.autograd.grad(same, (hidden, weight), go)
    g_exact = torch.autograd.grad(exact, (h64, w64), go.double())
    assert torch.all(g_ours[1][vocab:] == 0)
    assert_close_by_rule(ours, same, exact, ATOL[dtype], f"loss (seed {seed})")
    for name, a, b, c in zip(("grad_hidden", "grad_weight"), g_ours, g_same, g_exact, strict=True):
        assert_close_by_rule(a, b, c, ATOL[dtype], f"{name} (seed {seed})")
    with pytest.raises(RuntimeError, match="outside"):  # a padding id is no class
        bad = targets.clone()
        bad[1] = vocab
        linear_cross_entropy(hidden, weight, bad, n_classes=vocab, chunk_bytes=None)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_cross_entropy_soft_cap(reduction, dtype):
    """The soft cap inside the kernel: the loss of cap * tanh(logits / cap) and its gradients through
    the cap, against the unfused capped loss, over a padded vocabulary in several chunks. Logits
    reach +-60 against a cap of 15, so the cap and its derivative (1 - tanh^2) both matter."""
    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    n_rows, width, vocab, padded, cap = 150, 24, 1003, 1024, 15.0
    hidden = (torch.randn(n_rows, width, generator=gen) * 3).to(DEVICE, dtype).requires_grad_()
    weight = torch.randn(padded, width, generator=gen).to(DEVICE)
    weight[vocab:] = 3.0
    weight.requires_grad_()
    targets = make_targets(n_rows, vocab, gen)
    ours = linear_cross_entropy(hidden, weight, targets, n_classes=vocab, reduction=reduction, compute_dtype=dtype,
                                chunk_bytes=padded * 4 * 64, softcap=cap)
    same = cross_entropy_ref(soft_cap_ref(hidden @ weight[:vocab].to(dtype).T, cap), targets, reduction=reduction)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    exact = F.cross_entropy(soft_cap_ref(h64 @ w64[:vocab].T, cap), targets, reduction=reduction)
    go = grad_output_for(ours, gen)
    g_ours = torch.autograd.grad(ours, (hidden, weight), go)
    g_same = torch.autograd.grad(same, (hidden, weight), go)
    g_exact = torch.autograd.grad(exact, (h64, w64), go.double())
    assert torch.all(g_ours[1][vocab:] == 0)
    uncapped = F.cross_entropy(h64 @ w64[:vocab].T, targets, reduction=reduction)
    assert not torch.allclose(exact, uncapped, rtol=0.05), "the cap must change the loss here"
    assert_close_by_rule(ours, same, exact, ATOL[dtype], f"loss (seed {seed})")
    for name, a, b, c in zip(("grad_hidden", "grad_weight"), g_ours, g_same, g_exact, strict=True):
        assert_close_by_rule(a, b, c, ATOL[dtype], f"{name} (seed {seed})")


def test_soft_cap_of_zero_is_off_and_negative_is_an_error():
    gen = torch.Generator().manual_seed(8)
    hidden = torch.randn(9, 8, generator=gen).to(DEVICE)
    weight = torch.randn(70, 8, generator=gen).to(DEVICE)
    targets = make_targets(9, 70, gen)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_bytes=None, softcap=0.0),
                               cross_entropy_ref(hidden @ weight.T, targets))
    with pytest.raises(ValueError, match="softcap must be >= 0"):
        linear_cross_entropy(hidden, weight, targets, chunk_bytes=None, softcap=-1.0)


def test_linear_cross_entropy_chunk_from_free_memory_is_one_chunk_when_it_fits(monkeypatch):
    import importlib

    ce = importlib.import_module("kernels.cross_entropy")
    launches = []
    real = ce.cross_entropy_launch
    monkeypatch.setattr(ce, "cross_entropy_launch", lambda logits, *a, **k: (launches.append(logits.shape),
                                                                              real(logits, *a, **k)))
    hidden = torch.randn(300, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(640, 16, device=DEVICE, requires_grad=True)
    targets = torch.randint(0, 600, (300,), device=DEVICE)
    loss = linear_cross_entropy(hidden, weight, targets, n_classes=600, chunk_bytes=None)
    assert launches == [(300, 640)]
    torch.testing.assert_close(loss, F.cross_entropy(hidden @ weight[:600].T, targets))


def test_linear_cross_entropy_materialises_no_unused_gradient():
    """Backward zero-fills nothing the size of the weight: the op's two gradient outputs are not
    differentiated, and their gradients are not materialised (set_materialize_grads(False))."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.shapes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func in (torch.ops.aten.zeros.default, torch.ops.aten.zeros_like.default, torch.ops.aten.fill_.Scalar,
                        torch.ops.aten.zero_.default, torch.ops.aten.new_zeros.default):
                self.shapes.append(tuple(out.shape))
            return out

    hidden = torch.randn(64, 16, device=DEVICE, requires_grad=True)
    weight = torch.randn(128, 16, device=DEVICE, requires_grad=True)
    loss = linear_cross_entropy(hidden, weight, torch.randint(0, 128, (64,), device=DEVICE), chunk_bytes=None)
    with Fills() as fills:
        loss.backward()
    assert (128, 16) not in fills.shapes and (64, 16) not in fills.shapes, fills.shapes


@pytest.mark.parametrize("view", ["every_other", "column"])
def test_strided_targets_give_torchs_loss(view):
    """t[::2] and t[:, 0] have a stride other than one: the kernel must not read t's neighbours."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(37, 67, generator=g, requires_grad=True)
    base = torch.randint(0, 67, (74, 3), generator=g)
    targets = base[::2, 1] if view == "every_other" else base[:37, 0]
    assert targets.stride(0) != 1
    loss = cross_entropy(logits, targets)
    loss.backward()
    want = torch.nn.functional.cross_entropy(logits.detach().requires_grad_(), targets)
    torch.testing.assert_close(loss, want)
    hidden, weight = torch.randn(37, 16, generator=g), torch.randn(67, 16, generator=g)
    torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets, chunk_bytes=4096),
                               torch.nn.functional.cross_entropy(hidden @ weight.T, targets), rtol=1e-5, atol=1e-5)


def test_a_first_block_of_minus_infinity_is_no_nan():
    """A row whose first block of logits is entirely -inf (a masked prefix): the online log-sum-exp
    shifts by 0 there instead of computing exp(-inf - -inf). The interpreter's block is the whole
    row up to 64k columns, so the row is longer than that."""
    n_cols = 65536 + 64
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, n_cols, generator=g)
    logits[:, :65536] = float("-inf")
    targets = torch.tensor([65540, 65600 - 1])
    loss = cross_entropy(logits, targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, targets))


@pytest.mark.parametrize("softcap", [0.0, 15.0])
def test_many_column_blocks_per_row_match_torch(monkeypatch, softcap):
    """The GPU's 4096-column blocks, at a size the interpreter runs: a 64-column block, so each row
    of 1,000 classes (padding to 1,024 columns left out) takes 16 iterations of the per-lane online
    log-sum-exp; one row's first three blocks are -inf (a masked prefix), one lane -inf throughout."""
    import importlib

    ce_module = importlib.import_module("kernels.cross_entropy")  # the module, not the function
    monkeypatch.setattr(ce_module, "_block_v", lambda n_cols, device: (64, 1))
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    n_rows, n_cols, n_classes = 7, 1024, 1000
    logits = (torch.randn(n_rows, n_cols, generator=g) * 4).to(DEVICE)
    logits[0, :192] = float("-inf")
    logits[1, 5::64] = float("-inf")
    targets = torch.randint(192, n_classes, (n_rows,), generator=g).to(DEVICE)
    lse = torch.empty(n_rows, 2, dtype=torch.float32, device=DEVICE)
    loss = torch.full((n_rows,), float("nan"), device=DEVICE)
    grad = torch.full_like(logits, float("nan"))
    cross_entropy_launch(logits, targets, -100, lse, loss=loss, grad=grad, grad_output=torch.ones(1, device=DEVICE),
                         reduction="sum", n_classes=n_classes, softcap=softcap)
    x = logits[:, :n_classes].double().requires_grad_()
    want = F.cross_entropy(soft_cap_ref(x, softcap), targets, reduction="none")
    (want_grad,) = torch.autograd.grad(want.sum(), x)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
    torch.testing.assert_close(grad[:, :n_classes].double(), want_grad, rtol=1e-5, atol=1e-6, msg=f"seed {seed}")
    assert torch.all(grad[:, n_classes:] == 0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_promised_grad_scale_gives_the_gradients_without_the_rescaling_pass(reduction, dtype):
    """The trainer's loss / accumulation: told the upstream gradient (1/3) in advance, the forward
    scales the gradients in the kernel and backward returns them as they are: the same gradients
    as scaling afterwards (by the bf16 rule); a different upstream gradient is an error, not a
    silently wrong gradient."""
    seed = torch.seed() % 2**31
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(45, 32, generator=g).to(DEVICE, dtype)
    weight = (torch.randn(131, 32, generator=g) * 0.5).to(DEVICE, dtype)
    targets = torch.randint(0, 120, (45,), generator=g).to(DEVICE)
    grads = {}
    for promise in (0.0, 1 / 3):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = linear_cross_entropy(h, w, targets, chunk_bytes=4096, n_classes=120, reduction=reduction,
                                    grad_scale=promise) / 3
        loss.backward()
        grads[promise] = (loss.detach(), h.grad, w.grad)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    exact = F.cross_entropy((h64 @ w64.T)[:, :120], targets, reduction=reduction) / 3
    exact.backward()
    for i, (got, same, want) in enumerate(zip(grads[1 / 3], grads[0.0], (exact.detach(), h64.grad, w64.grad))):
        assert_close_by_rule(got, same, want, ATOL[dtype if i else torch.float32], f"output {i} (seed {seed})")
    h = hidden.clone().requires_grad_()
    broken = linear_cross_entropy(h, weight, targets, chunk_bytes=4096, n_classes=120, reduction=reduction,
                                  grad_scale=1 / 3) / 2
    with pytest.raises(RuntimeError, match="not the grad_scale promised"):
        broken.backward()


def test_grad_weight_into_needs_a_promise_and_an_fp32_buffer_of_the_weights_shape():
    hidden, weight, targets = torch.randn(4, 16), torch.randn(32, 16), torch.randint(0, 32, (4,))
    buffer = torch.zeros(32, 16)
    with pytest.raises(ValueError, match="needs a grad_scale promise"):
        linear_cross_entropy(hidden, weight, targets, chunk_bytes=None, grad_weight_into=buffer)
    with pytest.raises(ValueError, match=r"must be fp32 \(32, 16\), got torch.bfloat16"):
        linear_cross_entropy(hidden, weight, targets, chunk_bytes=None, grad_scale=0.5,
                             grad_weight_into=buffer.bfloat16())
    loss = linear_cross_entropy(hidden.requires_grad_(), weight, targets, chunk_bytes=None, grad_scale=0.5,
                                grad_weight_into=buffer)
    (loss * 0.5).backward()
    want = torch.autograd.grad(F.cross_entropy(hidden @ weight.requires_grad_().t(), targets) * 0.5, weight)[0]
    torch.testing.assert_close(buffer, want, rtol=1e-5, atol=1e-6)
