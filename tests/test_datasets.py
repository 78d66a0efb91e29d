import json

import numpy as np
import pytest

from conftest import small_corpus_files
from gptfast.config import DataConfig
from gptfast.datasets import ensure_prepared, prepare_recipe
from gptfast.tokenizer import get_tokenizer
from gptfast.errors import DataError


def read_tokens(path):
    return np.fromfile(path, dtype="<u2")


def test_single_document_round_trip(tmp_path):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 50
    src = tmp_path / "play.txt"
    src.write_text(text)
    folder = prepare_recipe("text", tmp_path / "data", name="play", inputs=[str(src)], log=lambda _: None)
    enc = get_tokenizer()
    train, val = read_tokens(folder / "train.bin"), read_tokens(folder / "val.bin")
    tokens = np.concatenate([train, val]).tolist()
    assert tokens[-1] == enc.eot_token and enc.decode(tokens[:-1]) == text
    assert len(val) == max(1, int(len(tokens) * 0.1))  # one document: split by tokens
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["train_tokens"] == len(train) and meta["val_tokens"] == len(val)
    assert meta["vocab_size"] == 50257 and meta["max_token_id"] == max(tokens)


def split_documents(ids: list[int], eot: int) -> list[str]:
    enc = get_tokenizer()
    cut = [i for i, t in enumerate(ids) if t == eot]
    starts = [0] + [c + 1 for c in cut[:-1]]
    return [enc.decode(ids[s:e]) for s, e in zip(starts, cut, strict=True)]


def test_many_documents_split_whole_and_separated_by_eot(tmp_path):
    files = small_corpus_files()
    folder = prepare_recipe("text", tmp_path, name="docs", inputs=files, val_fraction=0.5, log=lambda _: None)
    eot = get_tokenizer().eot_token
    docs = []
    for split in ("train", "val"):
        ids = read_tokens(folder / f"{split}.bin").tolist()
        assert ids and ids[-1] == eot
        docs += split_documents(ids, eot)
    assert sorted(docs) == sorted(open(f, encoding="utf-8").read() for f in files)


def test_few_documents_give_each_a_val_tail(data_dir):
    enc = get_tokenizer()
    files = small_corpus_files()
    train = read_tokens(data_dir / "small" / "train.bin")
    val = read_tokens(data_dir / "small" / "val.bin")
    assert np.count_nonzero(train == enc.eot_token) == 0  # every document's end went to val
    assert np.count_nonzero(val == enc.eot_token) == len(files)
    expected = sum(len(enc.encode_ordinary(open(f, encoding="utf-8").read())) + 1 for f in files)
    assert len(train) + len(val) == expected and 0.05 < len(val) / expected < 0.15


def test_preparation_is_deterministic(tmp_path, data_dir):
    again = prepare_recipe("text", tmp_path, name="small", inputs=small_corpus_files(), val_fraction=0.1,
                           log=lambda _: None)
    for name in ("train.bin", "val.bin"):
        assert (again / name).read_bytes() == (data_dir / "small" / name).read_bytes()


def test_missing_dataset_names_the_command(tmp_path):
    cfg = DataConfig(dataset="mycorpus", data_dir=str(tmp_path))
    with pytest.raises(DataError, match="python -m gptfast.prepare text --name mycorpus"):
        ensure_prepared(cfg)
    with pytest.raises(DataError, match="python -m gptfast.prepare shakespeare"):
        ensure_prepared(DataConfig(dataset="shakespeare", data_dir=str(tmp_path)))
    with pytest.raises(DataError, match="data/hf_dataset.py fineweb"):
        ensure_prepared(DataConfig(dataset="fineweb", data_dir=str(tmp_path)))


def test_text_recipe_errors(tmp_path):
    with pytest.raises(DataError, match="needs --input"):
        prepare_recipe("text", tmp_path)
    with pytest.raises(DataError, match="matches no readable file"):
        prepare_recipe("text", tmp_path, inputs=[str(tmp_path / "nothing*.txt")])


def test_prepare_cli_exit_code(tmp_path, capsys):
    from gptfast.prepare import main

    assert main(["text", "--input", str(tmp_path / "absent.txt"), "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_dataset_names_stay_inside_the_data_folder(tmp_path, capsys):
    from gptfast.prepare import main

    src = tmp_path / "a.txt"
    src.write_text("hello world " * 50)
    data = tmp_path / "data"
    for name in ("../../x", "..", "a/b", ".hidden"):
        assert main(["text", "--name", name, "--input", str(src), "--data-dir", str(data)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "must be a plain name" in err[0], err
    assert not data.exists() and not (tmp_path / "x").exists()


def test_non_utf8_input_is_an_error_unless_replaced(tmp_path, capsys):
    from gptfast.prepare import main

    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("plain text " * 200)
    bad.write_bytes(b"caf\xe9 latin-1 " * 200)
    data = tmp_path / "data"
    argv = ["text", "--name", "mixed", "--input", str(good), str(bad), "--data-dir", str(data)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.txt is not UTF-8" in err[0] and "--errors=replace" in err[0], err
    assert not (data / "mixed" / "meta.json").exists() and not list((data / "mixed").glob("*.tmp"))
    assert main(argv + ["--errors", "replace"]) == 0
    assert "1 input files held bytes that are not UTF-8" in capsys.readouterr().out
    assert (data / "mixed" / "meta.json").exists()


def test_preparing_again_from_the_same_inputs_is_a_no_op(tmp_path):
    from gptfast.datasets import prepare_recipe

    src = tmp_path / "a.txt"
    src.write_text("hello world, " * 400)
    lines = []
    folder = prepare_recipe("text", tmp_path / "data", name="d", inputs=[str(src)], log=lines.append)
    inode = (folder / "train.bin").stat().st_ino
    lines.clear()
    prepare_recipe("text", tmp_path / "data", name="d", inputs=[str(src)], log=lines.append)
    assert (folder / "train.bin").stat().st_ino == inode and "already prepared" in lines[-1]
    prepare_recipe("text", tmp_path / "data", name="d", inputs=[str(src)], log=lines.append, force=True)
    assert (folder / "train.bin").stat().st_ino != inode
    inode = (folder / "train.bin").stat().st_ino
    src.write_text("changed text, " * 400)  # a changed input is prepared again
    prepare_recipe("text", tmp_path / "data", name="d", inputs=[str(src)], log=lines.append)
    assert (folder / "train.bin").stat().st_ino != inode


def test_a_dataset_in_use_is_not_overwritten(tmp_path, capsys):
    import torch

    from gptfast.datasets import prepare_recipe
    from gptfast.loader import TokenLoader
    from gptfast.prepare import main

    src = tmp_path / "a.txt"
    src.write_text("hello world, " * 400)
    folder = prepare_recipe("text", tmp_path / "data", name="d", inputs=[str(src)], log=lambda _: None)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".bin", ".json")}
    loader = TokenLoader(folder, 50257, 8, 2, 0, torch.device("cpu"))
    assert main(["text", "--name", "d", "--input", str(src), "--data-dir", str(tmp_path / "data"), "--force"]) == 2
    assert "being read by a running training job" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".bin", ".json")} == before
    loader.close()
    assert main(["text", "--name", "d", "--input", str(src), "--data-dir", str(tmp_path / "data"), "--force"]) == 0


def test_a_full_disk_during_prepare_force_leaves_the_dataset_as_it_was(tmp_path, monkeypatch, capsys):
    import errno

    from gptfast import datasets
    from gptfast.prepare import main

    src = tmp_path / "a.txt"
    src.write_text("hello world, " * 400)
    folder = prepare_recipe("text", tmp_path / "data", name="d", inputs=[str(src)], log=lambda _: None)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    real = datasets._tokenise

    def fills_the_disk(documents, tmp_paths, *args):
        real(documents, tmp_paths, *args)  # the new token files are written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(datasets, "_tokenise", fills_the_disk)
    src.write_text("other text, " * 400)
    argv = ["text", "--name", "d", "--input", str(src), "--data-dir", str(tmp_path / "data"), "--force"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device; the dataset there is as it was" in err[0]
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # no .tmp left, nothing replaced
    ensure_prepared(DataConfig(dataset="d", data_dir=str(tmp_path / "data")), log=lambda _: None)


def test_a_failed_first_prepare_leaves_no_folder(tmp_path, capsys):
    from gptfast.prepare import main

    src = tmp_path / "a.txt"
    src.write_text("")  # no tokens: an empty split
    assert main(["text", "--name", "d", "--input", str(src), "--data-dir", str(tmp_path / "data")]) == 2
    assert "empty" in capsys.readouterr().err
    assert not (tmp_path / "data" / "d").exists()
