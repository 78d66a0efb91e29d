import pytest
import torch

from gptfast import checkpoint as ckpt
from gptfast.arch import ARCH_DEFAULTS
from gptfast.errors import CheckpointError, RunDirError


def state(step: int) -> dict:
    return {"model": {"w": torch.full((3,), float(step))}, "config": {"model": {}}, "step": step}


def test_save_keeps_newest_and_leaves_no_temporaries(tmp_path):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(state(step), tmp_path, step, keep=2)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt_00000003.pt", "ckpt_00000003.pt.sha256", "ckpt_00000004.pt", "ckpt_00000004.pt.sha256"]
    loaded = ckpt.load_checkpoint(tmp_path)  # a directory loads its newest checkpoint
    assert loaded["step"] == 4 and torch.equal(loaded["model"]["w"], torch.full((3,), 4.0))


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ckpt.save_checkpoint(state(1), tmp_path, 1, keep=2)

    def disk_full(obj, f):
        f.write(b"partial bytes")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(RunDirError, match="No space left on device"):
        ckpt.save_checkpoint(state(2), tmp_path, 2, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt", "ckpt_00000001.pt.sha256"]
    assert ckpt.load_checkpoint(tmp_path)["step"] == 1


def test_damaged_checkpoint_fails_its_checksum(tmp_path):
    path = ckpt.save_checkpoint(state(5), tmp_path, 5, keep=2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit in the middle
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="is corrupt: its SHA-256 does not match"):
        ckpt.load_checkpoint(path)


def test_checkpoint_loads_with_plain_torch_load(tmp_path):
    path = ckpt.save_checkpoint(state(2), tmp_path, 2, keep=2)
    assert torch.load(path, weights_only=True)["step"] == 2
    assert (tmp_path / "ckpt_00000002.pt.sha256").read_text().strip() == ckpt.file_sha256(path)


@pytest.mark.parametrize("payload", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated zip"])
def test_unreadable_checkpoint_is_a_clear_error(tmp_path, payload):
    path = tmp_path / "ckpt_00000009.pt"
    path.write_bytes(payload)
    with pytest.raises(CheckpointError, match="is unreadable"):
        ckpt.load_checkpoint(path)


def test_foreign_file_and_missing_paths(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "ckpt_00000001.pt")
    with pytest.raises(CheckpointError, match="not a gptfast checkpoint"):
        ckpt.load_checkpoint(tmp_path / "ckpt_00000001.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "ckpt_00000002.pt")
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "..")


def test_model_mismatch_names_every_field():
    saved = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 50257, "bias": True}
    current = dict(saved, n_layer=4, n_embd=64)
    with pytest.raises(CheckpointError, match=r"n_layer: checkpoint 2, config 4; n_embd: checkpoint 32, config 64"):
        ckpt.check_same_model(saved, current, "x.pt")
    ckpt.check_same_model(saved, dict(saved), "x.pt")
    # a checkpoint from before the architecture switches existed is GPT-2; a modern config is not
    modern = dict(saved, **ARCH_DEFAULTS["modern"], arch="modern")
    with pytest.raises(CheckpointError, match=r"arch: checkpoint 'gpt2', config 'modern'; rotary: checkpoint False"):
        ckpt.check_same_model(saved, modern, "x.pt")
