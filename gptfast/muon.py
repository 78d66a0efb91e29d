"""Muon for the hidden matrices, AdamW for everything else: `[optim] name = "muon"`.

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers in neural networks",
kellerjordan.github.io/posts/muon; the optimizer of modded-nanogpt's speedrun records) keeps a
momentum buffer per 2-D weight and replaces each update by the nearest semi-orthogonal matrix:
    buf = momentum * buf + g                         (heavy ball)
    u   = g + momentum * buf                          (Nesterov; plain: u = buf)
    O   = NewtonSchulz5(u) ~ U V^T  for u = U S V^T  (the singular values pushed to ~1)
    W  -= lr * sqrt(max(1, rows / cols)) * O          (+ decoupled weight decay lr * wd * W)
NewtonSchulz5 is the quintic iteration X <- a X + (b A + c A^2) X, A = X X^T, with
(a, b, c) = (3.4445, -4.7750, 2.0315), five steps in bf16 from X = u / ||u||_F: it does not
converge to exactly one but to singular values in about [0.7, 1.2], which trains as well and in
few steps. The sqrt(max(1, rows/cols)) scale (modded-nanogpt) keeps the update's RMS per element
comparable across the shapes of the model (a tall matrix's orthogonal columns are spread over
more rows).

Which parameters: every 2-D weight of the transformer blocks (attention q, k and v each as their
own C x C matrix, though stored together in c_attn; the attention and MLP output projections;
the MLP's c_fc). The embeddings (token, position), the head (tied or not), norm gains and biases take
AdamW at `optim.lr`, as in the records: Muon is for hidden layers. Matrices of one shape are
orthogonalised together, one batched Newton-Schulz per shape.
"""

from __future__ import annotations

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """The approximate orthogonalisation of a batch of matrices (..., rows, cols), in bf16 (fp32
    where bf16 matmuls are not worth it, on the CPU, to keep tests exact enough)."""
    a, b, c = NS_COEFFICIENTS
    dtype = torch.bfloat16 if g.is_cuda else torch.float32
    x = g.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide side: A = X X^T is the smaller square
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)
    for _ in range(steps):
        gram = x @ x.mT  # (..., r, r)
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(g.dtype)


def split_qkv(weight: torch.Tensor) -> list[torch.Tensor]:
    """c_attn's (3C, C) weight as its q, k and v matrices (views)."""
    return list(weight.chunk(3, dim=0))


class Muon(torch.optim.Optimizer):
    """Muon over 2-D parameters. A parameter whose group says `split = 3` (c_attn) is updated as
    three separate square matrices. Parameters and state are fp32; state per parameter:
    `momentum_buffer`."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0):
        if lr <= 0 or not 0 <= momentum < 1 or ns_steps < 1 or weight_decay < 0:
            raise ValueError(f"Muon: invalid lr={lr}, momentum={momentum}, ns_steps={ns_steps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay, split=1))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon: parameters must be 2-D matrices, got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        # (momentum-corrected update, destination view, lr scale) for every matrix, grouped by shape
        by_shape: dict[tuple, list] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(p.grad)
                update = p.grad.add(buf, alpha=group["momentum"]) if group["nesterov"] else buf.clone()
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                parts = update.chunk(group["split"], dim=0)
                targets = p.chunk(group["split"], dim=0)
                for u, target in zip(parts, targets, strict=True):
                    by_shape.setdefault((tuple(u.shape), group["ns_steps"]), []).append((u, target, group["lr"]))
        for (shape, steps), items in by_shape.items():
            orthogonal = newton_schulz(torch.stack([u for u, _, _ in items]), steps)  # (n, rows, cols)
            scale = max(1.0, shape[0] / shape[1]) ** 0.5
            for (_, target, lr), o in zip(items, orthogonal, strict=True):
                target.add_(o, alpha=-lr * scale)
        return loss


def muon_param_groups(model: torch.nn.Module) -> tuple[list[dict], list[torch.nn.Parameter]]:
    """(Muon groups, the other parameters): the blocks' 2-D weights go to Muon (c_attn split into
    q, k, v), everything else (embeddings, the head, norm gains, biases) to AdamW."""
    split, whole, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() == 2 and ".h." in f".{name}":
            (split if name.endswith("attn.c_attn.weight") else whole).append(p)
    muon_ids = {id(p) for p in split + whole}
    others = [p for p in dict.fromkeys(model.parameters()) if p.requires_grad and id(p) not in muon_ids]
    groups = [g for g in ({"params": split, "split": 3}, {"params": whole, "split": 1}) if g["params"]]
    return groups, others


class MuonAdamW:
    """The two optimizers of a Muon run behind one optimizer's interface (param_groups, step,
    zero_grad, state_dict, load_state_dict), so the trainer, its schedule and its checkpoints
    treat them as one. Every group carries `peak_lr`: the schedule scales each group's own peak."""

    def __init__(self, muon: Muon, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"muon", "adamw"}:
            raise ValueError("not a Muon + AdamW optimizer state (a checkpoint of an AdamW run?); the optimizer "
                             "is part of the trajectory: resume with the same [optim] name")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
