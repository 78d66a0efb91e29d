"""Hugging Face GPT-2 interop (gptfast/hf.py): init_from, export, and the KV-cache sampler."""

import json

import pytest
import torch

from gptfast import hf
from gptfast.config import ModelConfig
from gptfast.errors import CheckpointError
from gptfast.model import GPT


@pytest.fixture
def transformers():
    """Only the tests that use transformers skip without it (the sampler's tests run regardless)."""
    return pytest.importorskip("transformers", reason="install the hf extra: pip install -e '.[hf]'")


def random_hf_model(transformers, tmp_path, vocab=101, n_layer=2, n_head=2, n_embd=32, n_positions=48, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # GPT-2's init leaves biases and LayerNorms trivial: make them count
        for name, p in model.named_parameters():
            if "bias" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path / "hf_model"
    model.save_pretrained(folder)
    return model, folder


def ours_from(folder) -> GPT:
    cfg = hf.model_config_from_hf(hf.read_hf_config(folder), dropout=0.0)
    model = GPT(cfg).eval()
    hf.load_hf_into(model, folder)
    return model


@pytest.mark.parametrize("n_layer, n_head, n_embd, n_positions", [(2, 2, 32, 48), (3, 4, 48, 17)])
def test_init_from_gives_the_same_logits(transformers, tmp_path, n_layer, n_head, n_embd, n_positions):
    theirs, folder = random_hf_model(transformers, tmp_path, n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions)
    ours = ours_from(folder)
    assert (ours.config.n_layer, ours.config.block_size) == (n_layer, n_positions)
    idx = torch.randint(0, 101, (3, n_positions))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_export_loads_in_transformers_with_the_same_logits(transformers, tmp_path, bias):
    torch.manual_seed(1)
    cfg = ModelConfig(n_layer=2, n_head=3, n_embd=24, block_size=20, vocab_size=77, bias=bias)
    ours = GPT(cfg).eval()
    out = hf.export_hf(ours.state_dict(), cfg, tmp_path / "exported")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 77, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx), atol=1e-5, rtol=1e-5)
    # and back again
    torch.testing.assert_close(ours_from(out)(idx), ours(idx), atol=0, rtol=0)


def test_finetune_from_a_hf_directory_and_export(transformers, tiny_config, tmp_path):
    from gptfast.export import main as export_main
    from gptfast.trainer import Trainer

    theirs, folder = random_hf_model(transformers, tmp_path, vocab=50257, n_layer=2, n_head=2, n_embd=32, n_positions=32)
    messages = []
    trainer = Trainer(tiny_config({"train.init_from": f'"{folder}"', "model.n_layer": 5, "train.max_steps": 3}),
                      log=messages.append)
    assert trainer.cfg.model.n_layer == 2  # the architecture is the checkpoint's
    assert any(m.startswith(f"initialised from {folder}") for m in messages)
    idx = torch.randint(0, 50257, (1, 32))
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(idx), theirs(idx).logits, atol=1e-5, rtol=1e-5)
    result = trainer.run()
    assert result.step == 3 and result.train_loss is not None
    assert export_main([str(trainer.run_dir.path), str(tmp_path / "exported")]) == 0
    tuned = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    with torch.no_grad():
        torch.testing.assert_close(tuned(idx).logits, trainer.model.eval()(idx), atol=1e-5, rtol=1e-5)


def test_incomplete_or_mismatched_directories(transformers, tmp_path):
    _, folder = random_hf_model(transformers, tmp_path)
    model = ours_from(folder)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        hf.read_hf_config(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        hf.read_hf_config(tmp_path / "nowhere")
    config = json.loads((folder / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_head"}))
    with pytest.raises(CheckpointError, match="missing n_head"):
        hf.read_hf_config(broken)
    (broken / "config.json").write_text(json.dumps(dict(config, activation_function="relu")))
    with pytest.raises(CheckpointError, match="activation_function = 'relu' is not supported"):
        hf.read_hf_config(broken)
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="neither model.safetensors nor pytorch_model.bin"):
        hf.load_hf_into(model, broken)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if "h.1.mlp" not in k}, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"the weights lack h\.1\.mlp"):
        hf.load_hf_into(model, broken)
    wider = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=64, block_size=48, vocab_size=101))
    with pytest.raises(CheckpointError, match="has shape"):
        hf.load_hf_into(wider, folder)


def test_init_from_a_hub_name_through_the_cache_or_a_download(tiny_config, tmp_path, monkeypatch):
    """init_from = "gpt2"-style names: found in the Hugging Face cache offline; downloaded into it
    (here from a server on loopback) online; with HF_HUB_OFFLINE and nothing cached, one error
    naming where it looked. No network and no transformers needed."""
    import functools
    import http.server
    import threading

    from gptfast.trainer import Trainer

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    torch.manual_seed(3)
    source = GPT(cfg)
    served = tmp_path / "served" / "tiny-gpt2"
    hf.export_hf(source.state_dict(), cfg, served)
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"init_from 'tiny-gpt2': not a local directory, and not in the "
                                              r"Hugging Face cache .*models--tiny-gpt2"):
        hf.resolve_source("tiny-gpt2")
    monkeypatch.delenv("HF_HUB_OFFLINE")

    class Handler(http.server.SimpleHTTPRequestHandler):
        """The hub's URL layout, NAME/resolve/main/FILE, onto the served folder's NAME/FILE."""

        def translate_path(self, path):
            return super().translate_path(path.replace("/resolve/main/", "/"))

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(Handler, directory=str(tmp_path / "served")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GPTFAST_HF_URL", f"http://127.0.0.1:{server.server_address[1]}/")
    try:
        folder = hf.resolve_source("tiny-gpt2", log=lambda _: None)
    finally:
        server.shutdown()
    assert folder == cache / "models--tiny-gpt2" / "snapshots" / "main"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # now cached: found offline
    assert hf.resolve_source("tiny-gpt2") == folder

    trainer = Trainer(tiny_config({"train.init_from": '"tiny-gpt2"', "train.max_steps": 1}), log=lambda _: None)
    assert trainer.cfg.train.init_from == str(folder) and trainer.cfg.model.n_embd == 32
    for name, value in source.state_dict().items():
        torch.testing.assert_close(trainer.model.state_dict()[name], value)


@pytest.mark.parametrize("change, problem", [
    ({"n_head": 3}, "n_embd 32 is not divisible by n_head = 3"),
    ({"n_layer": 0}, "n_layer must be positive, got 0"),
    ({"vocab_size": 70000}, "vocab_size token files hold uint16 ids, so at most 65536, got 70000"),
    ({"n_embd": "32"}, "n_embd must be an integer, got '32'"),
    ({"n_positions": None}, "n_positions must be an integer, got None"),
])
def test_an_init_from_config_json_is_validated_as_a_config(tiny_config, tmp_path, capsys, change, problem):
    """A bad config.json is one line naming the file and its key, exit 2, no run directory."""
    from conftest import REPO
    from gptfast.train import main as train_main

    folder = tmp_path / "hf"
    folder.mkdir()
    config = {**hf.hf_config_of(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32)), **change}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")  # never read: the config is refused first
    run = tmp_path / "run"
    cfg = tiny_config(out_dir=run)
    code = train_main([str(REPO / "configs" / "cpu_smoke.toml"), f"--data.data_dir={cfg.data.data_dir}",
                       "--data.dataset=small", f"--train.out_dir={run}", f'--train.init_from="{folder}"'])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"error: init_from {folder / 'config.json'}: {problem}"), err
    assert not run.exists()


@pytest.mark.parametrize("vocab, eot", [(50257, 50256), (50304, 50256), (101, None)])
def test_export_names_the_end_of_text_id_only_inside_the_vocabulary(vocab, eot):
    config = hf.hf_config_of(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=vocab))
    assert config.get("bos_token_id") == config.get("eos_token_id") == eot
