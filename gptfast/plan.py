"""`python -m gptfast.plan CONFIG --budget 12GiB [--device "RTX 4070"] [--section.key=value ...]`: which
micro-batch and activation recomputation fit a GPU memory budget, predicted without a GPU; with
--device, each candidate's step time on that card from the step-cost model (an estimate), and the
fastest that fits chosen."""

from __future__ import annotations

import argparse
import sys

from gptfast.configfile import load_config
from gptfast.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.plan", description=__doc__)
    parser.add_argument("config", help="a training config (TOML)")
    parser.add_argument("--budget", required=True, help="GPU memory to plan for, e.g. 12GiB")
    parser.add_argument("--fp32", action="store_true", help="plan for float32 activations (CPU) instead of bf16")
    parser.add_argument("--device", metavar="CARD", help="time every candidate with the step-cost model for this card "
                        "(e.g. \"RTX 4070\": an estimate) and choose the fastest that fits")
    args, overrides = parser.parse_known_args(argv)

    def show():
        from gptfast.memory import budget_bytes, format_plan, plan  # after parsing: --help needs no torch
        cfg = load_config(args.config, overrides)
        if cfg.train.init_from:  # the model trained is init_from's, whatever [model] says
            import dataclasses

            from gptfast.hf import architecture_of

            model = architecture_of(cfg.train.init_from, cfg.model.dropout)
            cfg = dataclasses.replace(cfg, model=model)
            print(f"planning init_from {cfg.train.init_from!r}: {model.n_layer} layers, {model.n_head} heads, "
                  f"{model.n_embd} wide, context {model.block_size}")
        format_plan(plan(cfg, budget_bytes(args.budget, "--budget"), act_bytes=4 if args.fp32 else 2, card=args.device))

    return run_cli(show)


if __name__ == "__main__":
    sys.exit(main())
