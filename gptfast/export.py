"""`python -m gptfast.export CKPT_OR_OUT_DIR OUT_DIR`: write a gptfast checkpoint as a Hugging Face
GPT-2 directory (config.json + model.safetensors) that `GPT2LMHeadModel.from_pretrained` loads."""

from __future__ import annotations

import argparse
import sys

from gptfast.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.export", description=__doc__)
    parser.add_argument("checkpoint", help="a ckpt_<step>.pt file, or a run directory (its newest checkpoint)")
    parser.add_argument("out_dir", help="directory to write config.json and model.safetensors into")
    parser.add_argument("--force", action="store_true", help="replace an existing export in out_dir")
    args = parser.parse_args(argv)

    def export():
        from gptfast.checkpoint import load_checkpoint  # after parsing: --help needs no torch
        from gptfast.configfile import config_from_dict
        from gptfast.hf import export_hf

        state = load_checkpoint(args.checkpoint)
        cfg = config_from_dict(state["config"], f"{state['path']} (config)")
        out = export_hf(state["model"], cfg.model, args.out_dir, force=args.force)
        print(f"exported {state['path']} (step {state['step']}) to {out}")

    return run_cli(export)


if __name__ == "__main__":
    sys.exit(main())
