"""The data loader's window sampling: one token file against the same tokens in shards of the public
pre-tokenised format (256 x int32 header, uint16 tokens), the way `prepare fineweb10b` leaves them.
One timed call draws one micro-batch (16 windows of 1024 + 1 tokens) onto the CPU; the shard
dataset must cost no more than the single file (the target: as fast as from one file).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from bench.common import Row, time_calls
from gptfast.loader import SHARD_MAGIC, TokenLoader

TOKENS = 30_000_000
SHARDS = 8


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    tokens = np.random.default_rng(0).integers(0, 50257, TOKENS, dtype=np.uint16)
    single = root / "single"
    single.mkdir()
    tokens.tofile(single / "train.bin")
    tokens[:100_000].tofile(single / "val.bin")
    sharded = root / "sharded"
    sharded.mkdir()
    names = {"train": [f"train_{i:06d}.bin" for i in range(SHARDS)], "val": ["val_000000.bin"]}
    parts = np.array_split(tokens, SHARDS)
    for name, part in zip(names["train"] + names["val"], parts + [tokens[:100_000]], strict=True):
        header = np.zeros(256, dtype="<i4")
        header[:3] = (SHARD_MAGIC, 1, len(part))
        with open(sharded / name, "wb") as f:
            f.write(header.tobytes())
            f.write(part.tobytes())
    (sharded / "meta.json").write_text(json.dumps({"name": "sharded", "shards": names}))
    return {"one file": single, f"{SHARDS} shards": sharded}


@pytest.mark.parametrize("layout", ["one file", f"{SHARDS} shards"])
def test_window_sampling(benchmark, record, datasets, layout):
    loader = TokenLoader(datasets[layout], 50257, 1024, 16, 1337, torch.device("cpu"))
    step = iter(range(10**9))
    seconds = time_calls(benchmark, lambda i: loader.batch("train", next(step)), torch.device("cpu"), 1,
                         target_round_s=0.05)
    record(Row("loader", f"16 x 1025-token windows from {TOKENS / 1e6:.0f}M tokens", layout, seconds,
               extra={"windows/s": f"{16 / seconds:,.0f}"}))
    loader.close()
