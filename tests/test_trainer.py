import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, KERNEL_TEST_OVERRIDES, crash_at_step, tiny_overrides
from gptfast.train import main as train_main
from gptfast.trainer import Trainer


def quiet(_):
    pass


def records(out_dir, key="loss"):
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r[key]) for r in map(json.loads, lines) if key in r]


def test_metrics_and_checkpoints_of_a_short_run(tiny_config, tmp_path):
    trainer = Trainer(tiny_config(), log=quiet)
    result = trainer.run()
    out = tmp_path / "run"
    assert result.step == 6
    assert [s for s, _ in records(out)] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in records(out, "val_loss")] == [3, 6]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loss", "lr", "grad_norm", "tokens_per_second", "mfu", "peak_memory_bytes", "eta_seconds"} <= record.keys()
    assert record["mfu"] is None  # CPU: no peak to compare against, so no guessed MFU
    assert sorted(p.name for p in out.glob("ckpt_*.pt")) == ["ckpt_00000003.pt", "ckpt_00000006.pt"]
    assert (out / "config.toml").read_text().startswith("[model]")


MUON = {"optim.name": '"muon"', "optim.muon_lr": 0.02}
# at a small vocabulary: the interpreted loss kernel would otherwise walk 50304-wide rows
EVERY_KERNEL = {"kernels.layernorm": True, "kernels.cross_entropy": True, "kernels.adamw": True,
                "recompute.policy": '"selective"', **KERNEL_TEST_OVERRIDES}


MODERN = {"model.arch": '"modern"'}
FUSED_GRAD_ACCUM = {"kernels.fused_grad_accum": True}
FP8 = {"kernels.fp8": '"head+mlp"', "kernels.cross_entropy": True, **KERNEL_TEST_OVERRIDES}


@pytest.mark.parametrize("extra", [{"model.dropout": 0.0}, {"model.dropout": 0.1}, MUON, dict(MUON, **EVERY_KERNEL),
                                   dict(MODERN, **MUON), dict(MODERN, **MUON, **EVERY_KERNEL), FUSED_GRAD_ACCUM,
                                   dict(MODERN, **MUON, **FUSED_GRAD_ACCUM), FP8, dict(MODERN, **MUON, **FUSED_GRAD_ACCUM, **FP8)],
                         ids=["adamw", "adamw+dropout", "muon", "muon+kernels+recompute", "modern+muon",
                              "modern+muon+kernels+recompute", "adamw+fused_grad_accum", "modern+muon+fused_grad_accum",
                              "adamw+fp8", "modern+muon+fused_grad_accum+fp8"])
def test_interrupted_run_resumes_bit_exact(tiny_config, tmp_path, extra):
    straight = Trainer(tiny_config(extra, out_dir=tmp_path / "straight"), log=quiet)
    straight.run()

    crashing = Trainer(tiny_config(extra, out_dir=tmp_path / "resumed"), log=quiet)
    crash_at_step(crashing, 4)  # dies during step 5; the checkpoint on disk is step 3's
    resumed = Trainer(tiny_config(extra, out_dir=tmp_path / "resumed"), log=quiet)
    assert resumed.step == 3
    resumed.run()

    for key in ("loss", "grad_norm"):
        assert records(tmp_path / "resumed", key) == records(tmp_path / "straight", key)
    assert records(tmp_path / "resumed", "val_loss") == records(tmp_path / "straight", "val_loss")
    for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_training_lowers_the_loss(tiny_config):
    trainer = Trainer(tiny_config({"train.max_steps": 40, "optim.lr": 3e-3, "optim.lr_decay_steps": 40,
                                   "train.checkpoint_interval": 40, "train.eval_interval": 40}), log=quiet)
    first = trainer.evaluate()
    result = trainer.run()
    assert result.val_loss < first - 2.0


def test_resume_false_sets_the_previous_run_aside(tiny_config, tmp_path):
    Trainer(tiny_config(), log=quiet).run()
    fresh = Trainer(tiny_config({"train.resume": False}), log=quiet)
    assert fresh.step == 0
    assert sorted(p.name for p in (tmp_path / "run" / "old_1").iterdir()) == [
        "ckpt_00000003.pt", "ckpt_00000003.pt.sha256", "ckpt_00000006.pt", "ckpt_00000006.pt.sha256", "metrics.jsonl"]


def test_a_start_from_step_0_owns_a_fresh_metrics_file(tiny_config, tmp_path):
    """A run killed before its first checkpoint left metrics.jsonl with a torn last line: the rerun
    starts at step 0 with a metrics file of its own (the old one set aside), so its later resumes
    read a clean file."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n" + '{"step": 2, "lo')
    crashing = Trainer(tiny_config(), log=quiet)
    assert crashing.step == 0
    crash_at_step(crashing, 4)
    resumed = Trainer(tiny_config(), log=quiet)  # reads the metrics written since step 0
    assert resumed.step == 3
    resumed.run()
    assert [s for s, _ in records(run)] == [1, 2, 3, 4, 5, 6]
    assert (run / "old_1" / "metrics.jsonl").read_text().endswith('{"step": 2, "lo')


def test_a_bad_init_from_moves_nothing_and_leaves_no_lock(tiny_config, tmp_path, capsys, data_dir):
    """--train.resume=false with an init_from whose weights are missing: exit 2 in one line, the
    previous run's files where they were, and the directory free for the next trainer."""
    from gptfast import hf
    from gptfast.config import ModelConfig

    Trainer(tiny_config(), log=quiet).run()
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(hf.hf_config_of(ModelConfig(n_layer=2, n_head=2, n_embd=32,
                                                                                block_size=32))))
    argv = [str(REPO / "configs" / "cpu_smoke.toml"), *tiny_overrides(data_dir, tmp_path / "run"), "--train.resume=false",
            f'--train.init_from="{folder}"']
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_error_line(err, "neither model.safetensors nor pytorch_model.bin")
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert Trainer(tiny_config(), log=quiet).step == 6  # the lock was released; the run resumes as before


def test_a_run_that_fails_before_it_starts_leaves_no_directory(tiny_config, tmp_path, monkeypatch):
    from gptfast import trainer as trainer_module

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer_module, "build_scheduled_optimizer", broken)
    with pytest.raises(RuntimeError, match="boom"):
        Trainer(tiny_config(out_dir=tmp_path / "new"), log=quiet)
    assert not (tmp_path / "new").exists()


def test_the_end_of_run_sample_is_kept_in_the_run_directory(tiny_config, tmp_path):
    result = Trainer(tiny_config({"train.sample_tokens": 8}), log=quiet).run()
    kept = (tmp_path / "run" / "sample_00000006.txt").read_text()
    assert kept == result.sample and kept
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows if r.get("event") == "sample"] == [kept]


def run_cli(argv, capsys):
    code = train_main(argv)
    return code, capsys.readouterr().err


def assert_one_error_line(err: str, *needles: str):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)


def test_cli_bad_config_key(tmp_path, capsys, data_dir):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nmax_step = 3\n")
    code, err = run_cli([str(path)] + tiny_overrides(data_dir, tmp_path / "run")[:-2], capsys)
    assert code == 2
    assert_one_error_line(err, "bad.toml", "train.max_step", "did you mean 'max_steps'")
    assert not (tmp_path / "run").exists()


def test_cli_missing_dataset(tmp_path, capsys, data_dir):
    argv = [str(REPO / "configs" / "cpu_smoke.toml")] + tiny_overrides(data_dir, tmp_path / "run",
                                                                      {"data.dataset": '"nowhere"'})
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_error_line(err, "dataset 'nowhere' is not prepared", "python -m gptfast.prepare")
    assert not (tmp_path / "run").exists()


def test_cli_unwritable_out_dir(tmp_path, capsys, data_dir):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    argv = [str(REPO / "configs" / "cpu_smoke.toml")] + tiny_overrides(data_dir, blocker / "run")
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_error_line(err, "train.out_dir", "cannot be written")


def test_cli_unreadable_checkpoint(tmp_path, capsys, data_dir):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt_00000003.pt").write_bytes(b"\x00garbage")
    argv = [str(REPO / "configs" / "cpu_smoke.toml")] + tiny_overrides(data_dir, out)
    code, err = run_cli(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: no readable checkpoint") and "ckpt_00000003.pt" in lines[-1]
    assert not (out / "config.toml").exists() and not (out / "metrics.jsonl").exists()


def test_cli_checkpoint_of_another_model(tmp_path, capsys, data_dir):
    argv = [str(REPO / "configs" / "cpu_smoke.toml")] + tiny_overrides(data_dir, tmp_path / "run")
    assert train_main(argv) == 0
    capsys.readouterr()
    code, err = run_cli(argv + ["--model.n_layer=3"], capsys)
    assert code == 2
    assert_one_error_line(err, "different model", "n_layer: checkpoint 2, config 3")


def test_cli_cuda_config_without_cuda(tmp_path, capsys, data_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [str(REPO / "configs" / "small_4070.toml"), f"--train.out_dir={tmp_path / 'run'}"]
    code, err = run_cli(argv, capsys)
    assert code == 2
    assert_one_error_line(err, "no CUDA device", "configs/cpu_smoke.toml", "--train.device=cpu")


def test_every_problem_before_the_start_is_said_at_once(tmp_path, capsys, monkeypatch):
    """No CUDA device, a memory budget nothing fits and a dataset that is not there: three lines,
    one per problem, in one try; nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    argv = [str(REPO / "configs" / "small_4070.toml"), f"--train.out_dir={tmp_path / 'run'}",
            "--train.memory_budget=100MiB", "--data.dataset=mine", f"--data.data_dir={tmp_path / 'data'}"]
    code, err = run_cli(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 3 and all(line.startswith("error: ") for line in lines), err
    assert "no CUDA device" in lines[0] and "memory budget 100.0 MiB" in lines[1]
    assert "dataset 'mine' is not prepared" in lines[2]
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()
    code, err = run_cli(argv[:2] + ["--data.dataset=mine", f"--data.data_dir={tmp_path / 'data'}"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 2, err


def test_cli_usage(capsys):
    assert train_main([]) == 2
    assert train_main(["--train.max_steps=3"]) == 2
    assert "config path comes first" in capsys.readouterr().err
    assert train_main(["--help"]) == 0


@pytest.mark.slow
def test_cpu_smoke_end_to_end(tmp_path):
    """The shipped smoke config, shortened: prepares the stdlib corpus, trains, resumes, samples."""
    out, data = tmp_path / "out", tmp_path / "data"
    cmd = [sys.executable, "-m", "gptfast.train", str(REPO / "configs" / "cpu_smoke.toml"),
           "--train.max_steps=40", f"--train.out_dir={out}", f"--data.data_dir={data}",
           "--train.checkpoint_interval=20", "--train.eval_interval=20"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "preparing dataset 'stdlib'" in run.stdout and "sample (48 tokens, kept in" in run.stdout
    losses = [loss for _, loss in records(out)]
    assert losses[0] > losses[-1] + 2.0, losses  # from ~10.8 at init, visibly falling
    again = subprocess.run(cmd[:4] + ["--train.max_steps=50"] + cmd[5:], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"resumed from {out / 'ckpt_00000040.pt'} at step 40" in again.stdout
    assert [s for s, _ in records(out)][-1] == 50
    sample = subprocess.run([sys.executable, "-m", "gptfast.sample", str(out), "--prompt", "def main(",
                             "--max-new-tokens", "12", "--seed", "7"], capture_output=True, text=True, timeout=300)
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("def main(") and len(sample.stdout) > len("def main(")
    repeat = subprocess.run(sample.args, capture_output=True, text=True, timeout=300)
    assert repeat.stdout == sample.stdout  # seeded sampling is reproducible


def test_a_modern_run_samples_and_evaluates_but_does_not_export(tiny_config, tmp_path, capsys):
    """A modern-architecture checkpoint runs in gptfast.sample (rotary positions in the KV cache)
    and gptfast.eval; export refuses it in one line, writing nothing, and names what works instead."""
    from gptfast.eval import main as eval_main
    from gptfast.export import main as export_main
    from gptfast.sample import main as sample_main

    Trainer(tiny_config(dict(MODERN, **MUON)), log=quiet).run()
    run_dir = tmp_path / "run"
    capsys.readouterr()
    assert sample_main([str(run_dir), "--prompt", "def main(", "--max-new-tokens", "8", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith("def main(")
    items = tmp_path / "hellaswag_val.jsonl"
    items.write_text("".join(json.dumps({"ind": i, "ctx": ctx, "label": 1, "endings": ["a.", "b c.", "d e f.", "g."]})
                             + "\n" for i, ctx in enumerate(["The parser reads", "An email message has"])))
    assert eval_main(["hellaswag", str(run_dir), "--input", str(items), "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["items"] == 2
    assert export_main([str(run_dir), str(tmp_path / "exported")]) == 2
    assert_one_error_line(capsys.readouterr().err, "model.arch = 'modern'", "gptfast.sample", "gptfast.eval")
    assert not (tmp_path / "exported").exists()


def test_sample_cli_bad_checkpoint(tmp_path, capsys):
    from gptfast.sample import main as sample_main

    assert sample_main([str(tmp_path / "nothing_here.pt")]) == 2
    assert_one_error_line(capsys.readouterr().err, "does not exist")
    assert sample_main([str(tmp_path)]) == 2
    assert_one_error_line(capsys.readouterr().err, "holds no checkpoint")


def test_golden_trajectory_with_fused_kernels(tiny_config, tmp_path):
    """llm.c's check: training steps with the kernels on track the PyTorch path's losses (fp32)."""
    off = Trainer(tiny_config(KERNEL_TEST_OVERRIDES, out_dir=tmp_path / "off"), log=quiet)
    off.run()
    on = Trainer(tiny_config({"kernels.layernorm": True, "kernels.cross_entropy": True, "kernels.adamw": True,
                              **KERNEL_TEST_OVERRIDES}, out_dir=tmp_path / "on"), log=quiet)
    on.run()
    # Gradient norms get a looser bound than losses: torch's fp32 norm of a large gradient is itself
    # off by ~1e-6 relative (FusedAdamW's is within 1e-7 of fp64, see test_adamw), and the clip
    # coefficient carries that difference into the next steps.
    for key, rel in (("loss", 1e-5), ("grad_norm", 1e-4)):
        for (step, want), (_, got) in zip(records(tmp_path / "off", key), records(tmp_path / "on", key), strict=True):
            assert got == pytest.approx(want, rel=rel, abs=1e-6), (key, step)


@pytest.mark.parametrize("fused_loss,fused_grad_accum", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["pytorch", "fused_loss", "fused_grad_accum", "fused_loss+fused_grad_accum"])
def test_accumulation_equals_one_large_batch(tiny_config, fused_loss, fused_grad_accum):
    """k micro-batches of b give the loss, gradients and gradient norm of one batch of k*b (fp32).
    Mutant caught: dropping the `/ local_steps` scaling in Trainer.train_step (gradients k times
    too large, loss the sum instead of the mean). With the fused loss the trainer promises it the
    upstream gradient 1/3, which the kernel then applies itself."""
    import copy

    trainer = Trainer(tiny_config({"train.grad_accum_steps": 3, "train.micro_batch_size": 2, "optim.grad_clip": 0.0,
                                   "kernels.cross_entropy": fused_loss,
                                   "kernels.fused_grad_accum": fused_grad_accum}), log=quiet)
    reference = copy.deepcopy(trainer.model)  # the weights before the step
    for module in reference.modules():  # the reference differentiates through autograd alone
        module.main_grad = None
    captured = {}
    apply_update = trainer.optimizer.step

    def capture_then_apply():
        captured["grads"] = [p.grad.clone() for p in trainer.model.parameters()]
        apply_update()

    trainer.optimizer.step = capture_then_apply
    loss, grad_norm, verdict = trainer.train_step()
    trainer.close()
    assert verdict.healthy and "grads" in captured
    xs, ys = zip(*(trainer.loader.batch("train", 0, i) for i in range(3)), strict=True)
    want_loss = reference(torch.cat(xs), torch.cat(ys))  # one batch of 6 sequences
    want_grads = torch.autograd.grad(want_loss, list(reference.parameters()))
    torch.testing.assert_close(loss, want_loss.detach(), rtol=1e-6, atol=1e-6)
    for got, want in zip(captured["grads"], want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad_norm, torch.linalg.vector_norm(torch.stack([g.norm() for g in want_grads])),
                               rtol=1e-5, atol=0)
