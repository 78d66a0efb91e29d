"""The training paths as they run on a GPU (bf16 autocast, torch.compile, every kernel), kernels on
against off: llm.c's golden-trajectory check, where it matters. Needs a CUDA device; on a machine
without one these tests are skipped, saying so (the kernels' own tests run there through the
interpreter). `bench/gpu_check.sh` runs them with the rest of the suite on a GPU."""

import json

import pytest
import torch

from conftest import tiny_overrides
from gptfast.configfile import load_config
from gptfast.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs a CUDA device (bench/gpu_check.sh runs these on one)")

KERNELS = {"kernels.layernorm": True, "kernels.cross_entropy": True, "kernels.adamw": True,
           "kernels.fused_grad_accum": True}
STEPS = 20


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("arch, optimizer, fp8", [("gpt2", "adamw", "off"), ("modern", "muon", "off"),
                                                  ("modern2", "muon", "off"), ("gpt2", "adamw", "head+mlp"),
                                                  ("modern", "muon", "head+mlp")])
def test_golden_trajectory_bf16_compiled(data_dir, tmp_path, arch, optimizer, fp8):
    """20 optimizer steps of a 6-layer model in bf16 under torch.compile: with every kernel on, each
    step's loss within 2% of the PyTorch path's (bf16 rounding differs between the paths, so the
    trajectories drift apart slowly; a wrong gradient separates them within a few steps). With FP8
    matmuls for the MLP and the head too, within 3% (e4m3's rounding is 8 times bf16's)."""
    extra = {"model.arch": f'"{arch}"', "optim.name": f'"{optimizer}"', "model.n_layer": 6, "model.n_head": 6,
             "model.n_embd": 384, "model.block_size": 256, "train.micro_batch_size": 8, "train.grad_accum_steps": 2,
             "train.max_steps": STEPS, "train.eval_interval": STEPS, "train.checkpoint_interval": STEPS,
             "train.device": '"cuda"', "train.dtype": '"bfloat16"', "train.compile": True,
             "optim.lr_decay_steps": 0, "optim.warmup_steps": 5}
    if arch == "modern2":  # FlexAttention with the document mask and a window growing 64 -> 128 in the context of 256
        extra.update({"model.attn_window": 128, "train.window_start": 64})
    runs = {}
    on = dict(KERNELS, **({"kernels.fp8": f'"{fp8}"'} if fp8 != "off" else {}))
    for name, kernels in (("off", {}), ("on", on)):
        cfg = load_config(None, tiny_overrides(data_dir, tmp_path / name, dict(extra, **kernels)))
        Trainer(cfg, log=lambda _: None).run()
        runs[name] = losses(tmp_path / name)
    assert [s for s, _ in runs["on"]] == list(range(1, STEPS + 1))
    for (step, want), (_, got) in zip(runs["off"], runs["on"], strict=True):
        assert got == pytest.approx(want, rel=2e-2 if fp8 == "off" else 3e-2), (step, runs)
    assert runs["on"][-1][1] < runs["on"][0][1] - 1.0  # and it learns


@pytest.mark.parametrize("config", ["small_4070", "mid_4070", "medium_4070"])
def test_trains_under_a_12_gib_cap_at_the_planners_choice(data_dir, tmp_path, config):
    """A 12 GB card, emulated: the process capped to 12 GiB, every kernel on, the micro-batch and
    recomputation planned into 11 GiB (the README's advice for a 12 GB card), 50 optimizer steps
    with no out-of-memory error, and the planner's predicted peak within 10% of the measured one
    (a cap of the measured size alone could not fail: the allocator raises before it is passed). The
    accumulation is cut to 16 sequences a step (the peak does not depend on it beyond two
    micro-batches), so the test takes a minute, not hours."""
    from conftest import REPO
    from gptfast.memory import predict_peak

    device = torch.device("cuda")
    total = torch.cuda.get_device_properties(device).total_memory
    cap = 12 * 2**30
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        overrides = [f"--{k}={v}" for k, v in {
            **{k: "true" for k in KERNELS}, "train.memory_budget": '"11GiB"', "train.micro_batch_size": 16,
            "train.grad_accum_steps": 1, "train.max_steps": 50, "train.eval_interval": 50, "train.eval_steps": 2,
            "train.checkpoint_interval": 50, "train.log_interval": 10, "train.sample_tokens": 0,
            "train.out_dir": f'"{tmp_path / "run"}"', "train.resume": "false", "data.dataset": '"small"',
            "data.data_dir": f'"{data_dir}"', "train.device": '"cuda"'}.items()]
        trainer = Trainer(load_config(REPO / "configs" / f"{config}.toml", overrides), log=print)
        cfg = trainer.cfg
        result = trainer.run()
        measured = torch.cuda.max_memory_allocated(device)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    predicted = predict_peak(cfg, cfg.train.micro_batch_size, cfg.recompute.policy, cfg.recompute.every).peak_bytes
    print(f"{config}: micro-batch {cfg.train.micro_batch_size} x {cfg.train.grad_accum_steps}, recompute "
          f"{cfg.recompute.policy}: predicted {predicted / 2**30:.2f} GiB, allocated {measured / 2**30:.2f} GiB, "
          f"reserved {torch.cuda.max_memory_reserved(device) / 2**30:.2f} GiB")
    assert result.step == 50
    assert abs(predicted - measured) <= 0.10 * measured, (predicted, measured)


def test_flex_attention_path_matches_the_dense_mask_path():
    """The modern2 model through compiled FlexAttention (the CUDA path) against SDPA with the same
    dense mask: loss and every gradient, with EOTs in the tokens and a window shorter than the context."""
    from gptfast.config import KernelsConfig, ModelConfig
    from gptfast.model import GPT

    torch.manual_seed(0)
    cfg = ModelConfig.for_arch("modern2", n_layer=6, n_head=4, n_embd=128, block_size=512, vocab_size=1000,
                               eot_token=7, attn_window=128)
    dense = GPT(cfg, KernelsConfig(flex_attention=False)).cuda()
    with torch.no_grad():
        for p in dense.parameters():
            p.add_(0.05 * torch.randn_like(p))
    flex = GPT(cfg, KernelsConfig(flex_attention=True)).cuda()
    flex.load_state_dict(dense.state_dict())
    x = torch.randint(8, 1000, (2, 512), device="cuda")
    x[torch.rand(x.shape, device="cuda") < 0.01] = 7
    y = x.roll(-1, 1)
    results = []
    for model in (dense, flex):
        loss = model(x, y)  # fp32: the two paths differ only in summation order
        results.append((loss, torch.autograd.grad(loss, list(model.parameters()))))
    tol = dict(atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(results[1][0], results[0][0], **tol)
    for (name, _), got, want in zip(dense.named_parameters(), results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(got, want, **tol, msg=name)


@pytest.mark.parametrize("fused_loss", [False, True])
def test_fused_grad_accum_is_at_least_as_precise_as_pytorch_path(fused_loss):
    """On CUDA the fused weight gradients come from fp32-output matmuls accumulating in place:
    against an fp32 reference of the same 4 micro-batches, each gradient's error is within the
    bf16 rule (2 x the PyTorch bf16 path's error + atol), and the fp32-output overload is used."""
    from gptfast.config import KernelsConfig, ModelConfig
    from gptfast.gradaccum import GradAccumulation, fp32_output_matmul
    from gptfast.model import GPT

    device = torch.device("cuda")
    assert fp32_output_matmul(device), "this torch has no fp32-output matmul: the fused path falls back"
    cfg = ModelConfig(n_layer=2, n_head=4, n_embd=256, block_size=128, vocab_size=1000, arch="modern")

    def grads(dtype, fused):
        torch.manual_seed(0)
        model = GPT(cfg, KernelsConfig(cross_entropy=fused_loss)).to(device)
        model.loss_grad_scale = 0.25
        accumulation = GradAccumulation(model, dtype) if fused else None
        if accumulation:
            accumulation.begin_step()
        generator = torch.Generator(device="cpu").manual_seed(1)
        for _ in range(4):
            x = torch.randint(0, 1000, (4, 128), generator=generator).to(device)
            with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
                (model(x, x.roll(-1, 1)) / 4).backward()
        return {n: p.grad.float() for n, p in model.named_parameters()}

    reference, pytorch, fused = grads(None, False), grads(torch.bfloat16, False), grads(torch.bfloat16, True)
    for name, want in reference.items():
        ours, theirs = (fused[name] - want).abs().max().item(), (pytorch[name] - want).abs().max().item()
        assert ours <= 2 * theirs + 1e-5, (name, ours, theirs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fp8_casts_on_cuda_equal_the_reference_bitwise(dtype):
    """The Triton casts compiled for this GPU (the hardware's e4m3/e5m2 conversion, not the
    interpreter's) against PyTorch's reference: the same bytes, the transpose too, the inverse
    scale equal; odd sizes and a strided input."""
    from gptfast.fp8 import E4M3, E5M2, reference_to_fp8
    from kernels.fp8 import to_fp8

    generator = torch.Generator(device="cuda").manual_seed(7)
    for shape in ((1000, 776), (4097, 3), (3, 5000)):
        base = torch.randn(shape[0], 2 * shape[1], device="cuda", generator=generator) * 3
        for x in (base[:, : shape[1]].contiguous().to(dtype), base[:, ::2].to(dtype)):
            for fmt in (E4M3, E5M2):
                want, want_inverse = reference_to_fp8(x, fmt)
                got, got_t, inverse = to_fp8(x, fmt, transpose=True)
                assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), (shape, fmt)
                assert torch.equal(got_t.view(torch.uint8), want.t().contiguous().view(torch.uint8)), (shape, fmt)
                assert torch.equal(inverse, want_inverse), (shape, fmt)


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_on_cuda_equals_its_dequantised_reference(bias):
    """fp8_linear through cuBLAS's FP8 GEMMs against the same products in fp32 of the reference
    casts' dequantised operands (x and w in e4m3, the output gradient in e5m2): the casts are
    bitwise the reference's, so what is left is the GEMMs' accumulation order and the bf16 rounding
    of y and grad_x (grad_w comes out in fp32)."""
    from gptfast.fp8 import E4M3, E5M2, fp8_linear, reference_to_fp8

    def dequantised(t, fmt):
        t8, inverse = reference_to_fp8(t, fmt)
        return t8.float() * inverse

    torch.manual_seed(3)
    x = torch.randn(512, 768, device="cuda").to(torch.bfloat16).requires_grad_()
    w = (torch.randn(3072, 768, device="cuda") * 0.02).requires_grad_()
    b = (torch.randn(3072, device="cuda") * 0.1).requires_grad_() if bias else None
    g = torch.randn(512, 3072, device="cuda").to(torch.bfloat16)
    y = fp8_linear(x, w, b)
    y.backward(g)
    xq, wq, gq = dequantised(x.detach(), E4M3), dequantised(w.detach(), E4M3), dequantised(g, E5M2)
    want = {"y": xq @ wq.T + (b.detach() if bias else 0), "grad x": gq @ wq, "grad w": gq.T @ xq}
    got = {"y": y.float(), "grad x": x.grad.float(), "grad w": w.grad}
    for name in want:
        # bf16 keeps 8 significant bits: a rounding is within 2^-8 of the value; y with a bias is rounded twice
        rtol = 1e-4 if name == "grad w" else 1e-2
        torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=1e-4 * want[name].abs().max().item(),
                                   msg=name)
    if bias:
        torch.testing.assert_close(b.grad, g.float().sum(0), rtol=1e-4, atol=1e-3)
