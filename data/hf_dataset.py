"""Prepare a Hugging Face text dataset (needs the network and `pip install datasets`).

    python data/hf_dataset.py fineweb       # FineWeb sample-10BT: ~10B tokens, ~20 GB on disk
    python data/hf_dataset.py openwebtext   # OpenWebText: ~9B tokens, ~18 GB on disk

The corpus is streamed and tokenised in batches, so it never has to fit in memory; the token files
land in data/<name>/ like every other recipe's.
"""

from __future__ import annotations

import argparse
import sys

from gptfast.datasets import Document, prepare_dataset
from gptfast.errors import run_cli

SOURCES = {
    # name: (hub path, hub config, split, documents in the split)
    "fineweb": ("HuggingFaceFW/fineweb", "sample-10BT", "train", 14_868_862),
    "openwebtext": ("Skylion007/openwebtext", None, "train", 8_013_769),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", choices=SOURCES)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--val-fraction", type=float, default=0.0005)
    args = parser.parse_args(argv)
    try:
        import datasets
    except ImportError:
        print("error: this recipe needs the `datasets` package: pip install datasets", file=sys.stderr)
        return 2
    path, config, split, total = SOURCES[args.source]
    stream = datasets.load_dataset(path, name=config, split=split, streaming=True)
    documents = (Document(f"{args.source}/{i}", row["text"]) for i, row in enumerate(stream))
    return run_cli(lambda: prepare_dataset(args.source, documents, args.data_dir, recipe=args.source,
                                           total=total, val_fraction=args.val_fraction))


if __name__ == "__main__":
    sys.exit(main())
