"""`python -m gptfast.prepare RECIPE`: tokenise a corpus into data/<name>/{train,val}.bin."""

from __future__ import annotations

import argparse
import sys

from gptfast.datasets import DECODE_ERRORS, RECIPES
from gptfast.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptfast.prepare",
                                     description="Tokenise a corpus into DATA_DIR/<name>/{train,val}.bin.")
    parser.add_argument("recipe", choices=RECIPES + ("fineweb10b",),
                        help="stdlib: Python's own sources (offline); shakespeare: tiny-shakespeare "
                             "(download, or --input FILE); text: any local files or globs; fineweb10b: FineWeb "
                             "10B pre-tokenised with GPT-2's BPE (downloads shards of 100M tokens, no tokenising)")
    parser.add_argument("--name", help="dataset name, the config's data.dataset (default: the recipe)")
    parser.add_argument("--input", nargs="+", default=[], metavar="FILE_OR_GLOB",
                        help="files or globs to read ('**' recurses)")
    parser.add_argument("--data-dir", default="data", help="where datasets live (default: data)")
    parser.add_argument("--val-fraction", type=float, default=None,
                        help="share of documents (of tokens, for a single document) held out for val")
    parser.add_argument("--errors", choices=DECODE_ERRORS, default=None,
                        help="input that is not UTF-8: strict stops and names the file (default; stdlib: "
                             "replace), replace substitutes U+FFFD and counts the files")
    parser.add_argument("--shards", type=int, default=None,
                        help="fineweb10b: how many train shards (of 100M tokens) to fetch (default: all 103)")
    parser.add_argument("--force", action="store_true",
                        help="prepare again even when the dataset was already prepared from the same inputs")
    args = parser.parse_args(argv)
    from gptfast.datasets import prepare_recipe  # after parsing: no torch for --help
    from gptfast.fineweb import FINEWEB10B_TRAIN_SHARDS, prepare_fineweb10b

    if args.recipe == "fineweb10b":
        return run_cli(lambda: prepare_fineweb10b(args.data_dir, args.shards or FINEWEB10B_TRAIN_SHARDS,
                                                  name=args.name or "fineweb10b"))
    if args.shards is not None:
        parser.error("--shards applies to the fineweb10b recipe only")

    return run_cli(lambda: prepare_recipe(args.recipe, args.data_dir, name=args.name, inputs=args.input,
                                          val_fraction=args.val_fraction, errors=args.errors,
                                          force=args.force))


if __name__ == "__main__":
    sys.exit(main())
