"""DistributedDataParallel through torchrun: two CPU processes (gloo) against one."""

import json
import subprocess
import sys

import pytest

from conftest import KERNEL_TEST_OVERRIDES, REPO, tiny_overrides


def run(data_dir, out_dir, processes: int, **extra):
    values = {"train.max_steps": 6, "train.checkpoint_interval": 3, "train.grad_accum_steps": 4,
              "train.micro_batch_size": 2, "train.eval_interval": 3}
    values.update(extra)
    args = [str(REPO / "configs" / "cpu_smoke.toml"), *tiny_overrides(data_dir, out_dir, values)]
    launcher = [sys.executable, "-m", "gptfast.train"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
         "-m", "gptfast.train"]
    done = subprocess.run(launcher + args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def records(out_dir, key):
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


# at the small vocabulary and micro-batch of the trainer's kernel tests: interpreted kernels are slow
KERNELS_AND_RECOMPUTE = {"kernels.layernorm": True, "kernels.cross_entropy": True, "kernels.adamw": True,
                         "recompute.policy": '"selective"', **KERNEL_TEST_OVERRIDES}


MUON_WITH_KERNELS = dict(KERNELS_AND_RECOMPUTE, **{"optim.name": '"muon"'})
MODERN_MUON_WITH_KERNELS = dict(MUON_WITH_KERNELS, **{"model.arch": '"modern"'})
# the fused weights are left out of DDP and all-reduced by the trainer (gptfast.gradaccum)
FUSED_GRAD_ACCUM = {"kernels.fused_grad_accum": True}


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, KERNELS_AND_RECOMPUTE, MUON_WITH_KERNELS, MODERN_MUON_WITH_KERNELS,
                                   FUSED_GRAD_ACCUM, dict(MODERN_MUON_WITH_KERNELS, **FUSED_GRAD_ACCUM)],
                         ids=["pytorch", "kernels+recompute", "muon+kernels+recompute", "modern+muon+kernels+recompute",
                              "fused_grad_accum", "modern+muon+kernels+recompute+fused_grad_accum"])
def test_two_processes_follow_the_single_process_trajectory(data_dir, tmp_path, extra):
    run(data_dir, tmp_path / "one", 1, **extra)
    two = run(data_dir, tmp_path / "two", 2, **extra)
    assert "distributed: 2 processes (gloo), 2 micro-batches each per optimizer step" in two.stdout
    single, double = records(tmp_path / "one", "loss"), records(tmp_path / "two", "loss")
    assert [s for s, _ in double] == [1, 2, 3, 4, 5, 6]  # one record per step: rank 0 alone writes
    for (step, want), (_, got) in zip(single, double, strict=True):
        assert got == pytest.approx(want, rel=1e-5), step
    for (step, want), (step2, got) in zip(records(tmp_path / "one", "val_loss"), records(tmp_path / "two", "val_loss"), strict=True):
        assert step == step2 and got == pytest.approx(want, rel=1e-5)
    assert sorted(p.name for p in (tmp_path / "two").glob("ckpt_*.pt")) == ["ckpt_00000003.pt", "ckpt_00000006.pt"]


@pytest.mark.slow
def test_resumed_two_process_run_continues_the_trajectory(data_dir, tmp_path):
    run(data_dir, tmp_path / "straight", 2)
    run(data_dir, tmp_path / "resumed", 2, **{"train.max_steps": 3})
    resumed = run(data_dir, tmp_path / "resumed", 2)
    assert "resumed from" in resumed.stdout
    straight, resumed = records(tmp_path / "straight", "loss"), records(tmp_path / "resumed", "loss")
    assert [s for s, _ in resumed] == [s for s, _ in straight] == [1, 2, 3, 4, 5, 6]
    for (step, want), (_, got) in zip(straight, resumed, strict=True):
        assert got == pytest.approx(want, rel=1e-6), step


@pytest.mark.slow
def test_world_size_must_divide_accumulation(data_dir, tmp_path):
    values = {"train.grad_accum_steps": 3}
    args = [str(REPO / "configs" / "cpu_smoke.toml"), *tiny_overrides(data_dir, tmp_path / "run", values)]
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "gptfast.train", *args], capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "train.grad_accum_steps = 3 is not divisible by the 2 processes" in done.stderr
