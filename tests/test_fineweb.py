"""Pre-tokenised shards in the public format (256 int32 header, then uint16 tokens): downloaded by
`prepare fineweb10b` from a server on loopback (no network), checked, resumed; trained on and
resumed exactly."""

import functools
import http.server
import os
import itertools
import json
import threading

import numpy as np
import pytest

from conftest import crash_at_step, tiny_overrides
from gptfast.configfile import load_config
from gptfast.fineweb import fineweb10b_names, prepare_fineweb10b
from gptfast.loader import SHARD_MAGIC, TokenLoader, shard_token_count
from gptfast.errors import DataError
from gptfast.prepare import main as prepare_main
from gptfast.trainer import Trainer


def write_shard(path, tokens):
    header = np.zeros(256, dtype="<i4")
    header[:3] = (SHARD_MAGIC, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder):
    """(server, base URL) of an HTTP server on loopback serving `folder`."""
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


@pytest.fixture
def shard_server(tmp_path, data_dir):
    """Three train shards and a val shard cut from the test corpus, served over HTTP on loopback."""
    served = tmp_path / "served"
    served.mkdir()
    tokens = np.fromfile(data_dir / "small" / "train.bin", dtype="<u2")
    val = np.fromfile(data_dir / "small" / "val.bin", dtype="<u2")
    names = fineweb10b_names(3)
    write_shard(served / names["val"][0], val)
    for i, name in enumerate(names["train"]):
        write_shard(served / name, tokens[i * len(tokens) // 3:(i + 1) * len(tokens) // 3])
    server, url = serve(served)
    yield served, url
    server.shutdown()


SMALL_SHARD = 600  # tokens: a tiny run (256 tokens a step) crosses a shard every few steps


@pytest.fixture
def small_shards(tmp_path, data_dir, monkeypatch):
    """FineWeb's file names served on loopback: a val shard and five train shards of SMALL_SHARD
    tokens; GPTFAST_FINEWEB10B_URL points at them, and the background fetch retries at once."""
    from gptfast import fineweb

    served = tmp_path / "served"
    served.mkdir()
    tokens = np.fromfile(data_dir / "small" / "train.bin", dtype="<u2")
    names = fineweb10b_names(5)
    write_shard(served / names["val"][0], np.fromfile(data_dir / "small" / "val.bin", dtype="<u2")[:4000])
    for i, name in enumerate(names["train"]):
        write_shard(served / name, tokens[i * SMALL_SHARD:(i + 1) * SMALL_SHARD])
    server, url = serve(served)
    monkeypatch.setenv("GPTFAST_FINEWEB10B_URL", url)
    monkeypatch.setattr(fineweb, "RETRY_SECONDS", (0, 0))
    yield served, names["train"]
    server.shutdown()


def test_download_checks_keeps_and_repairs_shards(shard_server, tmp_path):
    served, url = shard_server
    lines = []
    folder = prepare_fineweb10b(tmp_path / "data", shards=3, name="fw", log=lines.append, base_url=url)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["shards"] == fineweb10b_names(3)
    assert meta["train_tokens"] == sum(shard_token_count(served / n) for n in meta["shards"]["train"])
    for name in meta["shards"]["train"] + meta["shards"]["val"]:
        assert (folder / name).read_bytes() == (served / name).read_bytes()
    # again: complete shards are kept, a truncated one is downloaded again, a partial one continued
    kept = (folder / meta["shards"]["train"][0]).stat().st_ino
    truncated = folder / meta["shards"]["train"][1]
    truncated.write_bytes(truncated.read_bytes()[:5000])
    (folder / meta["shards"]["train"][2]).rename(folder / (meta["shards"]["train"][2] + ".part"))
    lines.clear()
    prepare_fineweb10b(tmp_path / "data", shards=3, name="fw", log=lines.append, base_url=url)
    assert (folder / meta["shards"]["train"][0]).stat().st_ino == kept
    assert truncated.read_bytes() == (served / truncated.name).read_bytes()
    assert (folder / meta["shards"]["train"][2]).read_bytes() == (served / meta["shards"]["train"][2]).read_bytes()
    assert any("downloading it again" in line for line in lines)


def test_offline_is_one_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GPTFAST_FINEWEB10B_URL", "http://127.0.0.1:9/")  # nothing listens on port 9
    assert prepare_main(["fineweb10b", "--shards", "1", "--data-dir", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download http://127.0.0.1:9/fineweb_val_000000.bin") and err.count("\n") == 1
    assert not (tmp_path / "data" / "fineweb10b" / "meta.json").exists()


def test_a_damaged_shard_is_named(tmp_path):
    path = tmp_path / "bad.bin"
    path.write_bytes(np.zeros(300, dtype="<i4").tobytes())
    with pytest.raises(DataError, match="not a GPT-2 token shard"):
        shard_token_count(path)
    write_shard(path, np.arange(100))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated download"):
        shard_token_count(path)


def test_shards_are_read_in_order_deterministically(shard_server, tmp_path):
    """Each micro-batch draws from the shard holding its first token in the run's stream of shards
    laid end to end: shard 0, then 1, then 2, then 0 again; the same draws every time."""
    import torch

    served, url = shard_server
    folder = prepare_fineweb10b(tmp_path / "data", shards=3, name="fw", log=lambda _: None, base_url=url)
    per_step = 2 * 64 * 32  # two micro-batches of 64 x 32 tokens

    def loader():
        return TokenLoader(folder, 50257, 32, 64, 7, torch.device("cpu"), tokens_before=lambda step: step * per_step)

    first, again = loader(), loader()
    lengths = [shard_token_count(served / n) for n in fineweb10b_names(3)["train"]]
    raw = [np.fromfile(served / n, dtype="<u2", offset=1024) for n in fineweb10b_names(3)["train"]]
    ends = np.cumsum(lengths)
    order = []
    for step in range(0, int(ends[-1] * 1.3 // per_step), 7):
        for micro in (0, 1):
            x, y = first.batch("train", step, micro)
            assert torch.equal(x, again.batch("train", step, micro)[0]) and torch.equal(x[:, 1:], y[:, :-1])
            shard = int(np.searchsorted(ends, (step * per_step + micro * 64 * 32) % ends[-1], side="right"))
            for row in x[:4].numpy():  # each window is a run of that shard's tokens
                hits = np.flatnonzero(raw[shard][:len(raw[shard]) - 32] == row[0])
                assert any(np.array_equal(raw[shard][h:h + 32], row) for h in hits)
            order.append(shard)
    # in order, and past the last shard the first again
    assert [shard for shard, _ in itertools.groupby(order)] == [0, 1, 2, 0]


def test_training_on_shards_resumes_exactly(shard_server, tmp_path):
    _, url = shard_server
    prepare_fineweb10b(tmp_path / "data", shards=3, name="fw", log=lambda _: None, base_url=url)

    def config(out):
        return load_config(None, tiny_overrides(tmp_path / "data", out, {"data.dataset": '"fw"'}))

    straight = Trainer(config(tmp_path / "straight"), log=lambda _: None)
    straight.run()
    crashing = Trainer(config(tmp_path / "resumed"), log=lambda _: None)
    crash_at_step(crashing, 4)  # dies during step 5; the checkpoint on disk is step 3's
    Trainer(config(tmp_path / "resumed"), log=lambda _: None).run()

    def losses(out):
        return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                if "loss" in r]

    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def fetching_config(tmp_path, out, extra=None):
    return load_config(None, tiny_overrides(tmp_path / "data", out, {"data.dataset": '"fineweb10b"', **(extra or {})}))


def losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_the_trainer_fetches_the_shards_it_reads_and_no_others(small_shards, tmp_path):
    """No prepare step: the val shard and the first train shard before step 1, the rest in the
    background; 6 steps x 256 tokens reach three 600-token shards, so the fourth and fifth are never
    fetched. Resumed across a shard boundary, the run is the uninterrupted one."""
    served, names = small_shards
    lines = []
    Trainer(fetching_config(tmp_path, tmp_path / "straight"), log=lines.append).run()
    folder = tmp_path / "data" / "fineweb10b"
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["fetch"] == "on demand" and meta["shards"]["train"][:5] == names
    assert [(folder / n).exists() for n in names] == [True, True, True, False, False]
    for name in names[:3]:
        assert (folder / name).read_bytes() == (served / name).read_bytes()
    text = "\n".join(lines)
    assert "fetching its val shard and first train shard" in text and "fetched in the background" in text

    for name in names[1:3]:  # the resumed run fetches them again, as a fresh machine would
        (folder / name).unlink()
    crashing = Trainer(fetching_config(tmp_path, tmp_path / "resumed"), log=lambda _: None)
    crash_at_step(crashing, 4)  # dies before step 5, in the second shard; the checkpoint on disk is step 3's
    Trainer(fetching_config(tmp_path, tmp_path / "resumed"), log=lambda _: None).run()
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")


def test_a_shard_that_cannot_be_fetched_stops_the_run_between_steps_with_a_checkpoint(small_shards, tmp_path,
                                                                                       capsys):
    from gptfast.train import main as train_main

    served, names = small_shards
    hidden = served / (names[1] + ".hidden")
    (served / names[1]).rename(hidden)  # the server loses the second train shard
    argv = tiny_overrides(tmp_path / "data", tmp_path / "run", {"data.dataset": '"fineweb10b"',
                                                                 "train.checkpoint_interval": 100})
    (tmp_path / "none.toml").write_text("")
    code = train_main([str(tmp_path / "none.toml")] + argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    # steps 1-2 read the first shard (512 tokens); step 3 starts in the second
    assert f"could not download {os.environ['GPTFAST_FINEWEB10B_URL']}{names[1]}" in err
    assert "training stopped before step 3, checkpoint" in err and "ckpt_00000002.pt written" in err
    hidden.rename(served / names[1])
    assert train_main([str(tmp_path / "none.toml")] + argv) == 0
    Trainer(fetching_config(tmp_path, tmp_path / "straight", {"train.checkpoint_interval": 100}),
            log=lambda _: None).run()
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


def test_offline_the_main_command_says_how_to_get_the_shards(tmp_path, capsys, monkeypatch):
    from conftest import REPO
    from gptfast.train import main as train_main

    monkeypatch.setenv("GPTFAST_FINEWEB10B_URL", "http://127.0.0.1:9/")  # nothing listens on port 9
    code = train_main([str(REPO / "configs" / "medium_4070.toml"), f"--data.data_dir={tmp_path}",
                       "--train.device=cpu", f"--train.out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: could not download http://127.0.0.1:9/fineweb_val_000000.bin")
    assert "GPTFAST_FINEWEB10B_URL" in err and "python -m gptfast.prepare fineweb10b" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "fineweb10b" / "meta.json").exists()


def test_a_disk_too_small_for_the_shards_a_run_reads_is_said_before_step_1(small_shards, tmp_path, monkeypatch):
    import collections

    from gptfast import loader

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(loader.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 3000, 3000))
    # 1,536 tokens: three 600-token shards, two not yet fetched: 2 x (1,200 + 1,024 header) bytes > 3,000
    with pytest.raises(DataError, match=r"this run reads 1,536 train tokens, about 3 shards of .*; the 2 not yet "
                                        r"fetched need about .* but its disk has .* free"):
        Trainer(fetching_config(tmp_path, tmp_path / "run"), log=lambda _: None)
    assert not (tmp_path / "run").exists()
