"""Tokens to a val loss: GPT-2 + AdamW (the baseline) against GPT-2 + Muon and the modern
architecture + Muon, on a small model: the measure that matters to a user who wants a model of some
quality sooner, not tokens/s.

Protocol (written down so it can be repeated and argued with):
1. Corpus: a slice of Python's standard library sources (real text, offline, the same on every
   machine with the same Python), GPT-2 BPE; val is 1% of the documents.
2. Model: 4 layers, 4 heads, 128 wide, context 64; 8 sequences per step (512 tokens), a run of
   STEPS steps, warmup 10%, each optimizer with its own schedule (AdamW: cosine; Muon:
   warmup-stable-decay as its records use). Recipes (RECIPES): "adamw" and "muon" train GPT-2's
   architecture; "modern" trains model.arch = "modern" (rotary, RMSNorm and QK-norm, ReLU^2,
   untied zero-initialised head and projections, soft cap 30) with Muon.
3. Tuning, honestly for each: each recipe's learning rate is chosen from a small sweep
   (FULL["sweep"] below) by the final val loss of seed 0. "adamw" sweeps its rate; "muon" sweeps
   muon_lr, its AdamW part (embeddings, tied head, gains, biases) at AdamW's best rate; "modern"
   keeps muon's best muon_lr and sweeps the rate of its AdamW part, which now holds an untied,
   zero-initialised head and an embedding no longer shared with it.
4. Then SEEDS seeds each at the chosen rates. The target is AdamW's mean final val loss; for
   each seed of the other recipes, the tokens at its first evaluation at or below it. Reported:
   a recipe's tokens to the target / AdamW's tokens (all of its run), mean and spread over seeds.

By default (`--time-to-loss=quick`) everything shrinks to a few steps and one seed, so the
harness's command stays short; the protocol itself is opt-in: `--time-to-loss=full`.
Results: a row per optimizer in the usual results files, and `time-to-loss_<device>_<time>.json`
(kept in the repository: the CPU figures are evidence, unlike CPU timings).
"""

from __future__ import annotations

import datetime
import json
import statistics
import sysconfig
from dataclasses import asdict
from pathlib import Path

import pytest

from bench.common import RESULTS_DIR, Row, slug
from gptfast.configfile import load_config
from gptfast.datasets import prepare_recipe
from gptfast.trainer import Trainer

# recipe -> (model.arch, optim.name)
RECIPES = {"adamw": ("gpt2", "adamw"), "muon": ("gpt2", "muon"), "modern": ("modern", "muon")}
FULL = {"steps": 240, "eval_interval": 20, "seeds": [0, 1, 2],
        "sweep": {"adamw": [3e-4, 1e-3, 3e-3], "muon": [0.0025, 0.005, 0.01, 0.02],
                  "modern": [1e-3, 3e-3, 1e-2, 3e-2]}}
QUICK = {"steps": 6, "eval_interval": 3, "seeds": [0], "sweep": {"adamw": [3e-3], "muon": [0.02], "modern": [3e-3]}}
PACKAGES = ("json", "email", "asyncio", "unittest", "logging", "http")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for package in PACKAGES for p in (root / package).rglob("*.py"))
    data = tmp_path_factory.mktemp("time_to_loss_data")
    prepare_recipe("text", data, name="corpus", inputs=files, val_fraction=0.01, log=lambda _: None)
    return data


def rates(recipe: str, lr: float, best: dict) -> tuple[float, float]:
    """(muon_lr, AdamW's lr) of a run of `recipe` at swept rate `lr`, given the best rates so far."""
    if recipe == "adamw":
        return lr, lr  # muon_lr unused
    if recipe == "muon":
        return lr, best["adamw"]
    return best["muon"], lr


def overrides(data: Path, out: Path, protocol: dict, recipe: str, lr: float, adamw_lr: float, seed: int):
    """`lr`: muon_lr (unused by adamw); `adamw_lr`: optim.lr."""
    steps = protocol["steps"]
    arch, optimizer = RECIPES[recipe]
    values = {
        "model.arch": f'"{arch}"', "model.n_layer": 4, "model.n_head": 4, "model.n_embd": 128, "model.block_size": 64,
        "data.dataset": '"corpus"', "data.data_dir": f'"{data}"',
        "optim.name": f'"{optimizer}"', "optim.lr": adamw_lr, "optim.min_lr": adamw_lr / 10,
        "optim.warmup_steps": max(1, steps // 10), "optim.lr_decay_steps": 0,
        "optim.schedule": '"wsd"' if optimizer == "muon" else '"cosine"', "optim.muon_lr": lr,
        "train.micro_batch_size": 8, "train.grad_accum_steps": 1, "train.max_steps": steps,
        "train.eval_interval": protocol["eval_interval"], "train.eval_steps": 16, "train.log_interval": steps,
        "train.checkpoint_interval": steps, "train.out_dir": f'"{out}"', "train.device": '"cpu"',
        "train.dtype": '"float32"', "train.sample_tokens": 0, "train.seed": seed, "train.resume": "false",
    }
    return [f"--{k}={v}" for k, v in values.items()]


def train(data: Path, out: Path, protocol: dict, recipe: str, lr: float, adamw_lr: float, seed: int):
    """(final val loss, [(tokens, val loss)] at each evaluation, wall seconds)."""
    cfg = load_config(None, overrides(data, out, protocol, recipe, lr, adamw_lr, seed))
    result = Trainer(cfg, log=lambda _: None).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    curve = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    return result.val_loss, curve, result.summary["wall_seconds"]


def tokens_to(curve: list[tuple[int, float]], target: float) -> int | None:
    return next((tokens for tokens, loss in curve if loss <= target), None)


def test_recipes_tokens_to_loss(benchmark, record, request, device, device_info, corpus, tmp_path):
    mode = request.config.getoption("--time-to-loss")
    protocol = QUICK if mode == "quick" else FULL
    runs: dict = {"sweep": {}, "seeds": {}}

    def experiment():
        best = {}
        for recipe in RECIPES:  # in order: each recipe's sweep uses the best rates of those before it
            for lr in protocol["sweep"][recipe]:
                final, _, _ = train(corpus, tmp_path / f"sweep-{recipe}-{lr}", protocol, recipe, *rates(recipe, lr, best), 0)
                runs["sweep"][f"{recipe} lr={lr}"] = final
            candidates = {lr: runs["sweep"][f"{recipe} lr={lr}"] for lr in protocol["sweep"][recipe]}
            best[recipe] = min(candidates, key=candidates.get)
        for recipe in RECIPES:
            for seed in protocol["seeds"]:
                final, curve, wall = train(corpus, tmp_path / f"{recipe}-{seed}", protocol, recipe,
                                           *rates(recipe, best[recipe], best), seed)
                runs["seeds"].setdefault(recipe, []).append({"seed": seed, "final": final, "curve": curve,
                                                              "wall_seconds": wall})
        runs["best"] = best

    benchmark.pedantic(experiment, rounds=1, iterations=1)
    adamw = runs["seeds"]["adamw"]
    target = statistics.mean(r["final"] for r in adamw)
    adamw_tokens = adamw[0]["curve"][-1][0]
    ratios = {recipe: [(tokens_to(r["curve"], target) or float("inf")) / adamw_tokens for r in runs["seeds"][recipe]]
              for recipe in RECIPES if recipe != "adamw"}
    summary = {
        "protocol": {k: v for k, v in protocol.items()}, "recipes": {k: list(v) for k, v in RECIPES.items()},
        "best_lr": runs["best"], "sweep_final_val_loss": runs["sweep"],
        # a best rate at either end of its sweep is not bracketed: the sweep should be widened
        "best_lr_at_sweep_edge": [recipe for recipe, lr in runs["best"].items()
                                  if len(protocol["sweep"][recipe]) > 1 and lr in (min(protocol["sweep"][recipe]),
                                                                                   max(protocol["sweep"][recipe]))],
        "target_val_loss": target, "adamw_tokens": adamw_tokens,
        "final_val_loss": {recipe: [r["final"] for r in seeds] for recipe, seeds in runs["seeds"].items()},
        "tokens_to_target": {recipe: [tokens_to(r["curve"], target) for r in runs["seeds"][recipe]] for recipe in ratios},
        "tokens_over_adamw": ratios, "mean_ratio": {recipe: statistics.mean(r) for recipe, r in ratios.items()},
        "curves": {k: [r["curve"] for r in v] for k, v in runs["seeds"].items()},
    }
    case = f"4L 128w T64, {protocol['steps']} steps x 512 tokens, {len(protocol['seeds'])} seeds, CPU fp32"
    for name, seeds in runs["seeds"].items():
        extra = {"recipe": "/".join(RECIPES[name]), "best lr": runs["best"][name],
                 "final val loss": round(statistics.mean(r["final"] for r in seeds), 4)}
        if name in ratios:
            r = ratios[name]
            extra["tokens to AdamW's final loss / AdamW's"] = f"{statistics.mean(r):.2f} (min {min(r):.2f}, max {max(r):.2f})"
        record(Row("time_to_loss", case, name, statistics.mean(r["wall_seconds"] for r in seeds), extra=extra))
    benchmark.extra_info.update(mean_ratio=summary["mean_ratio"], target=target)
    if mode != "quick":
        when = datetime.datetime.now(datetime.timezone.utc)
        name = device_info.name if device_info.kind == "cuda" else "cpu"
        path = RESULTS_DIR / f"time-to-loss_{slug(name)}_{when.strftime('%Y%m%d-%H%M%S')}.json"
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"device": asdict(device_info), "utc": when.isoformat(), **summary}, indent=2))
