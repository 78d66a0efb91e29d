import itertools
import math

import pytest
import torch

from gptfast.config import ModelConfig, OptimConfig
from gptfast.model import GPT
from gptfast.optim import build_optimizer, lr_at, param_groups


def test_weight_decay_only_on_2d_weights():
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    # the tied embedding appears once; together the groups hold every parameter
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    assert opt.defaults["betas"] == (0.9, 0.95)


@pytest.mark.parametrize("step, expected", [
    (0, 1e-3 * 1 / 10), (4, 1e-3 * 5 / 10), (9, 1e-3),  # linear warmup over 10 steps
    (10, 1e-3),  # cosine starts at the peak
    (60, 1e-4 + 0.5 * (1e-3 - 1e-4)),  # halfway through the decay
    (110, 1e-4), (5000, 1e-4),  # min_lr at and after lr_decay_steps
])
def test_lr_schedule(step, expected):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, lr_decay_steps=110)
    assert math.isclose(lr_at(step, cfg, max_steps=10_000), expected, rel_tol=1e-12)  # pinned: max_steps ignored
    follows = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, lr_decay_steps=0)
    assert math.isclose(lr_at(step, follows, max_steps=110), expected, rel_tol=1e-12)


def test_lr_schedule_without_warmup_is_monotone():
    cfg = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=0, lr_decay_steps=50)
    rates = [lr_at(s, cfg, 60) for s in range(60)]
    assert rates[0] == 1e-3 and rates[50] == 0.0
    assert all(a >= b for a, b in itertools.pairwise(rates))


def test_a_shorter_run_gets_the_whole_schedule():
    """lr_decay_steps = 0 (the configs' default): --train.max_steps=2000 on a 19073-step config
    decays to min_lr by step 2000 instead of stopping near the peak."""
    cfg = OptimConfig(lr=6e-4, min_lr=6e-5, warmup_steps=700, lr_decay_steps=0)
    assert math.isclose(lr_at(1999, cfg, 2000), 6e-5, rel_tol=1e-3)
    assert lr_at(1999, cfg, 19073) > 5e-4


@pytest.mark.parametrize("step, expected", [
    (0, 1e-3 / 10), (9, 1e-3),  # warmup
    (10, 1e-3), (79, 1e-3),  # stable until the last 20% of 100 steps
    (80, 1e-3), (90, 1e-4 + (1e-3 - 1e-4) * 10 / 20), (99, 1e-4 + (1e-3 - 1e-4) / 20),  # linear cooldown
    (100, 1e-4), (150, 1e-4),
])
def test_warmup_stable_decay(step, expected):
    cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, schedule="wsd", cooldown_fraction=0.2)
    assert math.isclose(lr_at(step, cfg, 100), expected, rel_tol=1e-12)


def scheduled(lr=1e-3, grad_clip=1.0, triton_adamw=False):
    from gptfast.optim import build_scheduled_optimizer

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=50))
    cfg = OptimConfig(lr=lr, min_lr=lr / 10, warmup_steps=2, grad_clip=grad_clip)
    return model, build_scheduled_optimizer(model, cfg, 10, torch.device("cpu"), triton_adamw, float16=False)


def backward(model, opt, scale=1.0):
    idx = torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(1))
    opt.backward(model(idx, idx) * scale)


def test_loading_a_checkpoint_keeps_this_runs_peak_rates():
    model, opt = scheduled(lr=1e-3)
    backward(model, opt)
    opt.step()
    state = opt.state_dict()
    _, other = scheduled(lr=5e-4)
    other.load_state_dict(state)
    assert [g["peak_lr"] for g in other.param_groups] == [5e-4, 5e-4]
    other.set_lr(5)
    assert all(g["lr"] == pytest.approx(lr_at(5, other.cfg, 10)) for g in other.param_groups)


@pytest.mark.parametrize("triton_adamw", [False, True], ids=["torch", "fused"])
def test_clip_and_norm_clips_only_when_asked(triton_adamw):
    for grad_clip in (0.0, 1e-3):
        model, opt = scheduled(grad_clip=grad_clip, triton_adamw=triton_adamw)
        backward(model, opt, scale=100.0)
        before = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        norm = opt.clip_and_norm()
        torch.testing.assert_close(norm, before)
        after = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
        if grad_clip == 0.0 or triton_adamw:  # FusedAdamW clips inside its step, from this norm
            torch.testing.assert_close(after, before)
        else:
            torch.testing.assert_close(after, torch.tensor(grad_clip), rtol=1e-4, atol=0)


def test_a_skipped_step_changes_nothing_and_the_next_norm_is_fresh():
    model, opt = scheduled(triton_adamw=True)
    backward(model, opt)
    opt.clip_and_norm()
    weights = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()  # a skipped step: not stepped on
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    backward(model, opt, scale=3.0)
    opt.step()  # its own norm of these gradients, not the skipped step's
    torch.testing.assert_close(opt.inner.grad_norm, torch.linalg.vector_norm(
        torch.stack([p.grad.norm() for p in model.parameters()])))
