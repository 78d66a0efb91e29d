"""Pre-tokenised shards in the public format (256 int32 header, then uint16 tokens): downloaded by
`prepare fineweb10b` from a server on loopback (no network), checked, resumed; trained on and
resumed exactly."""

import functools
import http.server
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
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
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


def test_windows_come_from_every_shard_deterministically(shard_server, tmp_path):
    import torch

    _, url = shard_server
    folder = prepare_fineweb10b(tmp_path / "data", shards=3, name="fw", log=lambda _: None, base_url=url)
    loader = TokenLoader(folder, 50257, 32, 64, 7, torch.device("cpu"))
    again = TokenLoader(folder, 50257, 32, 64, 7, torch.device("cpu"))
    assert len(loader.tokens["train"]) == 3
    seen = set()
    for step in range(20):
        x, y = loader.batch("train", step)
        assert torch.equal(x, again.batch("train", step)[0]) and torch.equal(x[:, 1:], y[:, :-1])
        ends = loader.window_ends["train"]
        rng = np.random.default_rng([7, 0, step, 0])
        seen |= set(np.searchsorted(ends, rng.integers(0, ends[-1], size=64), side="right").tolist())
    assert seen == {0, 1, 2}


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


def test_the_main_command_on_a_fresh_machine_names_the_download(tmp_path, capsys):
    """configs/medium_4070.toml with no data prepared: one line naming the one command that gets it."""
    from conftest import REPO
    from gptfast.train import main as train_main

    code = train_main([str(REPO / "configs" / "medium_4070.toml"), f"--data.data_dir={tmp_path}",
                       "--train.device=cpu", f"--train.out_dir={tmp_path / 'out'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "python -m gptfast.prepare fineweb10b" in err and not (tmp_path / "out").exists()
