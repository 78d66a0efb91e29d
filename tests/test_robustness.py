"""Nothing lost: kills at random moments, signals, non-finite steps, bad input, fuzzed configs."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import REPO, tiny_overrides
from gptfast import checkpoint as ckpt
from gptfast.errors import TrainingDiverged
from gptfast.train import main as train_main
from gptfast.trainer import Trainer


def quiet(_):
    pass


def losses(out_dir):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and not r.get("skipped")}


def train_cmd(data_dir, out_dir, *extra):
    return [sys.executable, "-m", "gptfast.train", str(REPO / "configs" / "cpu_smoke.toml"),
            *tiny_overrides(data_dir, out_dir, {"train.max_steps": 12, "train.checkpoint_interval": 1,
                                                "train.eval_interval": 4, "train.keep_checkpoints": 2}), *extra]


@pytest.mark.slow
def test_kill_at_random_moments_then_resume_exactly(data_dir, tmp_path, monkeypatch):
    """20 trials SIGKILL a real trainer: 10 at a random moment, 10 aimed at checkpoint writes (the
    kill is sent the moment a temporary checkpoint file appears). The newest checkpoint always
    loads, and resuming reproduces the uninterrupted losses bit for bit.

    The trainers run one CPU thread each: with two, the loss's own mean over the batch (a parallel
    reduction, whose value no gradient depends on) moved in its 7th digit at a step or two of a
    run now and then, while every later loss, so every weight, was the same."""
    monkeypatch.setenv("GPTFAST_CPU_THREADS", "1")  # the subprocesses inherit it
    reference = tmp_path / "reference"
    subprocess.run(train_cmd(data_dir, reference), check=True, capture_output=True, timeout=600)
    want = losses(reference)
    assert sorted(want) == list(range(1, 13))
    rng = random.Random(os.getpid())
    start_up, kills, mid_write = None, 0, 0
    for trial in range(21):  # trial 0 times a whole run; 1-10 kill at random, 11-20 during a write
        out = tmp_path / f"trial{trial}"
        began = time.perf_counter()
        proc = subprocess.Popen(train_cmd(data_dir, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if start_up is None:  # learn how long a run takes, then kill anywhere inside it
            proc.wait(timeout=600)
            start_up = time.perf_counter() - began
        elif trial <= 10:
            try:
                proc.wait(timeout=rng.uniform(0.2 * start_up, 0.85 * start_up))
            except subprocess.TimeoutExpired:
                proc.kill()
        else:
            skip = rng.randrange(0, 8)  # which write to hit: a later one each time
            seen: set[str] = set()
            while proc.poll() is None:
                writing = [p.name for p in out.glob(".ckpt_*.tmp")] if out.exists() else []
                fresh = [name for name in writing if name not in seen]
                if fresh and len(seen) >= skip:
                    proc.kill()
                    break
                seen.update(fresh)
        proc.wait()
        if trial > 10 and proc.returncode == -signal.SIGKILL and list(out.glob(".ckpt_*.tmp")):
            mid_write += 1  # the kill left a half-written checkpoint behind: it landed inside the write
        newest = ckpt.latest_checkpoint(out)
        if newest is not None:
            assert ckpt.load_checkpoint(newest)["step"] == int(newest.stem.split("_")[1])
        resumed = subprocess.run(train_cmd(data_dir, out), capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, (trial, resumed.stderr)
        assert losses(out) == want, trial
        assert not list(out.glob(".*.tmp"))  # what a kill left half-written is cleared on resume
        assert all(p.with_name(p.name + ".sha256").exists() for p in ckpt.list_checkpoints(out))
        kills += proc.returncode == -signal.SIGKILL
    assert kills >= 15  # the trials did kill, not wait for runs that had finished
    assert mid_write >= 5, mid_write  # and at least half of the aimed kills provably landed mid-write


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_finishes_the_step_checkpoints_and_exits_0(data_dir, tmp_path, sig):
    out = tmp_path / "run"
    cmd = train_cmd(data_dir, out, "--train.max_steps=100000", "--train.checkpoint_interval=100000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() or not losses(out):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    step = max(losses(out))
    assert f"stopped at step {step}" in stdout and "resume with: python -m gptfast.train" in stdout
    assert ckpt.load_checkpoint(out)["step"] == step


def test_nan_steps_are_skipped_and_counted(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config({"train.max_steps": 5}), log=quiet)
    model_forward = trainer.model.forward
    poisoned_steps = {1, 3}

    def forward(idx, targets=None):
        loss = model_forward(idx, targets)
        return loss * float("nan") if trainer.step in poisoned_steps and targets is not None else loss

    monkeypatch.setattr(trainer, "train_model", forward)
    before = {}

    def snapshot():
        return [p.detach().clone() for p in trainer.model.parameters()], copy_state(trainer.optimizer.inner)

    real_step = trainer.train_step

    def step_and_check():
        params, state = snapshot()
        out = real_step()
        if not out[2].healthy:
            for a, b in zip(params, trainer.model.parameters(), strict=True):
                assert torch.equal(a, b)  # a skipped step changes no parameter...
            assert copy_state(trainer.optimizer.inner) == state  # ...and no optimizer state
            before[trainer.step] = True
        return out

    trainer.train_step = step_and_check
    result = trainer.run()
    assert result.step == 5 and trainer.skipped_steps == 2 and set(before) == {2, 4}
    rows = [json.loads(line) for line in (trainer.run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [2, 4]
    assert all(torch.isfinite(p).all() for p in ckpt.load_checkpoint(trainer.run_dir.path)["model"].values())


def copy_state(opt):
    return repr({k: (v.tolist() if torch.is_tensor(v) else v) for s in opt.state.values() for k, v in s.items()})


def test_too_many_bad_steps_stop_the_run(tiny_config, monkeypatch):
    trainer = Trainer(tiny_config({"train.max_steps": 20, "train.max_bad_steps": 3, "train.checkpoint_interval": 2}),
                      log=quiet)
    model_forward = trainer.model.forward
    monkeypatch.setattr(trainer, "train_model",
                        lambda idx, targets=None: model_forward(idx, targets) * (float("inf") if trainer.step >= 4 else 1.0))
    # Step 5's loss (the weights after update 4) is the first bad one: ckpt 4 holds those weights, so
    # it is condemned too, and the newest healthy checkpoint is step 2's.
    with pytest.raises(TrainingDiverged, match=r"3 optimizer steps in a row \(up to step 7\).* newest healthy "
                                               r"checkpoint is .*ckpt_00000002.pt; rerunning the same command"):
        trainer.run()
    out = trainer.run_dir.path
    assert [(p.name, ckpt.is_healthy(p)) for p in ckpt.list_checkpoints(out)] == [
        ("ckpt_00000002.pt", True), ("ckpt_00000004.pt", False), ("ckpt_00000006.pt", False)]
    # steps 5 and 6 were skipped, so the step-6 checkpoint holds the step-4 weights, all finite
    at_4 = ckpt.load_checkpoint(out / "ckpt_00000004.pt")["model"]
    at_6 = ckpt.load_checkpoint(out / "ckpt_00000006.pt")["model"]
    assert all(torch.equal(at_4[k], at_6[k]) and torch.isfinite(at_6[k]).all() for k in at_4)


def test_corrupt_newest_checkpoint_falls_back(tiny_config, tmp_path):
    Trainer(tiny_config(), log=quiet).run()
    newest = ckpt.latest_checkpoint(tmp_path / "run")
    data = bytearray(newest.read_bytes())
    data[-100] ^= 0xFF
    newest.write_bytes(bytes(data))
    messages = []
    resumed = Trainer(tiny_config({"train.max_steps": 8}), log=messages.append)
    assert resumed.step == 3
    assert any("is corrupt" in m and "trying the previous checkpoint" in m for m in messages)


def run_cli(argv, capsys):
    code = train_main(argv)
    return code, capsys.readouterr().err


def write_tokens(folder, train, val):
    folder.mkdir(parents=True)
    np.asarray(train, dtype="<u2").tofile(folder / "train.bin")
    np.asarray(val, dtype="<u2").tofile(folder / "val.bin")
    (folder / "meta.json").write_text("{}")


@pytest.mark.parametrize("case, needle", [
    ("odd_bytes", "odd count"),
    ("past_vocab", "past the model's vocab_size 50257"),
    ("too_short", "fewer than block_size + 1"),
    ("missing_bin", "val.bin does not exist"),
])
def test_bad_data_is_one_error_line(tmp_path, capsys, case, needle):
    folder = tmp_path / "data" / "bad"
    write_tokens(folder, np.arange(1000) % 50257, np.arange(500))
    if case == "odd_bytes":
        (folder / "train.bin").write_bytes((folder / "train.bin").read_bytes() + b"\x01")
    elif case == "past_vocab":
        tokens = np.fromfile(folder / "train.bin", dtype="<u2")
        tokens[10] = 60000
        tokens.tofile(folder / "train.bin")
    elif case == "too_short":
        np.arange(20, dtype="<u2").tofile(folder / "val.bin")
    elif case == "missing_bin":
        (folder / "val.bin").unlink()
    out = tmp_path / "run"
    argv = [str(REPO / "configs" / "cpu_smoke.toml"), f"--data.data_dir={tmp_path / 'data'}", "--data.dataset=bad",
            f"--train.out_dir={out}", "--train.device=cpu", "--train.max_steps=1"]
    code, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not out.exists()  # nothing half-written


@pytest.mark.parametrize("override, needle", [
    ("--model.n_embd=130", "not divisible by model.n_head"),
    ("--model.n_layer=-1", "must be positive"),
    ("--train.micro_batch_size=0", "must be positive"),
    ("--trian.max_steps=3", "did you mean 'train'"),
    ("--train.max_steps=3.5", "expected an integer"),
    ("--optim.betas=0.9", "expected a list of float, float"),
])
def test_bad_config_is_one_error_line(tmp_path, capsys, override, needle):
    # max_steps=1: should the error not fire, the run is short
    argv = [str(REPO / "configs" / "cpu_smoke.toml"), f"--train.out_dir={tmp_path / 'run'}", "--train.max_steps=1",
            f"--data.data_dir={tmp_path / 'data'}", override]
    code, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, needle", [
    ("--optim.eps=nan", "optim.eps: must be a finite number"),
    ("--optim.lr=inf", "optim.lr: must be a finite number"),
    ("--optim.weight_decay=nan", "optim.weight_decay: must be a finite number"),
    ("--optim.grad_clip=nan", "optim.grad_clip: must be a finite number"),
    ("--optim.grad_clip=inf", "optim.grad_clip: must be a finite number"),
    ("--optim.betas=[0.9, nan]", "optim.betas: must be a finite number"),
    ("--train.seed=-1", "train.seed: must be in [0, 2**63)"),
    ("--model.block_size=1000000000000", "predicted peak"),
    ("--train.micro_batch_size=1000000000000", "predicted peak"),
    ("--model.n_embd=1048576", "predicted peak"),
])
def test_values_that_would_crash_later_are_one_error_line(tmp_path, capsys, data_dir, override, needle):
    """The attack list: each of these passed validation once and crashed the run later (some after
    writing config.toml, some in the allocator)."""
    out = tmp_path / "run"
    argv = [str(REPO / "configs" / "cpu_smoke.toml")] + tiny_overrides(data_dir, out) + [override]
    code, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not out.exists()


def test_a_stop_request_during_an_evaluation_is_honoured_within_a_batch(tiny_config, tmp_path):
    """SIGTERM while a long evaluation runs (schedulers kill ~30 s later): the evaluation stops at
    its next batch, unrecorded, and the run checkpoints the last completed step and says stopped."""
    trainer = Trainer(tiny_config({"train.eval_steps": 500, "train.eval_interval": 2, "train.max_steps": 10}),
                      log=quiet)
    forward = trainer.eval_model
    calls = []

    def evaluating(idx, targets=None):
        calls.append(trainer.step)
        if len(calls) == 3:
            trainer.stop_requested = True  # the signal handler's doing, during the step-2 evaluation
        return forward(idx, targets)

    trainer.eval_model = evaluating
    result = trainer.run()
    assert result.stopped and result.step == 2 and len(calls) == 3  # not 500 batches
    rows = [json.loads(line) for line in (trainer.run_dir.path / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "val_loss" in r]
    assert ckpt.latest_checkpoint(trainer.run_dir.path, healthy_only=True).name == "ckpt_00000002.pt"


def test_hellaswag_stops_between_batches_when_asked():
    from gptfast.hellaswag import Item, evaluate
    from gptfast.tokenizer import get_tokenizer

    items = [Item(context="A man is", endings=[" here", " there", " gone", " home"], label=0)] * 40
    seen = []

    def logits(ids):
        seen.append(ids.size(0))
        return torch.zeros(ids.size(0), ids.size(1), 50257)

    assert evaluate(logits, items, get_tokenizer(), 64, torch.device("cpu"), should_stop=lambda: len(seen) >= 2) is None
    assert len(seen) == 2
    assert evaluate(logits, items[:8], get_tokenizer(), 64, torch.device("cpu"))["items"] == 8
