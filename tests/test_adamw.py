"""gptfast.optim.FusedAdamW (kernels/adamw.py) against torch.optim.AdamW(foreach=False)."""

import copy

import pytest
import torch

from gptfast.optim import FusedAdamW

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL = 1e-6  # fp32: relative to each tensor's norm


def small_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Embedding(37, 24), torch.nn.Linear(24, 50), torch.nn.GELU(),
                               torch.nn.LayerNorm(50), torch.nn.Linear(50, 37)).to(DEVICE)


def groups(model, weight_decay=0.1):
    """Two groups, as the trainer builds them: decay on 2-D weights only."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def loss_of(model, step):
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randint(0, 37, (16, 9), generator=gen).to(DEVICE)
    y = torch.randint(0, 37, (16, 9), generator=gen).to(DEVICE)
    return torch.nn.functional.cross_entropy(model(x).reshape(-1, 37), y.reshape(-1))


def assert_rel_close(a, b, what):
    err = ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
    assert err <= RTOL, f"{what}: relative error {err:.2e}"


def assert_same_training_state(ours_model, ours_opt, ref_model, ref_opt):
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
        assert_rel_close(p, q, name)
        s, t = ours_opt.state[p], ref_opt.state[q]
        assert float(s["step"]) == float(t["step"])
        assert_rel_close(s["exp_avg"], t["exp_avg"], f"{name} exp_avg")
        assert_rel_close(s["exp_avg_sq"], t["exp_avg_sq"], f"{name} exp_avg_sq")


def train(model, opt, steps, clip=None, lr_schedule=None, grad_dtype=None, start=0):
    norms = []
    for step in range(start, start + steps):
        opt.zero_grad()
        loss_of(model, step).backward()
        if grad_dtype is not None:
            for p in model.parameters():
                p.grad = p.grad.to(grad_dtype)
        if clip is not None and not isinstance(opt, FusedAdamW):
            norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
        if lr_schedule is not None:
            for group in opt.param_groups:
                group["lr"] = lr_schedule(step)
        opt.step()
        if isinstance(opt, FusedAdamW):
            norms.append(opt.grad_norm.clone())
    return norms


@pytest.mark.parametrize("clip", [None, 0.5], ids=["no_clip", "clip"])
@pytest.mark.parametrize("schedule", [None, lambda s: 3e-3 * (s + 1) / 20], ids=["fixed_lr", "lr_every_step"])
def test_matches_torch_adamw(clip, schedule):
    ours_model, ref_model = small_model(), small_model()
    ours = FusedAdamW(groups(ours_model), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=clip)
    ref = torch.optim.AdamW(groups(ref_model), lr=3e-3, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    our_norms = train(ours_model, ours, 20, clip, schedule)
    ref_norms = train(ref_model, ref, 20, clip, schedule)
    assert_same_training_state(ours_model, ours, ref_model, ref)
    if clip is not None:
        torch.testing.assert_close(torch.stack(our_norms), torch.stack(ref_norms), rtol=1e-5, atol=0)
        assert any(n > clip for n in ref_norms)  # the clip did act


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_precision_gradients(grad_dtype):
    """bf16 / fp16 gradients, fp32 parameters and moments. Both optimizers get the same gradients
    each step (computed on our model; upcast for torch.optim.AdamW, which wants them in the
    parameters' dtype), so only the optimizers' arithmetic is compared: a trajectory of its own
    would let bf16 rounding amplify fp32-level differences."""
    if not hasattr(torch.Tensor, "grad_dtype"):
        pytest.skip("this torch cannot hold low-precision gradients on fp32 parameters (no Tensor.grad_dtype)")
    ours_model, ref_model = small_model(), small_model()
    for p in ours_model.parameters():
        p.grad_dtype = None  # allow gradients in another dtype than the parameter's
    ours = FusedAdamW(groups(ours_model), lr=3e-3, max_grad_norm=1.0)
    ref = torch.optim.AdamW(groups(ref_model), lr=3e-3, foreach=False)
    for step in range(20):
        ours.zero_grad()
        loss_of(ours_model, step).backward()
        for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
            p.grad = p.grad.to(grad_dtype)
            q.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 1.0)
        ours.step()
        ref.step()
    assert_same_training_state(ours_model, ours, ref_model, ref)


@pytest.mark.parametrize("first", ["fused", "torch"])
def test_state_dict_moves_between_the_two(first):
    """k steps with one optimizer, its state_dict loaded into the other, more steps: the same
    parameters as running the first optimizer all along."""
    make = {"fused": lambda m: FusedAdamW(groups(m), lr=2e-3),
            "torch": lambda m: torch.optim.AdamW(groups(m), lr=2e-3, foreach=False)}
    second = "torch" if first == "fused" else "fused"
    straight_model = small_model()
    straight = make[first](straight_model)
    train(straight_model, straight, 12)

    model = small_model()
    opt = make[first](model)
    train(model, opt, 6)
    state = copy.deepcopy(opt.state_dict())
    moved_model = copy.deepcopy(model)
    moved = make[second](moved_model)
    moved.load_state_dict(state)
    train(moved_model, moved, 6, start=6)
    for (name, p), q in zip(moved_model.named_parameters(), straight_model.parameters(), strict=True):
        assert_rel_close(p, q, name)
    assert set(moved.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_one_launch_for_every_tensor(monkeypatch):
    import kernels.adamw as adamw

    launches = []
    for name in ("_adamw_kernel", "_grad_sq_norm_kernel"):
        kernel = getattr(adamw, name)

        class Counting:
            def __init__(self, kernel, name):
                self.kernel, self.name = kernel, name

            def __getitem__(self, grid):
                launches.append(self.name)
                return self.kernel[grid]

        monkeypatch.setattr(adamw, name, Counting(kernel, name))
    model = small_model()
    opt = FusedAdamW(groups(model), lr=1e-3, max_grad_norm=1.0)
    train(model, opt, 3)
    assert len(list(model.parameters())) == 7
    assert launches == ["_grad_sq_norm_kernel", "_adamw_kernel"] * 3


def test_grad_norm_is_accurate():
    """The norm used for clipping, against an fp64 reference, on a gradient of 1.6M elements."""
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.zeros(*shape, device=DEVICE)) for shape in ((50304, 32), (32,), (96, 32))]
    for p in params:
        p.grad = (torch.randn(p.shape, generator=gen) * 1e-3).to(DEVICE)
    opt = FusedAdamW(params, max_grad_norm=1.0)
    opt.step()
    exact = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params))
    assert abs(opt.grad_norm.item() - exact.item()) <= 1e-6 * exact.item()


def test_parameters_without_gradients_are_skipped():
    model = small_model()
    frozen = model[1].weight
    before = frozen.detach().clone()
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    opt.zero_grad()
    loss_of(model, 0).backward()
    frozen.grad = None
    opt.step()
    assert torch.equal(frozen, before) and frozen not in opt.state
    assert all(float(opt.state[p]["step"]) == 1 for p in model.parameters() if p is not frozen)


def test_bad_parameters_are_clear_errors():
    with pytest.raises(ValueError, match="empty parameter list"):
        FusedAdamW([])
    with pytest.raises(TypeError, match="must be float32"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16, device=DEVICE))])
    with pytest.raises(ValueError, match="one device"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(3, device=DEVICE)), torch.nn.Parameter(torch.zeros(3, device="meta"))])
    with pytest.raises(ValueError, match="max_grad_norm"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(3, device=DEVICE))], max_grad_norm=0.0)
    embedding = torch.nn.Embedding(10, 4, sparse=True).to(DEVICE)
    opt = FusedAdamW(embedding.parameters())
    embedding(torch.tensor([1, 2], device=DEVICE)).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()


def test_misaligned_tensors_are_refused():
    """The element-wise kernels declare every base pointer 16-byte aligned (for 128-bit accesses);
    a tensor that is not, such as a view one element in, is refused rather than misread."""
    import importlib

    adamw = importlib.import_module("kernels.adamw")
    base = torch.zeros(64)
    adamw.aligned_addresses([base, base[4:]], torch.device("cpu"))  # 16 bytes in: aligned
    with pytest.raises(ValueError, match="16-byte aligned"):
        adamw.aligned_addresses([base, base[1:]], torch.device("cpu"))


def test_a_non_contiguous_parameter_is_refused_at_construction():
    weight = torch.nn.Parameter(torch.zeros(6, 4, device=DEVICE).t())
    with pytest.raises(ValueError, match=r"parameter 1 \(shape \(4, 6\), strides \(1, 4\)\) is not contiguous"):
        FusedAdamW([torch.nn.Parameter(torch.zeros(3, device=DEVICE)), weight])


def test_a_nan_gradient_norm_with_clipping_gives_nan_as_torch_does():
    """clip_grad_norm_'s coefficient is NaN for a NaN norm, so torch's clipped AdamW writes NaN
    everywhere; min(nan, 1) = 1 would step unclipped instead."""
    params = [torch.nn.Parameter(torch.ones(5, device=DEVICE)), torch.nn.Parameter(torch.ones(3, device=DEVICE))]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, reference, strict=True):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)
    params[0].grad[2] = float("nan")
    reference[0].grad[2] = float("nan")
    FusedAdamW(params, lr=0.1, max_grad_norm=1.0).step()
    torch.nn.utils.clip_grad_norm_(reference, 1.0)
    torch.optim.AdamW(reference, lr=0.1, weight_decay=1e-2, foreach=False).step()
    for got, want in zip(params, reference, strict=True):
        assert torch.isnan(want).all() and torch.isnan(got).all()


def test_a_norm_computed_before_new_gradients_is_not_reused():
    """compute_grad_norm(), then zero_grad and new gradients: step() applies the new gradients,
    clipped by their own norm, not the prepared ones."""
    def run(prepare_first: bool, set_to_none: bool):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(8, device=DEVICE))
        opt = FusedAdamW([p], lr=0.1, max_grad_norm=1.0)
        if prepare_first:
            p.grad = torch.full_like(p, 5.0)
            opt.compute_grad_norm()
            opt.zero_grad(set_to_none=set_to_none)
        p.grad = torch.full_like(p, -3.0) if p.grad is None else p.grad.fill_(-3.0)
        opt.step()
        return p.detach().clone(), opt.grad_norm.item()

    fresh = run(False, True)
    for set_to_none in (True, False):
        got = run(True, set_to_none)
        torch.testing.assert_close(got[0], fresh[0])
        assert got[1] == pytest.approx(fresh[1])
