"""Activation recomputation and the memory planner (gptfast/memory.py)."""

import dataclasses

import pytest
import torch

from conftest import REPO
from gptfast.config import RECOMPUTE_POLICIES, Config, KernelsConfig, ModelConfig, RecomputeConfig
from gptfast.configfile import load_config
from gptfast.errors import ConfigError
from gptfast.memory import activation_bytes_per_token, budget_bytes, measure_peak_bytes, measure_saved_bytes, plan, predict_peak
from gptfast.model import GPT
from gptfast.plan import main as plan_main

TINY = ModelConfig(n_layer=3, n_head=2, n_embd=64, block_size=32, vocab_size=101)


def batch(cfg=TINY, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (2, 2, cfg.block_size), generator=gen)


def interior_block_bytes(measured: dict, cfg=TINY) -> int:
    """Bytes of every block but the last: the last one also makes the head's inputs."""
    return sum(measured[f"block {i}"] for i in range(cfg.n_layer - 1))


MODERN = {"modern": {}, "modern-learned-positions": {"rotary": False}, "modern-no-qk-norm": {"qk_norm": False},
          "modern-layernorm": {"norm": "layernorm"}}


@pytest.mark.parametrize("arch", ["gpt2", *MODERN])
@pytest.mark.parametrize("fused", [False, True], ids=["pytorch", "fused_kernels"])
def test_saved_bytes_order_and_prediction(fused, arch):
    """none > selective > full, and each within 10% of the planner's per-token formula, for GPT-2
    and for the modern architecture with some of its switches set back (each changes the count)."""
    cfg = TINY if arch == "gpt2" else ModelConfig.for_arch("modern", n_layer=3, n_head=2, n_embd=64, block_size=32,
                                                           vocab_size=101, **MODERN[arch])
    kernels = KernelsConfig(layernorm=True, cross_entropy=True) if fused else KernelsConfig()
    x, y = batch(cfg)
    tokens = x.numel()
    measured = {}
    for policy in RECOMPUTE_POLICIES:
        torch.manual_seed(0)
        model = GPT(cfg, kernels, RecomputeConfig(policy=policy))
        measured[policy] = interior_block_bytes(measure_saved_bytes(model, x, y), cfg)
        predicted = (cfg.n_layer - 1) * tokens * activation_bytes_per_token(cfg, policy, 4, fused)
        assert abs(measured[policy] - predicted) <= 0.10 * predicted, (policy, measured[policy], predicted)
    assert measured["none"] > measured["selective"] > measured["full"]


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_fp8_mlp_saved_bytes_match_the_prediction(arch):
    """kernels.fp8 = "mlp": each policy's interior blocks within 10% of the planner's formula (under
    none the MLP's inputs saved as FP8, 1 B an element, plus the two weights' saved e4m3 transposes,
    8 C^2 B a block; the casts recomputed under selective and full), and under none fewer bytes
    than the bf16-free fp32 path by the formula's 5 (a - 1) C a token, a = 4."""
    cfg = TINY if arch == "gpt2" else ModelConfig.for_arch("modern", n_layer=3, n_head=2, n_embd=64, block_size=32,
                                                           vocab_size=101)
    x, y = batch(cfg)
    tokens, blocks = x.numel(), cfg.n_layer - 1
    measured = {}
    for fp8 in ("off", "mlp"):
        for policy in RECOMPUTE_POLICIES:
            torch.manual_seed(0)
            model = GPT(cfg, KernelsConfig(fp8=fp8), RecomputeConfig(policy=policy))
            measured[fp8, policy] = interior_block_bytes(measure_saved_bytes(model, x, y), cfg)
            weights = 8 * cfg.n_embd ** 2 * blocks if fp8 == "mlp" and policy == "none" else 0
            predicted = blocks * tokens * activation_bytes_per_token(cfg, policy, 4, False, fp8) + weights
            assert abs(measured[fp8, policy] - predicted) <= 0.10 * predicted, (fp8, policy, measured, predicted)
    saved = blocks * (tokens * 15 * cfg.n_embd - 8 * cfg.n_embd ** 2)
    assert abs(measured["off", "none"] - measured["mlp", "none"] - saved) <= 0.10 * saved
    assert measured["off", "selective"] == measured["mlp", "selective"]


def test_fp8_weight_copies_and_fused_head_chunks_are_counted():
    """The planner's FP8 parts for GPT-2 small at micro-batch 8: the MLP and head weights' e4m3
    copies (2 B a weight kept with fused_grad_accum, else the 1 B transpose saved), no bf16 copy of
    those weights (autocast's or fused_grad_accum's), and the fused FP8 head's per-chunk FP8
    operands and fp32 product."""
    base = load_config(REPO / "configs" / "small_4070.toml")
    m = base.model
    fp8_params = 8 * m.n_embd ** 2 * m.n_layer + m.padded_vocab_size * m.n_embd

    def parts(**kernels):
        cfg = dataclasses.replace(base, kernels=dataclasses.replace(base.kernels, **kernels))
        return predict_peak(cfg, 8, "none").parts

    off, fp8 = parts(cross_entropy=True), parts(cross_entropy=True, fp8="head+mlp")
    kept = parts(cross_entropy=True, fp8="head+mlp", fused_grad_accum=True)
    assert fp8["fp8 weight copies"] == fp8_params and kept["fp8 weight copies"] == 2 * fp8_params
    assert off["bf16 weight copies"] - fp8["bf16 weight copies"] == 2 * fp8_params
    assert kept["bf16 weight copies"] == fp8["bf16 weight copies"]
    assert fp8["activations"] < off["activations"]
    rows = KernelsConfig().loss_chunk_mib * 2**20 // (m.vocab_size * 2)
    assert fp8["loss"] - off["loss"] == 2 * rows * (m.n_embd + m.padded_vocab_size) + 4 * m.padded_vocab_size * m.n_embd


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_unfused_loss_peak_matches_the_prediction(arch, autocast):
    """The PyTorch loss path's peak (logits over the whole padded vocabulary, the log-softmax and
    its backward; with the modern soft cap, its tanh too), measured over a training step of a model
    so narrow that the loss is nearly all of it, within 10% of the planner's "loss" term."""
    cfg = ModelConfig.for_arch(arch, n_layer=1, n_head=1, n_embd=16, block_size=64)
    torch.manual_seed(0)
    model = GPT(cfg)
    x, y = batch(cfg)  # (2, 64) each

    def step():
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = model(x, y)
        loss.backward()

    params = list(model.parameters())
    measured = measure_peak_bytes(step, params + [x, y])
    # the rest of the step: every parameter's fp32 gradient, and under autocast the bf16 copy of
    # the head's (V_pad, C) weight its matmul reads
    rest = 4 * sum(p.numel() for p in params) + (2 * model.lm_head.weight.numel() if autocast else 0)
    predicted = predict_peak(Config(model=cfg), x.size(0), "none", act_bytes=2 if autocast else 4).parts["loss"]
    assert abs(measured - rest - predicted) <= 0.10 * predicted, (measured - rest, predicted)


@pytest.mark.parametrize("policy, every", [("selective", 1), ("full", 1), ("full", 2), ("selective", 3)])
def test_gradients_identical_across_policies(policy, every):
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=57, dropout=0.1)
    x, y = batch(cfg, seed=1)
    grads = []
    for ckpt in (RecomputeConfig(), RecomputeConfig(policy=policy, every=every)):
        torch.manual_seed(2)
        model = GPT(cfg, recompute_cfg=ckpt)
        torch.manual_seed(3)  # the same dropout masks; torch's checkpoint replays them in recomputation
        loss = model(x, y)
        grads.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    assert torch.equal(grads[0][0], grads[1][0])
    for a, b in zip(grads[0][1], grads[1][1], strict=True):
        assert torch.equal(a, b)


def test_every_kth_block_is_checkpointed():
    x, y = batch()
    torch.manual_seed(0)
    measured = measure_saved_bytes(GPT(TINY, recompute_cfg=RecomputeConfig(policy="full", every=2)), x, y)
    full = activation_bytes_per_token(TINY, "full", 4, False) * x.numel()
    # block 0 (checkpointed) holds its input, plus block 1's input, made at its end
    assert measured["block 0"] < 3 * full and measured["block 1"] > 10 * full and measured["block 2"] < 3 * full


def test_medium_plans_into_12_gib_at_micro_batch_8_with_kernels():
    cfg = load_config(REPO / "configs" / "medium_4070.toml",
                      ["--kernels.layernorm=true", "--kernels.cross_entropy=true", "--kernels.adamw=true"])
    chosen = plan(cfg, budget_bytes("12GiB")).choice
    assert chosen.micro_batch_size >= 8 and chosen.policy == "selective"
    assert chosen.micro_batch_size * chosen.grad_accum_steps == 512  # tokens per step kept
    assert chosen.peak_bytes <= 12 * 2**30


def test_bigger_budget_never_picks_a_smaller_micro_batch():
    cfg = load_config(REPO / "configs" / "small_4070.toml", ["--kernels.cross_entropy=true"])
    picks = [plan(cfg, int(gib * 2**30)).choice.micro_batch_size for gib in (4, 5, 6, 8, 10, 12, 16, 24, 48, 80)]
    assert picks == sorted(picks), picks


@pytest.mark.parametrize("text, message", [
    ("12 GB!", "expected a size with a unit"),
    ("-3GiB", "expected a size with a unit"),
    ("0GiB", "must be positive"),
    ("twelve", "expected a size with a unit"),
])
def test_bad_budgets(text, message):
    with pytest.raises(ConfigError, match=message):
        budget_bytes(text)


def test_budget_too_small_names_the_smallest_that_works():
    cfg = load_config(REPO / "configs" / "medium_4070.toml")
    with pytest.raises(ConfigError, match=r"the smallest plan \(micro-batch 1, recompute full\) needs \d+\.\d+ GiB"):
        plan(cfg, budget_bytes("2GiB"))


def test_plan_cli(capsys):
    assert plan_main([str(REPO / "configs" / "medium_4070.toml"), "--budget", "12GiB"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for a budget of 12.00 GiB" in out and "<- chosen" in out and out.count("\n") > 10
    assert plan_main([str(REPO / "configs" / "medium_4070.toml"), "--budget", "12 GB!"]) == 2
    assert "expected a size with a unit" in capsys.readouterr().err


def test_trainer_applies_the_plan(tiny_config):
    from gptfast.trainer import Trainer

    messages = []
    trainer = Trainer(tiny_config({"train.memory_budget": '"256MiB"', "train.max_steps": 2}), log=messages.append)
    assert any(m.startswith("memory plan for a budget of") for m in messages)
    cfg = trainer.cfg
    assert cfg.train.micro_batch_size * cfg.train.grad_accum_steps == 8  # 4 x 2 as configured
    trainer.run()
    assert "[recompute]" in (trainer.run_dir.path / "config.toml").read_text()


def test_recompute_config_errors(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[recompute]\npolicy = "some"\n')
    with pytest.raises(ConfigError, match="recompute.policy: expected one of none, selective, full"):
        load_config(path)
    path.write_text('[checkpointing]\npolicy = "full"\n')  # the section's old name names the new one
    with pytest.raises(ConfigError, match=r"\[checkpointing\]: this section is now \[recompute\]"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"\[checkpointing\]: this section is now \[recompute\]"):
        load_config(None, ["--checkpointing.policy=full"])
    path.write_text("[train]\nmemory_budget = \"12 GB!\"\n")
    with pytest.raises(ConfigError, match="train.memory_budget"):
        load_config(path)


@pytest.mark.parametrize("policy", ["selective", "full"])
def test_recompute_under_torch_compile(policy):
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=57)
    x, y = batch(cfg, seed=4)
    torch.manual_seed(5)
    eager = GPT(cfg, recompute_cfg=RecomputeConfig(policy=policy))
    compiled = torch.compile(eager, backend="aot_eager")
    want = eager(x, y)
    got = compiled(x, y)
    torch.testing.assert_close(got, want)
    for a, b in zip(torch.autograd.grad(got, list(eager.parameters())),
                    torch.autograd.grad(want, list(eager.parameters())), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch, switches", [("gpt2", {}), ("modern", {}), ("modern", {"tie_embeddings": True}),
                                             ("modern", {"rotary": False, "norm": "layernorm", "bias": True})])
@pytest.mark.parametrize("n_layer, n_head, n_embd, block_size, bias", [
    (12, 12, 768, 1024, True), (24, 16, 1024, 1024, True), (3, 3, 96, 77, False), (1, 1, 8, 5, True)])
def test_padded_param_count_formula_matches_the_model(n_layer, n_head, n_embd, block_size, bias, arch, switches):
    from gptfast.memory import padded_param_count

    cfg = ModelConfig.for_arch(arch, **dict(dict(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size,
                                                 bias=bias), **switches))
    with torch.device("meta"):
        built = sum(p.numel() for p in GPT(cfg).parameters())
    assert padded_param_count(cfg) == built


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_muon_state_and_step_match_the_prediction(arch):
    """Muon's momentum (4 B per matrix parameter) and AdamW's moments for the rest, counted from the
    optimizer's own state after a step; and the peak its step adds, measured, within 15% of the
    planner's "optimizer transient"."""
    from gptfast.config import OptimConfig
    from gptfast.memory import optimizer_state_bytes
    from gptfast.optim import build_optimizer

    cfg = Config(model=ModelConfig.for_arch(arch, n_layer=3, n_head=2, n_embd=64, block_size=16, vocab_size=101),
                 optim=OptimConfig(name="muon"))
    torch.manual_seed(0)
    model = GPT(cfg.model)
    opt = build_optimizer(model, cfg.optim, torch.device("cpu"))
    x, y = batch(cfg.model)
    model(x, y).backward()
    opt.step()
    state = {"muon momentum": sum(t.nbytes for s in opt.muon.state.values() for t in s.values() if torch.is_tensor(t)),
             "adamw moments": sum(t.nbytes for s in opt.adamw.state.values() for t in s.values()
                                  if torch.is_tensor(t) and t.dim() > 0)}
    n_params = sum(p.numel() for p in model.parameters())
    assert state == optimizer_state_bytes(cfg, n_params)
    params = list(model.parameters())
    existing = params + [p.grad for p in params] + [t for o in (opt.muon, opt.adamw) for s in o.state.values()
                                                    for t in s.values() if torch.is_tensor(t)]
    measured = measure_peak_bytes(opt.muon.step, existing)
    predicted = predict_peak(cfg, 2, "none", act_bytes=4).parts["optimizer transient"]
    assert abs(measured - predicted) <= 0.15 * predicted, (measured, predicted)


def test_the_planner_plans_the_model_init_from_names(tmp_path, capsys, monkeypatch):
    """finetune_medium_4070.toml's architecture is init_from's: its config.json when it is here,
    OpenAI's published size for a hub name, else one line saying so (exit 2)."""
    import json

    from gptfast import hf

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    config = str(REPO / "configs" / "finetune_medium_4070.toml")
    folder = tmp_path / "local"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf.hf_config_of(ModelConfig(n_layer=20, n_head=16, n_embd=1024))))
    assert plan_main([config, "--budget", "12GiB", f'--train.init_from="{folder}"']) == 0
    out = capsys.readouterr().out
    assert "20 layers, 16 heads, 1024 wide" in out
    medium = predict_peak(load_config(config, ['--train.init_from=""', "--model.n_layer=24", "--model.n_head=16",
                                               "--model.n_embd=1024", "--model.bias=true"]), 4, "selective")
    assert plan_main([config, "--budget", "12GiB", '--train.init_from="gpt2-medium"']) == 0
    out = capsys.readouterr().out
    assert "24 layers, 16 heads, 1024 wide" in out and f"{medium.peak_bytes / 2**30:.2f} GiB" in out
    assert plan_main([config, "--budget", "12GiB"]) == 2  # checkpoints/gpt2-medium is not here
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its architecture is not on this machine" in err[0]
