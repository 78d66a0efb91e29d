"""PyTorch references and the comparison rule shared by the kernel tests and benchmarks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Tolerance per dtype for the flash-attention rule below, relative to the reference's scale:
# fp32 is held tight; bf16 / fp16 get about a quarter of an ulp at 1.0 on top of 2x torch's error.
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 2e-4}


def assert_close_by_rule(ours: torch.Tensor, torch_same_dtype: torch.Tensor, reference: torch.Tensor,
                         atol: float, name: str) -> None:
    """err(ours, ref) <= 2 * err(torch in the same dtype, ref) + atol * scale, errors as max |diff|
    against a float64 reference; and on norm-relative errors (‖ours - ref‖ / ‖ref‖), no worse than
    torch's own plus `atol`. NaN or an unwritten (poisoned) element always fails.

    The max rule alone let a 1% error in a gradient through in bf16: torch's own bf16 dweight is
    off by ~0.5% (norm-relative), so twice that plus rounding admitted 1%. The norm rule bounds a
    systematic error by torch's error + 0.2% in bf16 (mutant: dweight * 1.01 in the LayerNorm
    backward, caught in every bf16 and fp32 case)."""
    assert ours.shape == reference.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(reference.shape)}"
    if reference.numel() == 0:
        return
    ref = reference.double()
    assert torch.isfinite(ours).all(), f"{name}: non-finite values (an unwritten element?)"
    scale = max(1.0, ref.abs().max().item())
    err_ours = (ours.double() - ref).abs().max().item()
    err_torch = (torch_same_dtype.double() - ref).abs().max().item()
    bound = 2 * err_torch + atol * scale
    assert err_ours <= bound, f"{name}: error {err_ours:.3e} > bound {bound:.3e} (torch's own error {err_torch:.3e})"
    # Relative to the reference's norm, floored at an RMS of 1 (as the max rule's scale is floored
    # at 1): a tensor of tiny values, such as a confident row's loss of 0.004, is judged on absolute
    # error, where fp32's rounding of its ~5.0 log-sum-exp alone is a 2e-5 relative error.
    ref_norm = max(ref.norm().item(), ref.numel() ** 0.5)
    if ref_norm > 0:
        rel_ours = (ours.double() - ref).norm().item() / ref_norm
        rel_torch = (torch_same_dtype.double() - ref).norm().item() / ref_norm
        rel_bound = rel_torch + atol
        assert rel_ours <= rel_bound, (f"{name}: norm-relative error {rel_ours:.3e} > bound {rel_bound:.3e} "
                                       f"(torch's own {rel_torch:.3e})")


def layer_norm_ref(x, weight, bias, eps=1e-5, residual=None):
    """(y, s): s = x + residual (when given, rounded to x's dtype as an unfused add is), y = LN(s)."""
    s = x + residual if residual is not None else x
    return F.layer_norm(s, (x.shape[-1],), weight, bias, eps), s


def rms_norm_ref(x, weight, eps=1e-6, residual=None):
    """(y, s): s = x + residual (when given), y = RMSNorm(s) with a gain, no bias."""
    s = x + residual if residual is not None else x
    return F.rms_norm(s, (x.shape[-1],), weight, eps), s


def soft_cap_ref(logits, cap):
    """cap * tanh(logits / cap) in fp32 (or fp64), as the model's PyTorch path computes it; 0: off."""
    if not cap:
        return logits
    return cap * torch.tanh((logits.float() if logits.dtype != torch.float64 else logits) / cap)


def cross_entropy_ref(logits, targets, ignore_index=-100, reduction="mean"):
    """F.cross_entropy with the math in fp32 (or fp64 for an fp64 input), as the kernels do."""
    return F.cross_entropy(logits.float() if logits.dtype != torch.float64 else logits, targets,
                           ignore_index=ignore_index, reduction=reduction)


def linear_cross_entropy_ref(hidden, weight, targets, ignore_index=-100, reduction="mean", softcap=0.0):
    """The unfused linear + cross-entropy: the whole (N, V) logits (soft-capped when asked), then
    cross_entropy_ref."""
    return cross_entropy_ref(soft_cap_ref(F.linear(hidden, weight), softcap), targets, ignore_index, reduction)
