"""`python -m gptfast.eval hellaswag RUN_DIR|CKPT|HF_DIR [--split val] [--limit N] [--input FILE]`:
downstream evaluation of a gptfast checkpoint (a run directory's newest, or one file) or of a
Hugging Face GPT-2 directory (config.json + model.safetensors), on any device.

Prints acc and acc_norm (see gptfast/hellaswag.py for the scoring) and, with --json, one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys

from gptfast.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("task", choices=["hellaswag"], help="the evaluation to run")
    parser.add_argument("source", help="a run directory, a ckpt_<step>.pt file, or a Hugging Face GPT-2 directory")
    parser.add_argument("--split", default="val", help="val (default), train or test")
    parser.add_argument("--limit", type=int, default=None, help="the first N items only (default: all)")
    parser.add_argument("--input", default=None, metavar="FILE",
                        help="the split's jsonl, read offline (default: download once into ~/.cache/gptfast)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=8, help="items per forward pass (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON line")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit < 1 or args.batch < 1:
        parser.error("--limit and --batch must be >= 1")

    def run():
        from gptfast import hellaswag
        from gptfast.device import resolve_device
        from gptfast.inference import autocast, load_any
        from gptfast.tokenizer import get_tokenizer

        device = resolve_device(args.device)
        items = hellaswag.read_items(hellaswag.data_file(args.split, args.input), args.limit)
        model, label, dtype = load_any(args.source, device)

        def logits(ids):
            with autocast(device, dtype):
                return model(ids)

        result = hellaswag.evaluate(logits, items, get_tokenizer(), model.config.block_size, device, args.batch)
        if args.json:
            print(json.dumps({"task": "hellaswag", "split": args.split, "source": label,
                              **{k: v for k, v in result.items() if k != "predictions"}}))
        else:
            print(f"hellaswag {args.split} ({result['items']} items) on {label}: acc {result['acc']:.4f}, "
                  f"acc_norm {result['acc_norm']:.4f}")

    return run_cli(run)


if __name__ == "__main__":
    sys.exit(main())
