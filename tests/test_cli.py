"""What every command line shares: help that answers without loading torch, defaults and keys
listed, files written with the usual permissions."""

import dataclasses
import os
import stat
import subprocess
import sys

import pytest

from conftest import REPO
from gptfast.configfile import SECTION_TYPES

CLIS = ["train", "sample", "export", "prepare", "plan", "plot", "eval"]


@pytest.mark.parametrize("cli", CLIS)
def test_help_does_not_import_torch(cli):
    """--help answers at once: torch (seconds to import) is loaded only by the work itself."""
    code = (f"import sys\nfrom gptfast.{cli} import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:3]\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def test_train_help_lists_every_key_with_its_default_and_doc(capsys):
    from gptfast.train import main

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for section, cls in SECTION_TYPES.items():
        for f in dataclasses.fields(cls):
            assert f"--{section}.{f.name}=" in text, f"{section}.{f.name}"
            assert f.metadata["doc"].split()[0] in text
    assert '--train.device="auto"' in text and "--optim.betas=[0.9, 0.95]" in text


def test_sample_help_shows_defaults(capsys):
    from gptfast.sample import main

    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for default in ("(default: 200)", "(default: 0.8)", "(default: 1.0)", "(default: 1337)", "(default: auto)"):
        assert default in text


def test_export_writes_files_with_the_usual_mode(tmp_path):
    from gptfast.config import ModelConfig
    from gptfast.hf import export_hf
    from gptfast.model import GPT

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)
    out = export_hf(GPT(cfg).state_dict(), cfg, tmp_path / "exported")
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    mask = os.umask(0)
    os.umask(mask)
    assert modes == {"config.json": 0o666 & ~mask, "model.safetensors": 0o666 & ~mask}


def test_export_is_whole_or_nothing_and_never_overwrites_silently(tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from gptfast.config import ModelConfig
    from gptfast.errors import CheckpointError
    from gptfast.hf import export_hf
    from gptfast.model import GPT

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8)
    state = GPT(cfg).state_dict()
    out = export_hf(state, cfg, tmp_path / "exported")
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CheckpointError, match="already holds files .*pass --force"):
        export_hf(state, cfg, out)
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        export_hf(state, cfg, out / "config.json")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device; .* is as it was"):
        export_hf(state, cfg, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no half-written folder beside it
    monkeypatch.undo()
    torch_state = {k: v + 1 for k, v in state.items()}
    export_hf(torch_state, cfg, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
