"""Where metrics go: metrics.jsonl, TensorBoard event files read back by TensorBoard's own reader,
wandb in offline mode; the end-of-run summary; progress lines and the projected duration."""

import json

import pytest

from gptfast.errors import ConfigError
from gptfast.loggers import check_backends, scalars
from gptfast.progress import Progress
from gptfast.trainer import Trainer


def quiet(_):
    pass


def jsonl(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_every_logged_value(tiny_config, tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    Trainer(tiny_config({"log.backends": '["jsonl", "tensorboard"]'}), log=quiet).run()
    out = tmp_path / "run"
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert {"train/loss", "train/grad_norm", "train/lr", "train/tokens_per_second", "val/loss",
            "summary/best_val_loss"} <= set(tags)
    records = jsonl(out)
    for tag, key in (("train/loss", "loss"), ("val/loss", "val_loss")):
        logged = [r for r in records if key in r]
        events_of_tag = events.Scalars(tag)
        assert [e.step for e in events_of_tag] == [r["step"] for r in logged]
        assert [e.value for e in events_of_tag] == pytest.approx([r[key] for r in logged], rel=1e-6)


def test_wandb_offline_run_records_the_summary(tiny_config, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the wandb extra is not installed")
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = Trainer(tiny_config({"log.backends": '["wandb"]', "log.wandb_mode": '"offline"'}), log=quiet).run()
    out = tmp_path / "run"
    assert not (out / "metrics.jsonl").exists()  # jsonl was not asked for
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    # The run file is wandb's protobuf log: each logged value sits in it as its key and its JSON.
    data = b"".join(path.read_bytes() for path in runs[0].glob("*.wandb"))
    for key, value in [("train/loss", result.train_loss), ("best_val_loss", result.summary["best_val_loss"]),
                       ("val/loss", result.val_loss)]:
        assert key.encode() in data and json.dumps(value).encode() in data, key
    # a resumed run continues the same wandb run
    run_id = (out / "wandb_id").read_text()
    Trainer(tiny_config({"log.backends": '["wandb"]', "log.wandb_mode": '"offline"', "train.max_steps": 8}),
            log=quiet).run()
    assert (out / "wandb_id").read_text() == run_id


def test_a_missing_backend_is_one_clear_error_before_anything_is_written(tiny_config, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r'wandb needs the wandb package.*pip install -e "\.\[wandb\]"'):
        Trainer(tiny_config({"log.backends": '["jsonl", "wandb"]'}), log=quiet)
    assert not (tmp_path / "run").exists()


def test_backend_names_are_checked(tiny_config):
    with pytest.raises(ConfigError, match="unknown backend 'tensorbord'; did you mean 'tensorboard'"):
        tiny_config({"log.backends": '["tensorbord"]'})
    with pytest.raises(ConfigError, match="names a backend twice"):
        tiny_config({"log.backends": '["jsonl", "jsonl"]'})
    check_backends(tiny_config().log)  # jsonl needs nothing


def test_scalars_names_and_filters():
    record = {"step": 3, "loss": 2.5, "val_loss": 2.4, "mfu": None, "skipped": True, "grad_norm": float("nan"),
              "reason": "spike", "tokens": 96}
    assert scalars(record) == {"train/loss": 2.5, "val/loss": 2.4, "train/tokens": 96.0}


def test_summary_ends_every_run(tiny_config, tmp_path):
    lines = []
    result = Trainer(tiny_config(), log=lines.append).run()
    summary = jsonl(tmp_path / "run")[-1]
    assert summary == result.summary
    assert summary["event"] == "summary" and summary["step"] == 6 and summary["steps_this_session"] == 6
    tokens_per_step = 4 * 2 * 32
    assert summary["tokens"] == 6 * tokens_per_step
    vals = [r["val_loss"] for r in jsonl(tmp_path / "run") if "val_loss" in r]
    assert summary["final_val_loss"] == vals[-1] and summary["best_val_loss"] == min(vals)
    assert summary["mean_tokens_per_second"] > 0 and summary["checkpoint"].endswith("ckpt_00000006.pt")
    assert lines[-1].startswith("summary: step 6 (6 this session)") and "best" in lines[-1]
    # resumed further: the best val loss and the training time carry over
    resumed = Trainer(tiny_config({"train.max_steps": 9}), log=quiet)
    assert resumed.state.best_val_loss == min(vals) and resumed.state.train_seconds == pytest.approx(summary["train_seconds"])
    again = resumed.run().summary
    assert again["steps_this_session"] == 3 and again["train_seconds"] > summary["train_seconds"]


def test_elapsed_and_tokens_are_recorded_with_each_step(tiny_config, tmp_path):
    Trainer(tiny_config(), log=quiet).run()
    steps = [r for r in jsonl(tmp_path / "run") if "loss" in r]
    assert [r["tokens"] for r in steps] == [s * 256 for s in range(1, 7)]
    elapsed = [r["elapsed_seconds"] for r in steps]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0


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
