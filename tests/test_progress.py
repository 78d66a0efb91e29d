"""Progress lines of long loops, and the projected duration printed before the first step."""

from gptfast.progress import Progress
from gptfast.trainer import Trainer


def quiet(_):
    pass


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_is_silent_for_short_loops_then_reports_at_intervals():
    clock, lines = Clock(), []
    progress = Progress(10, "step 1/5: micro-batch", lines.append, after=10, clock=clock)
    for i in range(1, 11):
        clock.now = 4.0 * i
        progress.update(i)
    # silent until 10 s, then a line at most every 10 s: at 12, 24 (not 16, 20), 36
    assert lines == ["step 1/5: micro-batch: 3/10 (0m12s so far, ~0m28s left)",
                     "step 1/5: micro-batch: 6/10 (0m24s so far, ~0m16s left)",
                     "step 1/5: micro-batch: 9/10 (0m36s so far, ~0m04s left)"]
    quick = []
    fast = Progress(3, "x", quick.append, after=10, clock=clock)
    fast.update(3)
    assert quick == []
    off = Progress(3, "x", quick.append, after=0, clock=clock)
    clock.now += 100
    off.update(3)
    assert quick == []


def test_a_long_step_shows_progress(tiny_config):
    lines = []
    trainer = Trainer(tiny_config({"log.progress_seconds": 1e-9, "train.max_steps": 1}), log=lines.append)
    trainer.run()
    assert any(line.startswith("step 1/1: micro-batch: 2/2") for line in lines)
    assert any(line.startswith("evaluation: batch: 2/2") for line in lines)


def test_a_run_that_would_take_days_warns_before_it_starts(tiny_config, tmp_path, monkeypatch):
    import gptfast.progress as progress_module

    lines = []
    Trainer(tiny_config({"train.max_steps": 2}, out_dir=tmp_path / "real"), log=lines.append).run()
    assert [line for line in lines if line.startswith("projected: ~0m")]  # this CPU: seconds
    lines.clear()
    trainer = Trainer(tiny_config({"train.max_steps": 1}), log=lines.append)
    monkeypatch.setattr(progress_module, "cpu_matmul_flops", lambda: 1e3)  # a CPU of 1 kFLOP/s: the tiny run projects to weeks
    trainer.run()
    first = next(i for i, line in enumerate(lines) if line.startswith("step 1/1 |"))
    warnings = [line for line in lines[:first] if line.startswith("warning: projected")]
    assert warnings and "meant for a GPU" in warnings[0] and "d" in warnings[0].split("~")[1].split()[0]
