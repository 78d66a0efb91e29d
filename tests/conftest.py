"""Shared fixtures: an offline tokenizer cache, a small prepared dataset, a tiny config."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run through Triton's CPU interpreter, which must be switched on
# before any kernel is defined, so before `kernels` is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One torch thread per test process unless GPTFAST_TEST_THREADS says otherwise: the suite's models are
# tiny, and on a shared 2-core machine two threads fighting made a toy step ~40x slower than one.
torch.set_num_threads(int(os.environ.get("GPTFAST_TEST_THREADS", "1")))

# The GPT-2 BPE files ship beside the checkout for offline machines; an online user's tiktoken
# downloads them as usual, so this only fills in a variable the environment left unset.
_SHARED_CACHE = Path(__file__).resolve().parents[2] / "shared" / "tiktoken_cache"
if "TIKTOKEN_CACHE_DIR" not in os.environ and _SHARED_CACHE.is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(_SHARED_CACHE)

from gptfast.configfile import load_config  # noqa: E402
from gptfast.datasets import prepare_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def small_corpus_files() -> list[str]:
    """A few dozen standard-library sources: real text, present on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p) for p in (root / "json").glob("*.py")) + sorted(str(p) for p in (root / "email").glob("*.py"))
    assert len(files) > 10, f"expected the json and email packages under {root}"
    return files


# A vocabulary for tests where GPT-2's is not the point: the interpreted kernels walk every row of
# the (tokens, vocabulary) logits, so 50257 classes make a kernels-on run ~100x slower.
SMALL_VOCAB = 500
# Overrides that train on the 'small500' dataset at that vocabulary, with fewer rows per micro-batch
# (2 x 16 tokens): the interpreter runs a kernel's programs one after another, a program per row.
KERNEL_TEST_OVERRIDES = {"model.vocab_size": SMALL_VOCAB, "data.dataset": '"small500"',
                         "train.micro_batch_size": 2, "model.block_size": 16}


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared dataset 'small' (about 250k tokens) under a session-wide data folder, and
    'small500', the same tokens folded into SMALL_VOCAB ids (id % SMALL_VOCAB)."""
    import json

    import numpy as np

    root = tmp_path_factory.mktemp("data")
    small = prepare_recipe("text", root, name="small", inputs=small_corpus_files(), val_fraction=0.1,
                           log=lambda _: None)
    folded = root / "small500"
    folded.mkdir()
    counts = {}
    for split in ("train", "val"):
        tokens = np.fromfile(small / f"{split}.bin", dtype="<u2") % SMALL_VOCAB
        tokens.astype("<u2").tofile(folded / f"{split}.bin")
        counts[f"{split}_tokens"] = len(tokens)
    (folded / "meta.json").write_text(json.dumps({"name": "small500", "dtype": "uint16", **counts}))
    return root


def tiny_overrides(data_dir: Path, out_dir: Path, extra: dict | None = None) -> list[str]:
    """CLI-style overrides for a model that trains a step in milliseconds on a CPU."""
    values = {
        "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32, "model.block_size": 32,
        "data.dataset": '"small"', "data.data_dir": f'"{data_dir}"',
        "optim.warmup_steps": 2, "optim.lr_decay_steps": 20, "optim.lr": 1e-3, "optim.min_lr": 1e-4,
        "train.micro_batch_size": 4, "train.grad_accum_steps": 2, "train.max_steps": 6,
        "train.eval_interval": 3, "train.eval_steps": 2, "train.log_interval": 1,
        "train.checkpoint_interval": 3, "train.out_dir": f'"{out_dir}"', "train.device": '"cpu"',
        "train.dtype": '"float32"', "train.sample_tokens": 0,
    }
    values.update(extra or {})
    toml = {True: "true", False: "false"}
    return [f"--{key}={toml[value] if isinstance(value, bool) else value}" for key, value in values.items()]


@pytest.fixture
def tiny_config(data_dir, tmp_path):
    def make(extra: dict | None = None, out_dir: Path | None = None):
        return load_config(None, tiny_overrides(data_dir, out_dir or tmp_path / "run", extra))
    return make


def crash_at_step(trainer, step: int) -> None:
    """Run `trainer` until it is about to train step `step + 1`, then kill it there (a
    KeyboardInterrupt out of run(), as a process dying would leave it): the checkpoint on disk is
    the last one written before."""
    real_step = trainer.train_step

    def crashing():
        if trainer.step == step:
            raise KeyboardInterrupt
        return real_step()

    trainer.train_step = crashing
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
