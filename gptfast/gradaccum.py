"""Fused weight-gradient accumulation (`kernels.fused_grad_accum`): the block Linears' weight
gradients accumulate into fp32 in place, and their matmuls read a copy of the weights made once
per optimizer step. Megatron-LM calls the first half gradient_accumulation_fusion.

PyTorch's path under bf16 autocast moves 24 bytes per block weight per micro-step outside its
matmuls:
- autocast casts the fp32 weight (read 4, write 2);
- backward writes a bf16 weight gradient, which the cast's backward widens (read 2, write 4);
- AccumulateGrad adds it into `.grad` (read 4 + 4, write 4).

With the switch on, a block Linear (`Linear`, once `GradAccumulation` attaches its buffers):
- reads `weight_copy`, the weight in the autocast dtype, refreshed after each optimizer update
  (`refresh`): 6 bytes per weight per optimizer step, not per micro-step;
- computes its weight gradient in `gptfast::accumulate_weight_grad`, an fp32-output matmul that
  adds into `main_grad` in place (`torch.addmm(..., out_dtype=float32, out=)`), so the
  accumulation is the GEMM's epilogue. That needs CUDA and a torch with the overload. Elsewhere
  (the CPU, older torch) the product is rounded to the compute dtype and then widened as it is
  added: the PyTorch path's numbers exactly, in 10 bytes per weight instead of its 18.

`main_grad` is the parameter's `.grad` from `begin_step` on, so clipping, the health check, both
optimizers and fp16's loss scaler see an ordinary gradient. Anything that reaches the weight
through autograd instead (a forward without grad mode's autocast dtype, say) adds into the same
buffer through AccumulateGrad.

Under DDP the fused weights are left out of DDP's buckets and all-reduced once, after the step's
last backward (`all_reduce`). That is one fp32 gradient per step, as DDP's, but without DDP's
overlap with that last backward.

The custom op and the autograd Function trace under torch.compile, both scopes: AOTAutograd keeps
the in-place accumulation into the saved buffer (a mutation of a forward input in the backward
graph), and inductor calls the op on the buffer itself, with no copy. Activation recomputation
reruns the forward, which has no side effects; the accumulation happens once, in backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


# Whether this torch has matmuls with an fp32 output for bf16 / fp16 inputs (as
# kernels.cross_entropy.FP32_OUTPUT_MATMUL, which gptfast cannot import where Triton is missing).
FP32_OUTPUT_OVERLOADS = "dtype" in torch.ops.aten.mm.overloads() and "dtype_out" in torch.ops.aten.addmm.overloads()


def fp32_output_matmul(device: torch.device) -> bool:
    """Whether torch can run a bf16 / fp16 matmul with an fp32 output on `device` (CUDA, recent torch)."""
    return device.type == "cuda" and FP32_OUTPUT_OVERLOADS


@torch.library.custom_op("gptfast::accumulate_weight_grad", mutates_args=("main_grad",))
def accumulate_weight_grad(main_grad: torch.Tensor, grad_out: torch.Tensor, x: torch.Tensor) -> None:
    """main_grad (out, in) fp32 += grad_out (N, out)^T @ x (N, in)."""
    if grad_out.dtype == main_grad.dtype:
        main_grad.addmm_(grad_out.t(), x)
    elif fp32_output_matmul(grad_out.device):
        torch.addmm(main_grad, grad_out.t(), x, out_dtype=main_grad.dtype, out=main_grad)
    else:  # as autograd computes linear's weight gradient ((x^T g)^T), then widened and added
        main_grad.add_((x.t() @ grad_out).t())


@accumulate_weight_grad.register_fake
def _(main_grad, grad_out, x):
    return None


class AccumulatedLinear(torch.autograd.Function):
    """y = x @ weight_copy^T + bias, whose backward adds the weight gradient into main_grad (and
    returns none for it) and returns the input's and the bias's as F.linear's backward does."""

    @staticmethod
    def forward(ctx, x, weight_copy, bias, main_grad):
        x = x.to(weight_copy.dtype)  # autocast's cast of the activation, which it would make too
        ctx.save_for_backward(x, weight_copy, main_grad)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return F.linear(x, weight_copy, None if bias is None else bias.to(weight_copy.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        x, weight_copy, main_grad = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1]).to(weight_copy.dtype)  # (N, out)
        accumulate_weight_grad(main_grad, grad_rows, x.reshape(-1, x.shape[-1]))
        grad_x = grad_out.to(weight_copy.dtype) @ weight_copy  # (..., in)
        grad_bias = None if ctx.bias_dtype is None else grad_rows.sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


class Linear(nn.Linear):
    """nn.Linear, whose weight gradient accumulates in place once GradAccumulation has attached
    its buffers (`weight_copy`, `main_grad`). Only a forward under grad mode, in the copy's dtype
    (autocast's, or fp32 without autocast), takes the fused path; any other takes F.linear's, whose
    gradient AccumulateGrad adds into the same `.grad`. With `fp8` (kernels.fp8 covers it), a
    training forward under grad mode runs in FP8 (gptfast.fp8), reading the FP8 copies
    GradAccumulation makes once per optimizer step when it is attached; evaluation stays in the
    compute dtype."""

    weight_copy: torch.Tensor | None = None
    main_grad: torch.Tensor | None = None
    fp8: bool = False
    fp8_weight: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # gptfast.fp8.cast_weight's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8 and self.training and torch.is_grad_enabled():
            from gptfast.fp8 import fp8_linear

            return fp8_linear(x, self.weight, self.bias, out_dtype=compute_dtype(x), main_grad=self.main_grad,
                              cached=self.fp8_weight)
        if self.main_grad is not None and torch.is_grad_enabled() and self.copy_in_use(x):  # not FP8's
            return AccumulatedLinear.apply(x, self.weight_copy, self.bias, self.main_grad)
        return F.linear(x, self.weight, self.bias)

    def copy_in_use(self, x: torch.Tensor) -> bool:
        """Whether a forward on `x` now computes in the copy's dtype (never without a copy: an FP8
        Linear keeps none, and its other forwards take F.linear's path)."""
        if self.weight_copy is None:
            return False
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type) == self.weight_copy.dtype
        return self.weight_copy.dtype == self.weight.dtype


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `x` computes in now: autocast's where it is on, else x's own."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


class GradAccumulation:
    """The fused Linears of `model` and their buffers: a copy of each weight in `dtype` (the
    autocast dtype; None: the weight itself, fp32 training) and an fp32 gradient buffer. The
    trainer calls begin_step before a step's first backward, all_reduce after its last under DDP,
    and refresh after every update of the weights (an optimizer step, a restored checkpoint)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype | None):
        self.modules = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
        self.copied = dtype is not None and dtype != torch.float32  # else each copy is its weight itself
        for m in self.modules.values():
            w = m.weight
            m.main_grad = torch.zeros_like(w, dtype=torch.float32)
            if m.fp8:  # kernels.fp8: the weight's FP8 copies (1 B per weight each) instead of a bf16 one
                from gptfast.fp8 import E4M3

                m.weight_copy = None
                m.fp8_weight = (torch.empty_like(w, dtype=E4M3), w.new_empty(w.shape[::-1], dtype=E4M3),
                                w.new_empty((), dtype=torch.float32))
            else:
                m.weight_copy = torch.empty_like(w, dtype=dtype) if self.copied else w.detach()
        self.refresh()

    def ignored_names(self, model: nn.Module) -> list[str]:
        """Every name the fused weights have in `model` (a tied weight has two), which DDP is told
        to leave alone."""
        fused = {id(m.weight) for m in self.modules.values()}
        return [f"{module_name}.{name}" if module_name else name for module_name, module in model.named_modules()
                for name, p in module.named_parameters(recurse=False) if id(p) in fused]

    @torch.no_grad()
    def refresh(self) -> None:
        """Every weight copy made anew from its weight (6 bytes per weight in bf16; an FP8 weight's
        copies from the fp32 weight, 4 + 4 B read and 2 B written)."""
        for m in self.modules.values():
            if self.copied and m.weight_copy is not None:
                m.weight_copy.copy_(m.weight)
            if m.fp8_weight is not None:
                from gptfast.fp8 import cast_weight

                for kept, new in zip(m.fp8_weight, cast_weight(m.weight), strict=True):
                    kept.copy_(new)

    @torch.no_grad()
    def begin_step(self) -> None:
        """Zero every buffer and make it its weight's .grad, before a step's first backward."""
        for m in self.modules.values():
            m.main_grad.zero_()
            m.weight.grad = m.main_grad

    @torch.no_grad()
    def all_reduce(self, world_size: int) -> None:
        """The mean of every fused gradient over the ranks, as DDP would make it."""
        import torch.distributed as dist

        works = [dist.all_reduce(m.main_grad, async_op=True) for m in self.modules.values()]
        for work in works:
            work.wait()
        for m in self.modules.values():
            m.main_grad.div_(world_size)

    @torch.no_grad()
    def broadcast(self) -> None:
        """Rank 0's weights on every rank (DDP's start-up broadcast skips the weights it leaves alone)."""
        import torch.distributed as dist

        for m in self.modules.values():
            dist.broadcast(m.weight, src=0)
        self.refresh()
