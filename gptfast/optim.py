"""Optimizers as the training loop drives them: AdamW with decay on 2-D weights only (or Muon +
AdamW, gptfast/muon.py), the learning-rate schedules, and `ScheduledOptimizer`, which gives every
optimizer one interface for the schedule, float16 loss scaling, clip-and-norm and a skipped step."""

from __future__ import annotations

import math

import numpy as np

import torch

from gptfast.config import OptimConfig


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: 2-D weights (matmuls, embeddings) decay; biases and norm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, device: torch.device,
                    triton_adamw: bool = False):
    """AdamW (cfg.name "adamw"): gptfast's FusedAdamW (Triton, clipping fused in) when
    `triton_adamw`, else torch's AdamW, its fused CUDA implementation on GPUs. Either way clipping
    follows cfg.grad_clip: FusedAdamW applies it inside its step, the trainer calls
    clip_grad_norm_ otherwise. "muon": Muon for the blocks' matrices and the same AdamW choice for
    the rest (gptfast/muon.py); the trainer clips. Every group carries `peak_lr`, the rate the
    schedule scales."""
    if cfg.name == "muon":
        from gptfast.muon import Muon, MuonAdamW, muon_param_groups

        groups, others = muon_param_groups(model)
        muon = Muon([dict(g, peak_lr=cfg.muon_lr) for g in groups], lr=cfg.muon_lr, momentum=cfg.muon_momentum,
                    ns_steps=cfg.muon_ns_steps, weight_decay=cfg.muon_weight_decay)
        # An untied token embedding gets its own group and rate (muon_embedding_lr): the speedruns
        # train it at ~150x the head's rate. A tied one is the head, at lr. Value embeddings are
        # token embeddings too, at the same rate (modded-nanogpt trains both at one rate).
        embeddings = [] if model.config.tie_embeddings else [model.transformer.wte.weight]
        embeddings += [table.weight for table in getattr(model, "value_embeds", [])]
        embedding_ids = {id(p) for p in embeddings}
        rest = [{"params": [p for p in others if p.dim() >= 2 and id(p) not in embedding_ids],
                 "weight_decay": cfg.weight_decay, "peak_lr": cfg.lr},
                {"params": embeddings, "weight_decay": cfg.weight_decay,
                 "peak_lr": cfg.muon_embedding_lr or cfg.lr},
                {"params": [p for p in others if p.dim() < 2], "weight_decay": 0.0, "peak_lr": cfg.lr}]
        return MuonAdamW(muon, _adamw([g for g in rest if g["params"]], cfg, device, triton_adamw, clip=False))
    groups = [dict(g, peak_lr=cfg.lr) for g in param_groups(model, cfg.weight_decay)]
    return _adamw(groups, cfg, device, triton_adamw, clip=True)


def _adamw(groups: list[dict], cfg: OptimConfig, device: torch.device, triton_adamw: bool, clip: bool):
    if triton_adamw:
        return FusedAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                          max_grad_norm=cfg.grad_clip if clip and cfg.grad_clip > 0 else None)
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=fused,
                             foreach=False if fused else None)


def lr_factor(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """The schedule at optimizer step `step` (0-based) as a fraction of the peak: linear warmup,
    then cosine decay (cfg.schedule "cosine") or constant and a linear cooldown over the last
    cfg.cooldown_fraction of the steps ("wsd", warmup-stable-decay: Hägele et al. 2024), ending at
    min_lr / lr at cfg.lr_decay_steps, or at max_steps when that is 0."""
    end = cfg.lr_decay_steps or max_steps
    floor = cfg.min_lr / cfg.lr
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if step >= end:
        return floor
    if cfg.schedule == "wsd":
        cooldown_start = max(cfg.warmup_steps, end - round(cfg.cooldown_fraction * end))
        if step < cooldown_start:
            return 1.0
        return floor + (1.0 - floor) * (end - step) / max(1, end - cooldown_start)
    progress = (step - cfg.warmup_steps) / max(1, end - cfg.warmup_steps)
    return floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - floor)


def lr_at(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """AdamW's learning rate at optimizer step `step` (0-based): the peak lr times lr_factor."""
    return cfg.lr * lr_factor(step, cfg, max_steps)


class ScheduledOptimizer:
    """An optimizer as the training loop uses it, the same for every optimizer this module builds.

    `set_lr(step)` sets each group's rate from its own `peak_lr` and the schedule; `backward(loss)`
    goes through the loss scaler under float16; `clip_and_norm()` returns the global gradient norm
    as a device tensor, clipped to optim.grad_clip (FusedAdamW clips inside its own step, reusing
    that norm; every other optimizer through clip_grad_norm_; with grad_clip 0 the norm is only
    measured); then `step()` applies the update, or, for a step found unhealthy, only
    `zero_grad()` runs, leaving parameters and state untouched. `state_dict()` holds the inner optimizer's and the scaler's state; loading it keeps
    the peaks of this run's config, never the file's."""

    def __init__(self, inner, params: list[torch.Tensor], cfg: OptimConfig, max_steps: int,
                 scaler: torch.amp.GradScaler | None = None):
        self.inner, self.params, self.cfg, self.max_steps, self.scaler = inner, params, cfg, max_steps, scaler
        self._fused_clip = isinstance(inner, FusedAdamW)  # FusedAdamW clips inside its step

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    def set_lr(self, step: int) -> None:
        factor = lr_factor(step, self.cfg, self.max_steps)
        for group in self.inner.param_groups:  # each group's own peak (AdamW's lr, Muon's muon_lr)
            group["lr"] = group["peak_lr"] * factor

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def clip_and_norm(self) -> torch.Tensor:
        if self.scaler is not None:
            self.scaler.unscale_(self.inner)
        if self._fused_clip:
            return self.inner.compute_grad_norm()
        if self.cfg.grad_clip > 0:
            return torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        return torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])

    def step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.inner)  # skipped when the fp16 gradients overflowed
            self.scaler.update()
        else:
            self.inner.step()

    def zero_grad(self) -> None:
        self.inner.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return {"optimizer": self.inner.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        peaks = [group["peak_lr"] for group in self.inner.param_groups]  # from this config, not the file
        self.inner.load_state_dict(state["optimizer"])
        for group, peak in zip(self.inner.param_groups, peaks, strict=True):
            group["peak_lr"] = peak
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


def state_shape_problem(inner, state: dict, names: dict[int, str]) -> str | None:
    """What is wrong with an optimizer state dict (torch's layout; Muon + AdamW's pair of them)
    whose tensors do not have their parameters' shapes, or None. `names`: id(parameter) -> name.
    torch's load_state_dict checks only the counts, and the first step would fail far from here."""
    pairs = [(inner.muon, state.get("muon")), (inner.adamw, state.get("adamw"))] if hasattr(inner, "muon") else \
        [(inner, state)]
    for optimizer, saved in pairs:
        if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict) and "param_groups" in saved):
            return None  # not this layout: load_state_dict says what is wrong
        ids = [i for group in saved["param_groups"] for i in group.get("params", [])]
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if len(ids) != len(params):
            return None  # another optimizer's grouping (a changed [optim]): check_resumable names the change
        for index, p in zip(ids, params):
            for key, value in saved["state"].get(index, {}).items():
                if torch.is_tensor(value) and value.dim() and value.shape != p.shape:
                    return (f"optimizer state {key!r} of {names.get(id(p), f'parameter {index}')} has shape "
                            f"{tuple(value.shape)}, the parameter {tuple(p.shape)}")
    return None


def build_scheduled_optimizer(model: torch.nn.Module, cfg: OptimConfig, max_steps: int, device: torch.device,
                              triton_adamw: bool, float16: bool) -> ScheduledOptimizer:
    """build_optimizer's optimizer behind ScheduledOptimizer, with a loss scaler under float16."""
    scaler = torch.amp.GradScaler("cuda") if float16 else None
    return ScheduledOptimizer(build_optimizer(model, cfg, device, triton_adamw), list(model.parameters()), cfg,
                              max_steps, scaler)


class FusedAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW's update in a constant number of Triton launches, with optional fused
    global-norm gradient clipping.

    Same hyperparameters, parameter groups and `state_dict()` as torch.optim.AdamW (per-parameter
    `step`, `exp_avg`, `exp_avg_sq`), so a checkpoint moves between the two. Parameters must be
    fp32 and on one device; gradients may be fp32, bf16 or fp16. `max_grad_norm` clips the global
    norm inside the update, with no host sync; `grad_norm` holds the last step's norm (before
    clipping) as a device tensor, to read only when logging; `compute_grad_norm()` gives it before
    the step (the trainer checks it is finite), and the step then reuses it. Group learning rates may change every
    step: they are copied to the device asynchronously, never recompiling anything.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, max_grad_norm: float | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"FusedAdamW: invalid hyperparameters lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError(f"FusedAdamW: max_grad_norm must be positive or None, got {max_grad_norm}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        params = [p for group in self.param_groups for p in group["params"]]
        devices = {p.device for p in params}
        if len(devices) != 1:
            raise ValueError(f"FusedAdamW: all parameters must be on one device, got {sorted(map(str, devices))}")
        if any(p.dtype != torch.float32 for p in params):
            raise TypeError("FusedAdamW: parameters must be float32 (gradients may be bf16 or fp16)")
        for index, p in enumerate(params):  # the kernels address each tensor as one flat block
            if not p.is_contiguous():
                raise ValueError(f"FusedAdamW: parameter {index} (shape {tuple(p.shape)}, strides {p.stride()}) is "
                                 "not contiguous; pass a contiguous tensor (.contiguous() before wrapping it in a "
                                 "Parameter)")
        import kernels.adamw  # noqa: F401  (fails here, not at the first step, where Triton is missing)

        self.device = devices.pop()
        self.max_grad_norm = max_grad_norm
        self.grad_norm: torch.Tensor | None = None
        self._prepared: list | None = None  # compute_grad_norm()'s launches, for the step that follows
        self._prepared_for: list = []  # the .grad tensors they were computed from
        self._tables: dict = {}  # (grad dtype, sizes, groups) -> (BlockTable, device group indices)

    def _hyper_table(self) -> torch.Tensor:
        from kernels.adamw import _to_device

        rows = [[float(g["lr"]), g["weight_decay"], g["betas"][0], g["betas"][1], g["eps"]] for g in self.param_groups]
        return _to_device(np.array(rows, dtype=np.float64), self.device)

    def _state_for(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
        elif state["step"].device != p.device or state["step"].dtype != torch.float32:
            # torch.optim.AdamW keeps `step` on the CPU: move it once, without a device sync.
            state["step"] = torch.tensor(float(state["step"]), dtype=torch.float32, device=p.device)
        return state

    def _launches(self) -> list[tuple]:
        """The tensors with gradients, grouped by gradient dtype (one launch each):
        (params, grads, states, group indices, block table) per group."""
        from kernels.adamw import BlockTable

        by_dtype: dict[torch.dtype, list] = {}
        for index, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p.grad is None:
                    continue  # as torch does: a parameter without a gradient is left alone
                if p.grad.is_sparse:
                    raise RuntimeError("FusedAdamW does not support sparse gradients")
                by_dtype.setdefault(p.grad.dtype, []).append((p, index))
        launches = []
        for dtype, entries in by_dtype.items():
            params = [p for p, _ in entries]
            key = (dtype, tuple(p.numel() for p in params), tuple(i for _, i in entries))
            if key not in self._tables:  # built once per set of tensors: sizes and groups never change
                groups = torch.tensor(key[2], dtype=torch.int32).to(self.device, non_blocking=True)
                self._tables[key] = (BlockTable.build(list(key[1]), self.device), groups)
            table, groups = self._tables[key]
            grads = [p.grad if p.grad.is_contiguous() else p.grad.contiguous() for p in params]
            launches.append((params, grads, [self._state_for(p) for p in params], groups, table))
        return launches

    @torch.no_grad()
    def compute_grad_norm(self) -> torch.Tensor:
        """The global L2 norm of the current gradients, as a device tensor (no sync). The next
        step() reuses it for clipping rather than computing it again."""
        from kernels.adamw import grad_sq_norm_partials

        launches = self._launches()
        if not launches:
            self.grad_norm = torch.zeros((), device=self.device)
        else:
            squares = [grad_sq_norm_partials(grads, table) for _, grads, _, _, table in launches]
            self.grad_norm = torch.cat(squares).sum().sqrt()
        self._prepared = launches  # step() reuses the grouping and the norm...
        self._prepared_for = self._current_grads()  # ...while these are still the gradients
        return self.grad_norm

    def _current_grads(self) -> list:
        return [p.grad for group in self.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self._prepared = None  # zeroed in place or dropped: the prepared norm is of other gradients
        super().zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self, closure=None):
        from kernels.adamw import adamw_update

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stale = self._prepared is not None and any(
            a is not b for a, b in zip(self._prepared_for, self._current_grads(), strict=True))
        if self._prepared is None or stale:  # new gradients since compute_grad_norm(): their own norm
            self.compute_grad_norm()
        launches, self._prepared = self._prepared, None
        if not launches:
            return loss
        torch._foreach_add_([s["step"] for *_, states, _, _ in launches for s in states], 1.0)
        hyper = self._hyper_table()
        for params, grads, states, groups, table in launches:
            adamw_update(params, grads, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                         [s["step"] for s in states], groups, hyper, table, self.grad_norm, self.max_grad_norm)
        return loss
