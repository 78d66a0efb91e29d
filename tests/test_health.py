"""The health verdict (gptfast/health.py): the guard's rules, and HealthMonitor's one host read."""

import math

import pytest
import torch

from gptfast.errors import TrainingDiverged
from gptfast.health import HealthGuard, HealthMonitor


def monitor(spike=3.0, growth=1.5, loss_scaled=False):
    return HealthMonitor(HealthGuard(spike, growth), loss_scaled=loss_scaled)


def judge(m, loss, grad_norm=1.0, also=None):
    return m.judge(torch.tensor(loss), torch.tensor(grad_norm), also=also)


def test_a_spike_after_three_healthy_losses_is_unhealthy_and_not_recorded():
    m = monitor()
    for loss in (4.0, 4.2, 3.8):
        assert judge(m, loss)[0].healthy
    verdict, _ = judge(m, 13.0)  # > 3x the mean of 4.0
    assert not verdict.healthy and "spiked" in verdict.reason and m.bad_in_a_row == 1
    assert list(m.guard.recent_losses) == pytest.approx([4.0, 4.2, 3.8])  # the spike is no reference for the next
    assert judge(m, 4.1)[0].healthy and m.bad_in_a_row == 0


def test_non_finite_values_are_unhealthy_unless_the_loss_scaler_owns_the_gradient():
    assert not judge(monitor(), float("nan"))[0].healthy
    assert not judge(monitor(), 4.0, float("inf"))[0].healthy
    # float16: an overflowing gradient is the loss scaler's business (it skips the step itself)
    assert judge(monitor(loss_scaled=True), 4.0, float("inf"))[0].healthy


def test_the_parameter_norm_after_an_update_is_judged_with_the_next_step():
    model = torch.nn.Linear(4, 4)
    m = monitor()
    m.updated(model)
    assert judge(m, 4.0)[0].healthy  # the first norm is the baseline
    with torch.no_grad():
        model.weight.mul_(10.0)
    m.updated(model)
    verdict, _ = judge(m, 4.0)
    assert not verdict.healthy and "grew the parameter norm" in verdict.reason


def test_judge_update_judges_a_pending_norm_once_and_only_once():
    model = torch.nn.Linear(4, 4)
    m = monitor()
    m.updated(model)
    assert m.judge_update().healthy and m._pending is None
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    m.updated(model)
    assert not m.judge_update().healthy and m.bad_in_a_row == 1
    assert m.judge_update().healthy  # nothing pending any more


def test_the_step_values_are_read_in_one_host_sync(monkeypatch):
    """loss, gradient norm, the pending parameter norm and the stop flag: one tolist()."""
    m = monitor()
    m.updated(torch.nn.Linear(3, 3))
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real(t))
    monkeypatch.setattr(torch.Tensor, "item", lambda t: pytest.fail("a second host read"))
    verdict, stop = judge(m, 4.0, also=torch.tensor(1.0))
    assert verdict.healthy and stop == 1.0 and reads == [torch.Size([4])]


def test_too_many_bad_steps_name_the_newest_healthy_checkpoint():
    m = monitor()
    for _ in range(3):
        judge(m, float("nan"))
    m.stop_if_diverged(4, 7, lambda: "ckpt")  # 3 < 4: keeps going
    with pytest.raises(TrainingDiverged, match=r"3 optimizer steps in a row \(up to step 7\).*is ckpt;"):
        m.stop_if_diverged(3, 7, lambda: "ckpt")
    with pytest.raises(TrainingDiverged, match="No healthy checkpoint"):
        m.stop_if_diverged(3, 7, lambda: None)


def test_state_round_trips():
    m = monitor()
    for loss in (4.0, 5.0):
        judge(m, loss)
    judge(m, math.inf)
    other = monitor()
    other.load_state_dict(m.state_dict())
    assert other.state_dict() == m.state_dict() and other.bad_in_a_row == 1


def test_the_first_update_is_judged_against_the_initial_weights():
    model = torch.nn.Linear(4, 4)
    m = monitor()
    m.baseline(model)
    with torch.no_grad():
        model.weight.mul_(1e4)
    m.updated(model)
    verdict, _ = judge(m, 4.0)
    assert not verdict.healthy and "grew the parameter norm" in verdict.reason
    resumed = monitor()  # a guard restored from a checkpoint keeps the norm it recorded
    resumed.guard.param_norm = 3.0
    resumed.baseline(model)
    assert resumed.guard.param_norm == 3.0


@pytest.mark.parametrize("guard", [{}, {"train.loss_spike_factor": 0}, {"train.max_param_growth": 0}],
                         ids=["both-checks", "growth-check-alone", "spike-check-alone"])
def test_a_first_update_that_explodes_is_never_called_healthy(tiny_config, tmp_path, guard):
    """lr 1e3: the first update throws the weights far out. Its checkpoint is marked unhealthy,
    and the divergence error says no healthy checkpoint exists instead of naming that one, whether
    the growth check (against the initial weights) or the spike check (against the first loss)
    catches it."""
    from gptfast import checkpoint as ckpt
    from gptfast.trainer import Trainer

    cfg = tiny_config({"optim.lr": 1e3, "optim.warmup_steps": 1, "train.max_steps": 20, "train.max_bad_steps": 3,
                       "train.checkpoint_interval": 1, "train.eval_interval": 20, **guard})
    trainer = Trainer(cfg, log=lambda _: None)
    with pytest.raises(TrainingDiverged, match="No healthy checkpoint was written"):
        trainer.run()
    assert ckpt.latest_checkpoint(tmp_path / "run", healthy_only=True) is None
