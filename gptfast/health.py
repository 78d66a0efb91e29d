"""Is the run healthy? The step guard that decides which updates to apply and which checkpoints to trust.

A step is unhealthy when its loss or gradient norm is NaN/Inf, when its loss spikes against the
recent healthy losses (`train.loss_spike_factor`), or when the update before it blew up the global
parameter norm (`train.max_param_growth`). An unhealthy step's update is not applied (parameters
and optimizer state stay as they were), as llm.c skips updates whose loss is an outlier. The loss of
step s is computed with the weights after update s-1, so a spike at step s also condemns the
checkpoint of step s-1. After `train.max_bad_steps` unhealthy steps in a row the run stops.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import torch

from gptfast.errors import TrainingDiverged

# The spike reference: the mean loss of this many recent healthy steps, from the first one on. A
# fresh run's losses fall from about ln(vocab) and a loaded model's start at its own, so the first
# healthy loss is already a fair reference (waiting for three let a first update that blew the
# weights up pass: its loss was only compared with nothing).
SPIKE_WINDOW = 10
SPIKE_MIN_HISTORY = 1


@dataclass
class Verdict:
    healthy: bool
    reason: str = ""  # why not, in words for the log


class HealthGuard:
    def __init__(self, loss_spike_factor: float, max_param_growth: float):
        self.loss_spike_factor = loss_spike_factor
        self.max_param_growth = max_param_growth
        self.recent_losses: deque[float] = deque(maxlen=SPIKE_WINDOW)
        self.param_norm: float | None = None  # global parameter norm after the last applied update
        self.bad_in_a_row = 0

    @property
    def healthy(self) -> bool:
        return self.bad_in_a_row == 0

    def check_param_norm(self, param_norm: float) -> Verdict:
        """The parameter norm after an update, against the one before it."""
        before, self.param_norm = self.param_norm, param_norm
        if not math.isfinite(param_norm):
            return Verdict(False, f"the parameters hold NaN or Inf after the update (norm {param_norm})")
        if self.max_param_growth and before and param_norm > self.max_param_growth * before:
            return Verdict(False, f"the update grew the parameter norm {param_norm / before:.3g}x "
                                  f"({before:.4g} -> {param_norm:.4g}; train.max_param_growth = {self.max_param_growth})")
        return Verdict(True)

    def check_step(self, loss: float, grad_norm: float) -> Verdict:
        """A step's loss and gradient norm, before its update is applied."""
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return Verdict(False, f"non-finite loss {loss} or gradient norm {grad_norm}")
        if self.loss_spike_factor and len(self.recent_losses) >= SPIKE_MIN_HISTORY:
            reference = sum(self.recent_losses) / len(self.recent_losses)
            if loss > self.loss_spike_factor * reference:
                return Verdict(False, f"loss {loss:.4g} spiked to {loss / reference:.3g}x the recent mean "
                                      f"{reference:.4g} (train.loss_spike_factor = {self.loss_spike_factor})")
        return Verdict(True)

    def record(self, verdict: Verdict, loss: float) -> None:
        if verdict.healthy:
            self.bad_in_a_row = 0
            self.recent_losses.append(loss)
        else:
            self.bad_in_a_row += 1

    def state_dict(self) -> dict:
        return {"recent_losses": list(self.recent_losses), "param_norm": self.param_norm,
                "bad_in_a_row": self.bad_in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.recent_losses = deque(state["recent_losses"], maxlen=SPIKE_WINDOW)
        self.param_norm = state["param_norm"]
        self.bad_in_a_row = state["bad_in_a_row"]


class HealthMonitor:
    """The guard as the trainer uses it: after an update, `updated(model)` queues the parameter norm
    (a device tensor); `judge(loss, grad_norm)` reads it with the step's loss and gradient norm in
    one host sync and returns the verdict on the step; `judge_update()` judges a queued norm on
    its own, before a checkpoint of those weights is written. Its state is the guard's."""

    def __init__(self, guard: HealthGuard, loss_scaled: bool = False):
        self.guard = guard
        self.loss_scaled = loss_scaled  # float16: an overflowing gradient is the loss scaler's business
        self._pending: torch.Tensor | None = None  # the norm after the last update, not yet judged

    @property
    def healthy(self) -> bool:
        return self.guard.healthy

    @property
    def bad_in_a_row(self) -> int:
        return self.guard.bad_in_a_row

    @staticmethod
    def _norm(model: torch.nn.Module) -> torch.Tensor:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(model.parameters()))).float())

    @torch.no_grad()
    def updated(self, model: torch.nn.Module) -> None:
        self._pending = self._norm(model)

    @torch.no_grad()
    def baseline(self, model: torch.nn.Module) -> None:
        """The norm of weights nobody updated yet (fresh, loaded from init_from, or a checkpoint
        older than this rule), the reference the first update is judged against: without it the
        first update went unjudged, however far it threw the weights (one host read, at start)."""
        if self.guard.param_norm is None:
            self.guard.param_norm = self._norm(model).item()

    def judge(self, loss: torch.Tensor, grad_norm: torch.Tensor,
              also: torch.Tensor | None = None) -> tuple[Verdict, float | None]:
        """(the verdict on this step, the host value of `also`): the step's one host read."""
        pending, self._pending = self._pending, None
        values = [loss, grad_norm.float()] + [v.float() for v in (also, pending) if v is not None]
        host = torch.stack(values).tolist()
        loss_value, norm = host[0], (0.0 if self.loss_scaled else host[1])
        also_value = host[2] if also is not None else None
        verdict = self.guard.check_param_norm(host[-1]) if pending is not None else Verdict(True)
        if verdict.healthy:
            verdict = self.guard.check_step(loss_value, norm)
        self.guard.record(verdict, loss_value)
        return verdict, also_value

    def judge_update(self) -> Verdict:
        """The last update's verdict, judged now if it was not yet (one host sync)."""
        if self._pending is None:
            return Verdict(True)
        verdict = self.guard.check_param_norm(self._pending.item())
        self._pending = None
        if not verdict.healthy:
            self.guard.record(verdict, float("nan"))
        return verdict

    def stop_if_diverged(self, max_bad_steps: int, step: int, newest_healthy) -> None:
        """TrainingDiverged after max_bad_steps unhealthy steps in a row, naming the checkpoint to
        resume from (newest_healthy(): the newest healthy one, or None)."""
        if self.guard.bad_in_a_row < max_bad_steps:
            return
        last = newest_healthy()
        raise TrainingDiverged(
            f"{self.guard.bad_in_a_row} optimizer steps in a row (up to step {step}) were unhealthy "
            f"(train.max_bad_steps = {max_bad_steps}); the run stopped. "
            + (f"The newest healthy checkpoint is {last}; rerunning the same command resumes from it "
               "(lower optim.lr or raise optim.warmup_steps first)." if last else
               "No healthy checkpoint was written; start over with a lower optim.lr."))

    def state_dict(self) -> dict:
        return self.guard.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.guard.load_state_dict(state)
