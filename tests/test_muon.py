"""Muon: the orthogonalised update checked on its own, the parameter split, and Muon runs in the
trainer (loss falls, clear errors; exact resume with every kernel switch is in test_trainer.py)."""

import json

import pytest
import torch

from gptfast.config import ModelConfig
from gptfast.errors import ConfigError
from gptfast.model import GPT
from gptfast.muon import Muon, MuonAdamW, muon_param_groups, newton_schulz
from gptfast.trainer import Trainer


def quiet(_):
    pass


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 100), (4, 3, 48, 48), (256, 256)])
def test_newton_schulz_pushes_singular_values_near_one(shape):
    """Five quintic steps do not converge to exactly 1: the singular values land in about
    [0.68, 1.2] (the iteration's design), except a square matrix's very smallest, which start
    near 0. A matrix whose singular values span 30x comes out within 0.5-1.3 wholly."""
    seed = sum(shape)
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    singular = torch.linalg.svdvals(newton_schulz(g, steps=5).double())
    inside = (singular > 0.5) & (singular < 1.3)
    assert singular.max() < 1.3 and inside.double().mean() > 0.95, singular
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    spread = u @ torch.diag_embed(torch.logspace(-1.5, 0, s.shape[-1], dtype=torch.float64)) @ vh
    o = newton_schulz(spread.float(), steps=5)
    singular = torch.linalg.svdvals(o.double())
    assert singular.min() > 0.5 and singular.max() < 1.3, singular
    # the same singular vectors: o is ~ U V^T of g
    u, _, vh = torch.linalg.svd(g.double(), full_matrices=False)
    polar = u @ vh
    cosine = (o.double() * polar).sum((-2, -1)) / (o.double().norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
    assert torch.all(cosine > 0.9), cosine


def small_model():
    torch.manual_seed(0)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16))


def test_hidden_matrices_go_to_muon_and_the_rest_to_adamw():
    model = small_model()
    groups, others = muon_param_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in groups for p in g["params"]}
    assert muon_names == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    other_names = {names[id(p)] for p in others}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight"} <= other_names
    assert all(p.dim() < 2 or "wte" in names[id(p)] or "wpe" in names[id(p)] for p in others)
    assert [g["split"] for g in groups] == [3, 1]  # c_attn as q, k, v


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_an_untied_embedding_takes_its_own_rate(arch):
    """optim.muon_embedding_lr: the untied token embedding's AdamW group peaks there and the head
    at lr; a tied embedding is the head, at lr; 0 leaves the embedding at lr. Each parameter is in
    exactly one group."""
    from gptfast.config import OptimConfig
    from gptfast.optim import build_optimizer

    torch.manual_seed(0)
    model = GPT(ModelConfig.for_arch(arch, n_layer=2, n_head=2, n_embd=32, block_size=16))
    for embedding_lr, want in ((0.3, 0.3 if arch == "modern" else 1e-3), (0.0, 1e-3)):
        cfg = OptimConfig(name="muon", lr=1e-3, muon_embedding_lr=embedding_lr)
        optimizer = build_optimizer(model, cfg, torch.device("cpu"))
        peak = {id(p): g["peak_lr"] for g in optimizer.param_groups for p in g["params"]}
        assert sorted(peak) == sorted({id(p) for p in model.parameters()})  # each once
        assert sum(len(g["params"]) for g in optimizer.param_groups) == len(peak)
        assert peak[id(model.transformer.wte.weight)] == want
        assert peak[id(model.lm_head.weight)] == (1e-3 if arch == "modern" else want)


def test_one_step_is_the_orthogonalised_momentum_and_leaves_adamw_parameters_alone():
    model = small_model()
    groups, others = muon_param_groups(model)
    lr, momentum = 0.05, 0.9
    muon = Muon(groups, lr=lr, momentum=momentum, ns_steps=5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        grads[name] = p.grad.clone()
    muon.step()
    for name, p in model.named_parameters():
        delta = (before[name] - p.detach()) / lr
        if any(p is q for q in others):
            assert torch.equal(p.detach(), before[name]), name  # AdamW's parameters: untouched by Muon
            continue
        # first step from a zero buffer: buf = g, Nesterov update g + momentum * buf = (1 + momentum) g;
        # c_attn's q, k and v orthogonalised each on its own, scaled by sqrt(max(1, rows / cols))
        split = 3 if name.endswith("c_attn.weight") else 1
        for block, g in zip(delta.chunk(split, dim=0), grads[name].chunk(split, dim=0), strict=True):
            scale = max(1.0, block.shape[0] / block.shape[1]) ** 0.5
            torch.testing.assert_close(block, scale * newton_schulz((1 + momentum) * g), atol=1e-5, rtol=1e-4)
            singular = torch.linalg.svdvals((block / scale).double())
            assert singular.max() < 1.3 and ((singular > 0.5).double().mean() > 0.9), (name, singular)


def test_state_dict_round_trip_and_refuses_an_adamw_state():
    model = small_model()
    groups, others = muon_param_groups(model)
    opt = MuonAdamW(Muon(groups), torch.optim.AdamW(others))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    state = opt.state_dict()
    again = MuonAdamW(Muon(muon_param_groups(model)[0]), torch.optim.AdamW(others))
    again.load_state_dict(state)
    first = groups[0]["params"][0]
    assert torch.equal(again.muon.state[first]["momentum_buffer"], opt.muon.state[first]["momentum_buffer"])
    with pytest.raises(ValueError, match="same \\[optim\\] name"):
        again.load_state_dict(torch.optim.AdamW(others).state_dict())


MUON = {"optim.name": '"muon"', "optim.muon_lr": 0.02}


def test_muon_lowers_the_loss(tiny_config):
    trainer = Trainer(tiny_config(dict(MUON, **{"train.max_steps": 30, "optim.lr": 3e-3, "optim.lr_decay_steps": 0,
                                                "train.eval_interval": 30,
                                                "train.checkpoint_interval": 30})), log=quiet)
    first = trainer.evaluate()
    assert trainer.run().val_loss < first - 2.0


def test_switching_optimizer_on_resume_is_refused(tiny_config):
    Trainer(tiny_config(), log=quiet).run()
    with pytest.raises(ConfigError, match="optim.name"):
        Trainer(tiny_config(dict(MUON, **{"train.max_steps": 8})), log=quiet)


def test_muon_with_float16_is_one_clear_error(tiny_config):
    with pytest.raises(ConfigError, match="muon does not run with train.dtype = float16"):
        tiny_config(dict(MUON, **{"train.dtype": '"float16"'}))


def test_a_run_stops_at_its_target_val_loss(tiny_config, tmp_path):
    lines = []
    first = Trainer(tiny_config({"train.max_steps": 2}, out_dir=tmp_path / "probe"), log=quiet).evaluate()
    trainer = Trainer(tiny_config({"train.max_steps": 40, "optim.lr": 3e-3, "optim.lr_decay_steps": 0, "train.eval_interval": 2,
                                   "train.checkpoint_interval": 40, "train.target_val_loss": first - 1.0}),
                      log=lines.append)
    result = trainer.run()
    assert result.step < 40 and result.val_loss <= first - 1.0
    reached = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
               if r.get("event") == "target_reached"]
    assert len(reached) == 1 and reached[0]["step"] == result.step
    assert reached[0]["tokens"] == result.step * 256 and reached[0]["train_seconds"] > 0
    assert result.summary["target_reached_step"] == result.step
    assert any(line.startswith(f"target val loss {first - 1.0} reached at step {result.step}") for line in lines)
    assert "target" in lines[-1] and "reached at step" in lines[-1]
    assert (tmp_path / "run" / f"ckpt_{result.step:08d}.pt").exists()  # the run ends with a checkpoint
