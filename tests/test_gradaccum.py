"""Fused weight-gradient accumulation (gptfast.gradaccum) against PyTorch's path: the same
gradients over several micro-batches, in fp32 and bf16 autocast, under every recompute policy and
both compile scopes, and the weight copies kept current by the trainer."""

import pytest
import torch

from gptfast.config import KernelsConfig, ModelConfig, RecomputeConfig
from gptfast.gradaccum import GradAccumulation, Linear
from gptfast.model import GPT
from gptfast.trainer import Trainer

VOCAB, T = 101, 16


def model_config(arch: str) -> ModelConfig:
    return ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=T, vocab_size=VOCAB, arch=arch, bias=True)


def accumulated_grads(arch: str, dtype, policy: str, fused: bool, scope: str | None = None, micro_steps: int = 3,
                      seed: int = 0, fused_loss: bool = False) -> dict[str, torch.Tensor]:
    """The .grad of every parameter after `micro_steps` micro-batches of loss / micro_steps."""
    torch.manual_seed(seed)
    model = GPT(model_config(arch), KernelsConfig(cross_entropy=fused_loss), RecomputeConfig(policy=policy))
    model.loss_grad_scale = 1.0 / micro_steps  # the trainer's promise to the fused loss
    accumulation = GradAccumulation(model, dtype) if fused else None
    step = model
    if scope == "model":
        step = torch.compile(model)
    elif scope == "blocks":
        model.compile_blocks()
    if accumulation:
        accumulation.begin_step()
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(micro_steps):
        x = torch.randint(0, VOCAB, (3, T), generator=generator)
        with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = step(x, x.roll(-1, 1)) / micro_steps
        loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["gpt2", "modern"])  # gpt2: the head tied to the embedding
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy", ["none", "selective", "full"])
def test_gradients_equal_pytorch_path(arch, dtype, policy):
    """Mutants caught: the buffer overwritten instead of added to (copy_), the bias gradient
    dropped."""
    want = accumulated_grads(arch, dtype, policy, fused=False)
    got = accumulated_grads(arch, dtype, policy, fused=True)
    assert want.keys() == got.keys()
    for name in want:
        # On the CPU the fused path rounds each product as PyTorch's does (no fp32-output
        # matmul there); what differs is only where fp32 sums are taken (a few ulps).
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_head_gradient_added_by_the_fused_loss(arch, dtype):
    """With the fused loss the head reads its copy and the kernel adds its gradient into the
    buffer (a tied head: the embedding's gradient lands there too, through AccumulateGrad).
    Mutant caught: the chunk loop starting its gradient from none instead of the buffer (the head
    then holds the last micro-batch's gradient alone)."""
    want = accumulated_grads(arch, dtype, "none", fused=False, fused_loss=True)
    got = accumulated_grads(arch, dtype, "none", fused=True, fused_loss=True)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-8, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["model", "blocks"])
def test_gradients_equal_pytorch_path_compiled(scope):
    """Under torch.compile (both scopes) the accumulation into the saved buffer survives
    AOTAutograd and inductor: the compiled fused path's gradients are the eager PyTorch path's."""
    want = accumulated_grads("modern", None, "selective", fused=False)
    torch._dynamo.reset()
    got = accumulated_grads("modern", None, "selective", fused=True, scope=scope)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fused_weights_take_no_gradient_through_autograd():
    """The fused Linears' weights get their gradient from the buffer alone (their AccumulateGrad
    never runs), so the buffer is the .grad every consumer reads; a plain forward (no autocast
    where the copies are bf16) still adds into it through autograd. Mutant caught: Linear.forward
    always taking F.linear's path."""
    torch.manual_seed(0)
    model = GPT(model_config("modern"), KernelsConfig())
    accumulation = GradAccumulation(model, torch.bfloat16)
    accumulation.begin_step()
    fused = list(accumulation.modules.values())
    accumulated = []  # the fused weights AccumulateGrad ran for (a head tied to the embedding: that one's)
    hooked = [m.weight for m in fused if m.weight is not model.transformer.wte.weight]
    for weight in hooked:
        weight.register_post_accumulate_grad_hook(accumulated.append)
    x = torch.randint(0, VOCAB, (2, T))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, x).backward()
    assert accumulated == []
    assert all(m.weight.grad is m.main_grad and m.main_grad.abs().sum() > 0 for m in fused)
    after_fused = [m.main_grad.clone() for m in fused]
    model(x, x).backward()  # fp32, no autocast: F.linear's path, through AccumulateGrad
    assert len(accumulated) == len(hooked) >= 8
    assert all(m.weight.grad is m.main_grad for m in fused)
    assert all(not torch.equal(m.main_grad, before) for m, before in zip(fused, after_fused, strict=True))


def test_refresh_copies_the_updated_weights():
    torch.manual_seed(0)
    model = GPT(model_config("gpt2"), KernelsConfig())
    accumulation = GradAccumulation(model, torch.bfloat16)
    modules = [m for m in model.modules() if isinstance(m, Linear)]
    assert set(modules) == set(accumulation.modules.values()) and len(modules) == 9  # 4 per block, the head
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert not any(torch.equal(m.weight_copy, m.weight.to(torch.bfloat16)) for m in modules)
    accumulation.refresh()
    assert all(torch.equal(m.weight_copy, m.weight.to(torch.bfloat16)) for m in modules)


def test_ddp_leaves_out_every_name_of_a_fused_weight():
    torch.manual_seed(0)
    model = GPT(model_config("gpt2"), KernelsConfig())  # lm_head.weight is transformer.wte.weight
    names = GradAccumulation(model, None).ignored_names(model)
    assert {"lm_head.weight", "transformer.wte.weight", "transformer.h.0.attn.c_attn.weight",
            "transformer.h.1.mlp.c_proj.weight"} <= set(names)
    assert len(names) == 4 * 2 + 2 and not any(name.endswith("bias") for name in names)


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
def test_trainer_under_bf16_autocast_tracks_pytorch_path(tiny_config, arch):
    """Three optimizer steps under bf16 autocast on the CPU, fused against PyTorch's path: the
    same losses to bf16 noise, and every weight copy the updated weight's. Mutant caught: the
    trainer's refresh after the update left out (the second step's forward reads the first
    step's weights)."""
    def trained(fused: bool):
        extra = {"kernels.fused_grad_accum": fused, "model.arch": f'"{arch}"', "train.max_steps": 3,
                 "optim.lr": 1e-2, "train.grad_accum_steps": 3}
        trainer = Trainer(tiny_config(extra), log=lambda _: None)
        trainer.amp_dtype = torch.bfloat16  # the trainer itself trains fp32 on the CPU
        if fused:
            trainer.grad_accum = GradAccumulation(trainer.model, torch.bfloat16)
        losses = [trainer.train_step()[0].item() for _ in range(3)]
        trainer.close()
        return trainer, losses

    plain, want = trained(False)
    fused, got = trained(True)
    assert got == pytest.approx(want, rel=2e-3)
    assert want[2] < want[0] - 0.05  # the steps moved the weights, so a stale copy would show
    for m in fused.grad_accum.modules.values():
        assert torch.equal(m.weight_copy, m.weight.to(torch.bfloat16))
    for a, b in zip(plain.model.parameters(), fused.model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=2e-2, atol=2e-3)
