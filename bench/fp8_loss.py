"""FP8 against bf16 over a short training run on the CPU: does kernels.fp8 keep the loss?

Protocol: bench_time_to_loss.py's model, corpus and GPT-2 + AdamW recipe at its chosen rate
(4 layers, 128 wide, context 64, 8 sequences a step, 240 steps, cosine schedule, lr 1e-3), trained
in bf16 autocast with kernels.fp8 = "off" and with "head+mlp" (the MLP's Linears and the tied head
through FP8 matmuls), three seeds each. The casts are gptfast.fp8.reference_to_fp8, which the
suite holds bitwise equal to the Triton casts (tests/test_fp8.py, and on a GPU tests/test_gpu.py):
the same numbers, without the interpreter's hours. Verdict: FP8's
mean final val loss lies within bf16's seed spread (its minimum to its maximum), and each FP8
seed's loss is within that spread widened by half of it.

    python -m bench.fp8_loss                # the protocol (about 25 minutes on a busy 2-core CPU)
    python -m bench.fp8_loss --steps 20     # a rehearsal

Writes bench/results/fp8-loss_cpu_<time>.json: every run's final val loss and curve, the spread,
the verdict, the commit and versions. Not part of the test suite (too long); its figure is
evidence, kept in the repository.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import sysconfig
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # kernels/ imports on a machine without a GPU

import torch  # noqa: E402

from bench.bench_time_to_loss import PACKAGES, overrides  # noqa: E402
from bench.common import RESULTS_DIR, git_sha  # noqa: E402
from gptfast import fp8 as fp8_module  # noqa: E402
from gptfast.configfile import load_config  # noqa: E402
from gptfast.datasets import prepare_recipe  # noqa: E402
from gptfast.trainer import Trainer  # noqa: E402

LR = 1e-3  # bench_time_to_loss's chosen AdamW rate (bench/results/time-to-loss_cpu_20261201-205011.json)
MODES = ("off", "head+mlp")


def reference_cast(t: torch.Tensor, dtype: torch.dtype, transpose: bool = False):
    """kernels.fp8.to_fp8's result from the PyTorch reference (bitwise the same, tested)."""
    t8, inverse = fp8_module.reference_to_fp8(t, dtype)
    return t8, t8.t().contiguous() if transpose else None, inverse


def corpus(folder: Path) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for package in PACKAGES for p in (root / package).rglob("*.py"))
    prepare_recipe("text", folder, name="corpus", inputs=files, val_fraction=0.01, log=lambda _: None)
    return folder


def train(data: Path, out: Path, steps: int, mode: str, seed: int) -> tuple[float, list, float]:
    protocol = {"steps": steps, "eval_interval": max(1, steps // 12)}
    args = overrides(data, out, protocol, "adamw", LR, LR, seed) + [
        '--train.dtype="bfloat16"', f'--kernels.fp8="{mode}"']
    result = Trainer(load_config(None, args), log=lambda _: None).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return result.val_loss, [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r], \
        result.summary["wall_seconds"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))
    fp8_module._cast = reference_cast  # the FP8 Linears' casts (the head is an FP8 Linear here)
    runs: dict = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        data = corpus(Path(tmp) / "data")
        for seed in range(args.seeds):
            for mode in MODES:
                final, curve, wall = train(data, Path(tmp) / f"{mode}-{seed}", args.steps, mode, seed)
                runs[mode].append({"seed": seed, "final": final, "curve": curve, "wall_seconds": wall})
                print(f"fp8={mode} seed {seed}: final val loss {final:.4f} ({wall:.0f} s)", flush=True)
    bf16 = [r["final"] for r in runs["off"]]
    fp8 = [r["final"] for r in runs["head+mlp"]]
    low, high = min(bf16), max(bf16)
    margin = (high - low) / 2
    summary = {
        "protocol": {"steps": args.steps, "seeds": args.seeds, "lr": LR, "recipe": "gpt2 + adamw, bf16 autocast",
                     "model": "4 layers, 4 heads, 128 wide, context 64, 8 sequences a step"},
        "device": "cpu (the FP8 casts by their PyTorch reference)", "torch": torch.__version__, "commit": git_sha(),
        "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "final_val_loss": {"bf16": bf16, "fp8 head+mlp": fp8},
        "bf16_spread": [low, high], "fp8_mean": statistics.mean(fp8), "bf16_mean": statistics.mean(bf16),
        "fp8_mean_within_bf16_spread": low <= statistics.mean(fp8) <= high,
        "every_fp8_seed_within_widened_spread": all(low - margin <= f <= high + margin for f in fp8),
        "runs": runs,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"fp8-loss_cpu_{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}.json"
    tmp_path = path.with_suffix(".json.tmp")
    tmp_path.write_text(json.dumps(summary, indent=2) + "\n")
    tmp_path.replace(path)
    print(f"bf16 {low:.4f}..{high:.4f} (mean {summary['bf16_mean']:.4f}); fp8 mean {summary['fp8_mean']:.4f}: "
          f"{'within' if summary['fp8_mean_within_bf16_spread'] else 'OUTSIDE'} bf16's spread; {path}")
    return 0 if summary["fp8_mean_within_bf16_spread"] else 1


if __name__ == "__main__":
    sys.exit(main())
