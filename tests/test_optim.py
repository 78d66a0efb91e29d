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
