"""Nothing lost, for real: one trainer per run directory, full disks, torn metrics, unhealthy runs,
resume exactness, checksums (gptfast/rundir.py, gptfast/checkpoint.py, gptfast/health.py)."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO, tiny_overrides
from gptfast import checkpoint as ckpt
from gptfast.train import main as train_main
from gptfast.trainer import Trainer


def quiet(_):
    pass


def cli(argv, capsys):
    code = train_main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def argv_for(data_dir, out, **extra):
    return [str(REPO / "configs" / "cpu_smoke.toml")] + tiny_overrides(data_dir, out, extra)


def test_a_second_trainer_on_the_same_directory_is_refused(tiny_config, tmp_path, capsys, data_dir):
    first = Trainer(tiny_config(), log=quiet)  # holds the lock until it closes
    code, _, err = cli(argv_for(data_dir, tmp_path / "run"), capsys)
    assert code == 2
    line = one_error_line(err)
    assert "is in use by another trainer" in line and f"pid {os.getpid()}" in line
    first.run()  # unharmed: its metrics hold its own steps once each
    steps = [json.loads(r)["step"] for r in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(r)]
    assert steps == [1, 2, 3, 4, 5, 6]
    again = Trainer(tiny_config({"train.max_steps": 7}), log=quiet)  # released once the first returned
    assert again.step == 6
    again.close()


def test_a_killed_trainer_leaves_no_lock(tmp_path, data_dir):
    """The OS drops a dead process's flock, so kill -9 never locks a directory for good."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "gptfast.train"] + argv_for(data_dir, out, **{"train.max_steps": 100000})
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not (out / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        lock_owner = (out / ".lock").read_text()
        assert f"pid {proc.pid}" in lock_owner
    finally:
        proc.kill()
        proc.wait()
    resumed = Trainer(load(data_dir, out, {"train.max_steps": 1}), log=quiet)
    resumed.close()


def load(data_dir, out, extra):
    from gptfast.configfile import load_config

    return load_config(None, tiny_overrides(data_dir, out, extra))


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 48 MiB filesystem (tmpfs): room for one tiny-model checkpoint set, not two."""
    mount = tmp_path / "small_fs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a size-limited tmpfs needs root (run as root, as CI does)")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {made.stderr.strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_during_a_checkpoint_is_one_line_and_the_last_checkpoint_survives(small_filesystem, data_dir,
                                                                                     capsys):
    out = small_filesystem / "run"
    # every step a checkpoint, none rotated away: the disk fills after a few
    argv = argv_for(data_dir, out, **{"train.max_steps": 50, "train.checkpoint_interval": 1,
                                      "train.keep_checkpoints": 50, "train.eval_interval": 1000})
    code, _, err = cli(argv, capsys)
    line = one_error_line(err)
    # found before the write that would fail (the free-space check), or by the write itself
    assert code == 2 and (("cannot write" in line and "No space left on device" in line)
                          or "but a checkpoint needs about" in line), err
    newest = ckpt.latest_checkpoint(out)
    assert newest is not None and f"the newest healthy checkpoint {newest} is intact" in line
    state = ckpt.load_checkpoint(newest, log=quiet)
    assert state["step"] == ckpt.checkpoint_step(newest)
    assert not list(out.glob(".*.tmp"))  # the half-written checkpoint was removed
    written = len(ckpt.list_checkpoints(out))
    assert 1 <= written < 50  # the disk really did fill part-way


def test_a_torn_last_metrics_record_is_dropped_on_resume(tiny_config, tmp_path):
    Trainer(tiny_config(), log=quiet).run()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 7, "lo')  # what a crash during an append leaves
    messages = []
    resumed = Trainer(tiny_config({"train.max_steps": 8}), log=messages.append)
    assert any("dropped a torn last record" in m for m in messages)
    resumed.run()
    steps = [json.loads(r)["step"] for r in metrics.read_text().splitlines() if "loss" in json.loads(r)]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]


def test_an_exploding_run_keeps_its_last_healthy_checkpoint(data_dir, tmp_path, capsys):
    """The attack: --optim.lr=1e30 explodes the weights (finite, ~1e29) in one update. The guard
    sees the parameter norm blow up; no checkpoint written after it is called healthy; rotation
    keeps the healthy one; the stop names it, and rerunning resumes from it."""
    out = tmp_path / "run"
    base = {"train.checkpoint_interval": 1, "train.keep_checkpoints": 2, "train.max_bad_steps": 3,
            "train.eval_interval": 1000}
    assert cli(argv_for(data_dir, out, **base, **{"train.max_steps": 3}), capsys)[0] == 0
    code, _, err = cli(argv_for(data_dir, out, **base, **{"train.max_steps": 20, "optim.lr": 1e30,
                                                          "optim.min_lr": 0.0}), capsys)
    line = one_error_line(err)
    assert code == 2 and "were unhealthy" in line
    healthy = ckpt.checkpoint_path(out, 3)
    assert f"newest healthy checkpoint is {healthy}" in line
    listed = [(ckpt.checkpoint_step(p), ckpt.is_healthy(p)) for p in ckpt.list_checkpoints(out)]
    assert listed[0] == (3, True) and all(not ok for _, ok in listed[1:]) and len(listed) >= 2
    exploded = ckpt.load_checkpoint(ckpt.latest_checkpoint(out), log=quiet)
    assert max(v.abs().max().item() for v in exploded["model"].values()) > 1e20  # the weights did explode
    # The same command at a sane lr resumes from step 3, not from the exploded weights.
    code, stdout, err = cli(argv_for(data_dir, out, **base, **{"train.max_steps": 6}), capsys)
    assert code == 0, err
    assert f"resumed from {healthy} at step 3" in stdout
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r and not r.get("skipped")][-3:] == [4, 5, 6]
    assert all(r["loss"] is not None and r["loss"] < 12 for r in rows if "loss" in r and r["step"] > 3)
    assert list(out.glob("old_*/ckpt_*.pt"))  # the unhealthy checkpoints were set aside, not deleted


def test_a_loss_spike_condemns_the_checkpoint_of_the_weights_that_caused_it(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config({"train.max_steps": 9, "train.checkpoint_interval": 1, "train.keep_checkpoints": 9,
                                   "train.eval_interval": 1000}), log=quiet)
    model_forward = trainer.model.forward
    # The loss of step 6 (computed with the weights after update 5) is ten times the recent ones.
    monkeypatch.setattr(trainer, "train_model",
                        lambda idx, targets=None: model_forward(idx, targets) * (10.0 if trainer.step == 5 else 1.0))
    trainer.run()
    out = trainer.run_dir.path
    health = {ckpt.checkpoint_step(p): ckpt.is_healthy(p) for p in ckpt.list_checkpoints(out)}
    assert health == {1: True, 2: True, 3: True, 4: True, 5: False, 6: False, 7: True, 8: True, 9: True}
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in rows if r.get("skipped")]
    assert [r["step"] for r in skipped] == [6] and "spiked" in skipped[0]["reason"]


@pytest.mark.parametrize("override, refused", [
    ("--train.seed=7", "train.seed: 1337 -> 7"),
    ("--train.micro_batch_size=2", "train.micro_batch_size: 4 -> 2"),
    ("--train.grad_accum_steps=3", "train.grad_accum_steps: 2 -> 3"),
    ("--model.dropout=0.1", "model.dropout: 0.0 -> 0.1"),
    ("--data.dataset=other", "data.dataset: 'small' -> 'other'"),
])
def test_resume_refuses_changes_to_the_trajectory(data_dir, tmp_path, capsys, override, refused):
    out = tmp_path / "run"
    assert cli(argv_for(data_dir, out), capsys)[0] == 0
    before = (out / "config.toml").read_text()
    if override.startswith("--data.dataset"):
        shutil.copytree(data_dir / "small", data_dir / "other", dirs_exist_ok=True)
    code, _, err = cli(argv_for(data_dir, out, **{"train.max_steps": 8}) + [override], capsys)
    line = one_error_line(err)
    assert code == 2 and refused in line and "--train.allow_config_change=true" in line
    assert (out / "config.toml").read_text() == before  # nothing rewritten
    code, stdout, err = cli(argv_for(data_dir, out, **{"train.max_steps": 8}) +
                            [override, "--train.allow_config_change=true"], capsys)
    assert code == 0, err
    assert f"resume: changed {refused}" in stdout


def test_resume_logs_changes_that_keep_the_trajectory(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(argv_for(data_dir, out), capsys)[0] == 0
    code, stdout, err = cli(argv_for(data_dir, out, **{"train.max_steps": 8, "optim.lr": 5e-4}), capsys)
    assert code == 0, err
    assert "resume: changed optim.lr: 0.001 -> 0.0005" in stdout
    assert "resume: changed train.max_steps: 6 -> 8" in stdout


def test_a_missing_checksum_is_a_warning_and_is_written(tiny_config, tmp_path):
    Trainer(tiny_config(), log=quiet).run()
    newest = ckpt.latest_checkpoint(tmp_path / "run")
    ckpt.checksum_path(newest).unlink()
    messages = []
    resumed = Trainer(tiny_config({"train.max_steps": 7}), log=messages.append)
    resumed.close()
    assert resumed.step == 6
    assert any("could not be verified" in m for m in messages)
    assert ckpt.checksum_path(newest).read_text().strip() == ckpt.file_sha256(newest)


def test_rotation_never_deletes_the_newest_healthy_checkpoint(tmp_path):
    state = {"model": {"w": torch.ones(2)}, "config": {}, "step": 0}
    ckpt.save_checkpoint(dict(state, step=1), tmp_path, 1, keep=2)
    for step in (2, 3, 4):
        ckpt.save_checkpoint(dict(state, step=step), tmp_path, step, keep=2, healthy=False)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [1, 3, 4]
    assert ckpt.latest_checkpoint(tmp_path, healthy_only=True) == ckpt.checkpoint_path(tmp_path, 1)
    assert ckpt.load_checkpoint(tmp_path, log=quiet)["step"] == 1  # a directory loads its newest healthy one
    ckpt.save_checkpoint(dict(state, step=5), tmp_path, 5, keep=2)
    assert [ckpt.checkpoint_step(p) for p in ckpt.list_checkpoints(tmp_path)] == [4, 5]
    assert not list(tmp_path.glob("ckpt_00000001*")) and not list(tmp_path.glob("ckpt_00000003*"))


def test_errors_of_our_own_keep_their_traceback(monkeypatch, data_dir, tmp_path):
    """Exit 2 and one line are for the user's input; a bug in gptfast propagates with its traceback."""
    def broken(self):
        raise AssertionError("an internal invariant")

    monkeypatch.setattr(Trainer, "save", broken)
    with pytest.raises(AssertionError, match="an internal invariant"):
        train_main(argv_for(data_dir, tmp_path / "run"))


def test_unique_tmp_names():
    from gptfast.files import tmp_path

    path = ckpt.checkpoint_path("/x", 3)
    assert tmp_path(path).name == f".ckpt_00000003.pt.{os.getpid()}.tmp"


def test_a_file_system_without_locks_is_named_not_taken_for_another_trainer(tmp_path, monkeypatch):
    import errno
    import fcntl

    from gptfast.errors import RunDirError
    from gptfast.rundir import RunDir

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(RunDirError, match="cannot be locked \\(No locks available\\)") as raised:
        RunDir(tmp_path / "run").acquire()
    assert "in use" not in str(raised.value)
