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
