"""What a run records (gptfast/metrics.py): step records, the end-of-run summary."""

import json

import pytest

from gptfast.trainer import Trainer


def quiet(_):
    pass


def jsonl(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


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


def test_the_step_line_shows_ms_per_step_and_memory_and_a_smoothed_eta(monkeypatch):
    import torch

    from gptfast import metrics
    from gptfast.config import Config, TrainConfig

    clock = iter([0.0, 10.0, 11.0, 12.0, 20.0])  # RunMetrics' start, then steps 1-4; a pause before 4
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    records, lines = [], []
    run = metrics.RunMetrics(Config(train=TrainConfig(max_steps=100, log_interval=1)), records.append, lines.append,
                             lambda step: 1.0, None, torch.device("cpu"), first_step=0)
    for step in range(1, 5):
        run.step(step, 3.0, 1.0, 1e-3, 0, float(step))
    last = records[-1]
    assert last["step_ms"] == 8000.0  # the last interval, as it was
    assert last["eta_seconds"] == pytest.approx(96 * (20.0 - 10.0) / 3)  # the session's mean since its first record
    assert "8,000 ms/step" in lines[-1] and "rss " in lines[-1] and last["resident_memory_bytes"] > 2**20
