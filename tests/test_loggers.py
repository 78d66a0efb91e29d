"""Where metrics go (gptfast/loggers.py): metrics.jsonl, TensorBoard event files read back by
TensorBoard's own reader, wandb in offline mode."""

import json

import pytest

from gptfast.errors import ConfigError
from gptfast.loggers import check_backends, scalars
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


@pytest.mark.parametrize("backends", ['["tensorboard"]', '["tensorboard", "jsonl"]'])
def test_a_full_disk_under_tensorboard_is_one_line_naming_the_intact_checkpoint(data_dir, tmp_path, capsys,
                                                                                monkeypatch, backends):
    """TensorBoard's writer thread meets the full disk: one error line, exit 2, the newest healthy
    checkpoint named, no thread traceback, the close not masking it."""
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    import errno

    from tensorboard.summary.writer import record_writer

    from conftest import REPO, tiny_overrides
    from gptfast import checkpoint as ckpt
    from gptfast.train import main as train_main

    real, writes = record_writer.RecordWriter.write, []

    def filling(self, data):
        writes.append(1)
        if len(writes) > 80:  # a few steps' scalars fit, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, data)

    monkeypatch.setattr(record_writer.RecordWriter, "write", filling)
    out = tmp_path / "run"
    argv = [str(REPO / "configs" / "cpu_smoke.toml"), *tiny_overrides(data_dir, out, {
        "log.backends": backends, "train.checkpoint_interval": 1, "train.max_steps": 50})]
    code = train_main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    newest = ckpt.latest_checkpoint(out, healthy_only=True)
    assert lines[0].startswith(f"error: cannot write {out / 'tensorboard'}: No space left on device; "
                               f"the newest healthy checkpoint {newest} is intact"), err
