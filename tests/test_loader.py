"""Reading prepared datasets (gptfast/loader.py): token files, meta.json, the loader's windows."""

import numpy as np
import pytest
import torch

from gptfast.errors import DataError
from gptfast.loader import TokenLoader


def read_tokens(path):
    return np.fromfile(path, dtype="<u2")


def make_loader(folder, block_size=16, batch_size=3, seed=0):
    return TokenLoader(folder, 50257, block_size, batch_size, seed, torch.device("cpu"))


def test_loader_windows_are_shifted_slices(data_dir):
    loader = make_loader(data_dir / "small")
    tokens = read_tokens(data_dir / "small" / "train.bin").astype(np.int64)
    x, y = loader.batch("train", step=5, micro_step=1)
    assert x.shape == y.shape == (3, 16) and x.dtype == torch.int64
    torch.testing.assert_close(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        starts = np.flatnonzero(np.lib.stride_tricks.sliding_window_view(tokens, 16).__eq__(row_x).all(1))
        assert len(starts) >= 1 and any(np.array_equal(tokens[s + 1:s + 17], row_y) for s in starts)


def test_loader_is_a_function_of_seed_and_step(data_dir):
    a, b = make_loader(data_dir / "small"), make_loader(data_dir / "small")
    torch.testing.assert_close(a.batch("train", 7, 0), b.batch("train", 7, 0))
    assert not torch.equal(a.batch("train", 7, 0)[0], a.batch("train", 8, 0)[0])
    assert not torch.equal(a.batch("train", 7, 0)[0], a.batch("train", 7, 1)[0])
    assert not torch.equal(a.batch("train", 7, 0)[0], make_loader(data_dir / "small", seed=1).batch("train", 7, 0)[0])


def test_odd_byte_count_is_rejected(tmp_path, data_dir):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "train.bin").write_bytes(b"\x01\x00\x02")
    (folder / "val.bin").write_bytes(b"\x01\x00")
    with pytest.raises(DataError, match="odd count"):
        make_loader(folder)


def test_token_past_vocab_is_rejected(tmp_path):
    folder = tmp_path / "big"
    folder.mkdir()
    ids = np.arange(100, dtype="<u2")
    ids[57] = 60000
    ids.tofile(folder / "train.bin")
    np.arange(100, dtype="<u2").tofile(folder / "val.bin")
    with pytest.raises(DataError, match="id 60000 at position 57"):
        make_loader(folder)


def test_block_size_longer_than_split(data_dir):
    with pytest.raises(DataError, match="fewer than block_size"):
        make_loader(data_dir / "small", block_size=10_000_000)


@pytest.mark.parametrize("meta, needle", [
    ("{not json", "is not readable JSON"),
    ("[1, 2]", "must hold a JSON object"),
    ('{"dtype": "int32"}', "gptfast reads uint16"),
    ('{"train_tokens": 5}', "records 5 train tokens"),
])
def test_a_malformed_meta_json_is_refused(data_dir, tmp_path, meta, needle):
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(data_dir / "small", folder)
    (folder / "meta.json").write_text(meta)
    with pytest.raises(DataError, match=needle):
        make_loader(folder)


@pytest.mark.parametrize("shards, problem", [
    ({"train": ["../outside.bin"], "val": ["v.bin"]}, "'../outside.bin' is not a file name inside the dataset folder"),
    ({"train": ["/etc/passwd"], "val": ["v.bin"]}, "'/etc/passwd' is not a file name"),
    ({"train": [7], "val": ["v.bin"]}, "shard 7 is not a file name"),
    ({"train": "t.bin", "val": ["v.bin"]}, '"shards" must be'),
    (["t.bin"], '"shards" must be'),
])
def test_meta_json_shard_names_stay_inside_the_dataset_and_are_typed(tmp_path, shards, problem):
    import json

    folder = tmp_path / "d"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    (folder / "meta.json").write_text(json.dumps({"shards": shards}))
    with pytest.raises(DataError, match=problem.replace("(", r"\(").replace("/", "/")):
        make_loader(folder)
