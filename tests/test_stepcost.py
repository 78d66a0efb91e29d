"""The step-cost model (gptfast/stepcost.py): counts held out against arithmetic done by hand,
and the planner choosing by its modelled time."""

import pytest

from gptfast.configfile import load_config
from gptfast.stepcost import CATEGORIES, count_step, modelled_time

B, T, L, H, C, V = 3, 48, 2, 4, 64, 512


def config(extra=()):
    return load_config(None, [f"--model.n_layer={L}", f"--model.n_head={H}", f"--model.n_embd={C}",
                              f"--model.block_size={T}", f"--model.vocab_size={V}", "--model.dropout=0.0",
                              "--train.micro_batch_size=3", "--train.grad_accum_steps=4", "--kernels.layernorm=false",
                              "--kernels.cross_entropy=false", *extra])


def test_a_micro_step_counts_what_the_arithmetic_says():
    cost = count_step(config(), policy="none")
    m = cost.micro
    tokens = B * T
    # every 2-D weight but the position table is a matmul operand (the head is the token table):
    # 2 FLOPs a multiply-add, forward once and backward twice
    matmul_weights = L * 12 * C * C + V * C
    assert m.flops["matmuls"] == 6 * tokens * matmul_weights
    # causal attention: QK^T and PV (4 B H T^2 D / 2) forward, 2.5 times that backward
    assert m.flops["attention"] == L * 3.5 * 4 * B * H * T * T * (C // H) / 2
    # bf16 autocast: each matmul weight and bias cast to bf16 (read 4 B, write 2) and its gradient
    # cast back (read 2, write 4); every parameter's gradient accumulated in fp32 (read 4 + 4, write 4)
    matmul_biases = L * (3 * C + C + 4 * C + C)
    assert m.bytes["weight casts"] == 12 * (matmul_weights + matmul_biases)
    n_params = L * (12 * C * C + 13 * C) + V * C + T * C + 2 * C  # GPT-2 with biases and LayerNorms
    assert m.bytes["gradient accumulation"] == 12 * n_params
    assert cost.grad_accum_steps == 4 and cost.tokens_per_step == 4 * tokens
    assert set(m.flops) == set(CATEGORIES) and m.bytes["optimizer"] == 0 and cost.optimizer.bytes["optimizer"] > 0


def test_recomputing_the_blocks_costs_their_forward_matmuls_again():
    """Each block's forward again, up to its last matmul: the MLP's output projection is not
    replayed (its backward needs its input, not its output, and recomputation stops early)."""
    none, full = (count_step(config(), policy=p).micro for p in ("none", "full"))
    assert full.flops["matmuls"] - none.flops["matmuls"] == 2 * B * T * L * (12 - 4) * C * C
    assert full.flops["attention"] - none.flops["attention"] == L * 4 * B * H * T * T * (C // H) / 2


def test_the_modelled_time_is_the_counts_over_the_cards_rates():
    from gptfast import hardware

    cost = count_step(config())
    seconds = modelled_time(cost, "RTX 4070")
    card = hardware.card_of("NVIDIA GeForce RTX 4070")
    step = cost.step
    memory = step.bytes["gradient accumulation"] / (card.bandwidth * hardware.MEMORY_EFFICIENCY)
    assert seconds["gradient accumulation"] == pytest.approx(
        memory + step.kernels["gradient accumulation"] * hardware.KERNEL_OVERHEAD_S)
    assert seconds["matmuls"] == pytest.approx(step.work["matmuls"] / (card.peak_flops * hardware.MATMUL_EFFICIENCY)
                                               + step.kernels["matmuls"] * hardware.KERNEL_OVERHEAD_S)
    assert step.work["matmuls"] > step.flops["matmuls"]  # thin GEMMs count for more than their FLOPs
    # a card with twice the bandwidth halves the memory-bound part
    assert modelled_time(cost, "RTX 4090")["norms"] < seconds["norms"]


def test_plan_with_a_device_chooses_the_fastest_modelled_plan_that_fits(capsys):
    from gptfast.plan import main as plan_main

    assert plan_main(["configs/cpu_smoke.toml", "--budget", "12GiB", "--device", "RTX 4070"]) == 0
    out = capsys.readouterr().out
    assert "ESTIMATES of the step-cost model" in out and "tokens/s (est.)" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    fitting = [r for r in rows if r[7] == "yes"]  # micro-batch accum policy peak GiB seconds tokens/s fits
    chosen = [r for r in rows if r[-1] == "chosen"]
    assert len(chosen) == 1 and float(chosen[0][5]) == min(float(r[5]) for r in fitting)
    assert plan_main(["configs/cpu_smoke.toml", "--budget", "12GiB", "--device", "Voodoo 5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the step-cost model knows RTX 4070" in err


def test_counting_needs_no_memory_at_real_shapes():
    """GPT-2 medium at micro-batch 2 x 1024 tokens, counted on fake tensors: nothing allocated (in
    a fresh process, so the resident high-water mark is this count's alone; real weights alone
    would be 1.4 GB)."""
    import subprocess
    import sys

    from conftest import REPO

    script = ("import resource; from gptfast.configfile import load_config; from gptfast.stepcost import count_step; "
              "cfg = load_config('configs/medium_4070.toml'); before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; "
              "cost = count_step(cfg, 2, 'none'); "
              "print(cost.micro.flops['matmuls'], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=300).stdout.split()
    flops, grown_kib = float(out[0]), int(out[1])
    assert flops > 4e12  # 6 x 355M x 2048 tokens
    assert grown_kib < 512 * 1024  # under 0.5 GiB more


def test_the_fused_loss_counts_its_matmuls_as_the_pytorch_path_does():
    """gptfast's linear + cross-entropy runs the head's matmuls inside a custom op: counted from its
    shapes, the step's matmul FLOPs equal the PyTorch path's; its loss traffic is far less."""
    fused = count_step(config(["--kernels.cross_entropy=true"])).micro
    plain = count_step(config()).micro
    assert fused.flops["matmuls"] == plain.flops["matmuls"]
    assert fused.bytes["loss"] < plain.bytes["loss"]


def test_fused_grad_accum_moves_the_casts_and_accumulation_to_the_optimizer_step():
    """kernels.fused_grad_accum: no weight of a Linear is cast or accumulated per micro-step (its
    GEMM accumulates, counted as the matmul), only biases are cast and the tied embedding's
    gradient accumulated; the copies (6 B per weight) and the zeroing are per optimizer step."""
    plain = count_step(config(), policy="none")
    cost = count_step(config(["--kernels.fused_grad_accum=true"]), policy="none")
    m, step = cost.micro, cost.optimizer
    block_weights, head = L * 12 * C * C, V * C  # the head is the token table: its copy serves both
    matmul_biases = L * (3 * C + C + 4 * C + C)
    n_params = L * (12 * C * C + 13 * C) + V * C + T * C + 2 * C
    assert m.flops["matmuls"] == plain.micro.flops["matmuls"]
    assert m.bytes["weight casts"] == 12 * matmul_biases
    assert m.bytes["gradient accumulation"] == 12 * (n_params - block_weights)
    assert step.bytes["weight casts"] == 6 * (block_weights + head)
    assert step.bytes["gradient accumulation"] == 4 * (block_weights + head)  # zero_ writes each buffer
    assert step.bytes["optimizer"] == plain.optimizer.bytes["optimizer"]


def test_fp8_matmuls_count_apart_and_run_at_the_cards_fp8_rate():
    """fp8_linear's three GEMMs (forward, grad_x, grad_w) are FP8 matmuls, timed at the card's FP8
    peak (twice bf16's on Ada); its scaling and casts are bytes; a card without FP8 is refused."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from gptfast import hardware
    from gptfast.errors import ConfigError
    from gptfast.fp8 import fp8_linear
    from gptfast.stepcost import Counts, StepCost, _Counter

    n, k, m = 4096, 768, 3072
    with FakeTensorMode():
        x = torch.randn(n, k, dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(m, k, requires_grad=True)
        counter = _Counter(set(), {id(w)})
        with counter:
            fp8_linear(x, w).sum().backward()
    counts = counter.counts
    assert counts.flops["fp8 matmuls"] == 6 * n * k * m and counts.flops["matmuls"] == 0
    assert counts.bytes["other elementwise"] > 0  # amax, scale and cast of x, w and the gradient
    cost = StepCost(counts, Counts(), 1, n)
    card = hardware.card_of("RTX 4070")
    seconds = modelled_time(cost, "RTX 4070")["fp8 matmuls"]
    assert seconds == pytest.approx(counts.work["fp8 matmuls"] / (card.fp8_flops * hardware.MATMUL_EFFICIENCY)
                                    + counts.kernels["fp8 matmuls"] * hardware.KERNEL_OVERHEAD_S)
    assert card.fp8_flops == 2 * card.peak_flops
    with pytest.raises(ConfigError, match="no FP8 tensor cores"):
        modelled_time(cost, "RTX 3090")


@pytest.mark.parametrize("fused_loss", [False, True])
def test_kernels_fp8_moves_the_mlp_and_head_matmuls_to_the_fp8_rate_and_counts_the_casts(fused_loss):
    """kernels.fp8 = "head+mlp": the MLP's two GEMMs per block and the head's run at the FP8 rate,
    attention's projections stay bf16; each FP8 Linear casts its input (read twice: the amax
    pass, written twice: the row-major copy and its transpose, 1 B each) and its output's gradient
    the same way, by hand. The weights' casts: 1 B per element of each copy, per micro-step
    (no fused accumulation: cast at every forward)."""
    extra = ["--kernels.fp8=head+mlp", f"--kernels.cross_entropy={str(fused_loss).lower()}"]
    m = count_step(config(extra), policy="none").micro
    tokens = B * T
    assert m.flops["fp8 matmuls"] == 6 * tokens * (L * 8 * C * C + V * C)
    assert m.flops["matmuls"] == 6 * tokens * L * 4 * C * C
    # autocast: the output gradients and GELU's output are bf16; LayerNorm's outputs (c_fc's and
    # the head's inputs) are fp32 (autocast runs layer_norm in fp32), which the cast reads as they are
    bf16, fp32 = 2 * 2 + 2, 2 * 4 + 2
    mlp = L * tokens * (C * fp32 + 4 * C * bf16  # c_fc, c_proj inputs
                        + 4 * C * bf16 + C * bf16)  # their output gradients
    weights = L * 2 * 4 * C * C * (4 + 4 + 2) + V * C * (4 + 4 + 2)  # from the fp32 weights
    head = tokens * C * fp32 + tokens * V * bf16  # hidden rows, logits' gradient
    # an inverse scale written per cast: 3 per Linear; the fused loss's own (rows, gradients) are inside it
    inverse_scales = 4 * (3 * 2 * L + (1 if fused_loss else 3))
    assert m.bytes["fp8 casts"] == mlp + weights + head + inverse_scales


def test_the_fused_fp8_head_reads_its_one_byte_operands_instead_of_the_bf16_weight():
    """The fused loss in FP8: its loss bytes are the chunk logits' traffic plus the GEMMs' 1 B
    operands (rows and weight copy, each with its transpose, and the logits' gradient pair), not
    the bf16 path's hidden and fp32 weight reads."""
    import torch

    from gptfast import stepcost
    from kernels.cross_entropy import _linear_ce_fwd_op

    n, c, v = 64, 32, 128
    named = {"hidden": torch.empty(n, c, dtype=torch.bfloat16), "weight": torch.empty(v, c),
             "targets": torch.empty(n, dtype=torch.long), "ignore_index": -100, "reduction": "mean",
             "compute_dtype": torch.bfloat16, "chunk_bytes": 0, "want_grads": True, "n_classes": v, "softcap": 0.0,
             "grad_scale": 1.0}
    func = _linear_ce_fwd_op._opoverload
    args = [named[a.name] for a in func._schema.arguments if a.name in named]
    bf16 = stepcost._linear_cross_entropy(func, args, {})
    fp8 = stepcost._linear_cross_entropy(func, args, {"weight_fp8": torch.empty(v, c, dtype=torch.float8_e4m3fn)})
    logits = n * v * 2 * 5
    assert bf16[0] == "matmuls" and bf16[3] == logits + n * c * 2 + v * c * 4
    assert fp8[0] == "fp8 matmuls" and fp8[3] == logits + 2 * (n * c + v * c) + 2 * n * v
