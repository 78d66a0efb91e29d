"""Hugging Face GPT-2 checkpoints in and out: `[train] init_from = DIR` and `python -m gptfast.export`.

A Hugging Face GPT-2 directory holds `config.json` and `model.safetensors` (or the older
`pytorch_model.bin`). Its Linear layers are `Conv1D`s, whose weights are stored (in, out): they are
transposed on the way in and out. lm_head is tied to the token embedding, so only `wte` is stored.
Only `safetensors` (and torch, for `.bin`) is used here; `transformers` is never imported.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from gptfast.arch import GPT2_SWITCHES, ModelConfig
from gptfast.errors import CheckpointError
from gptfast.files import default_file_mode

CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# config.json values under which the checkpoint computes what gptfast's GPT computes
REQUIRED_CONFIG = {"activation_function": ("gelu_new", "gelu_pytorch_tanh"), "scale_attn_by_inverse_layer_idx": (False,),
                   "reorder_and_upcast_attn": (False,), "scale_attn_weights": (True,)}


HUB_URL = "https://huggingface.co/"
HUB_FILES = ("config.json", "model.safetensors")
HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def hub_cache() -> Path:
    """Hugging Face's cache of hub models (HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    return Path(home) / "hub"


def cached_snapshot(source: str, files: tuple[str, ...]) -> Path | None:
    """The Hugging Face cache's current snapshot of hub name `source` when it holds `files`."""
    repo = hub_cache() / ("models--" + source.replace("/", "--"))
    ref = repo / "refs" / "main"
    if not ref.is_file():
        return None
    snapshot = repo / "snapshots" / ref.read_text().strip()
    return snapshot if all((snapshot / name).is_file() for name in files) else None


def resolve_source(source: str, log=print) -> Path:
    """init_from as a directory: a local Hugging Face GPT-2 directory as given, or a hub name
    ("gpt2", "gpt2-medium", "org/name") found in the Hugging Face cache, or, online, downloaded
    into it (HF_HUB_OFFLINE=1: never). A clear error names what is missing and where it looked."""
    path = Path(source)
    if path.is_dir() or "/" in source and path.exists() or not HUB_NAME.fullmatch(source):
        return path
    repo = hub_cache() / ("models--" + source.replace("/", "--"))
    snapshot = cached_snapshot(source, HUB_FILES)
    if snapshot is not None:
        return snapshot
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise CheckpointError(f"init_from {source!r}: not a local directory, and not in the Hugging Face cache "
                              f"({repo} lacks {' and '.join(HUB_FILES)}); HF_HUB_OFFLINE is set, so nothing is "
                              "downloaded: pass a directory, or download it once online")
    from gptfast.files import download
    from gptfast.errors import DataError

    snapshot = repo / "snapshots" / "main"
    snapshot.mkdir(parents=True, exist_ok=True)
    base = os.environ.get("GPTFAST_HF_URL", HUB_URL)
    for name in HUB_FILES:
        if not (snapshot / name).is_file():
            log(f"downloading {base}{source}/resolve/main/{name}")
            try:
                download(f"{base}{source}/resolve/main/{name}", snapshot / name, log)
            except DataError as e:
                raise CheckpointError(f"init_from {source!r}: not a local directory, not in the Hugging Face cache "
                                      f"({repo}), and the download failed: {e}") from None
    ref = repo / "refs" / "main"
    ref.parent.mkdir(parents=True, exist_ok=True)
    ref.write_text("main")
    return snapshot


def read_hf_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not folder.is_dir():
        raise CheckpointError(f"init_from {folder}: not a directory")
    if not path.exists():
        raise CheckpointError(f"init_from {folder}: config.json is missing (a Hugging Face GPT-2 directory holds "
                              "config.json and model.safetensors)")
    try:
        hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"init_from {path}: unreadable JSON ({e})") from None
    if hf.get("model_type", "gpt2") != "gpt2":
        raise CheckpointError(f"init_from {path}: model_type {hf.get('model_type')!r}, expected 'gpt2'")
    missing = [k for k in ("n_layer", "n_head", "n_embd", "n_positions", "vocab_size") if k not in hf]
    if missing:
        raise CheckpointError(f"init_from {path}: missing {', '.join(missing)}")
    for key, allowed in REQUIRED_CONFIG.items():
        if key in hf and hf[key] not in allowed:
            raise CheckpointError(f"init_from {path}: {key} = {hf[key]!r} is not supported (expected {allowed[0]!r})")
    if hf.get("n_inner") not in (None, 4 * hf["n_embd"]):
        raise CheckpointError(f"init_from {path}: n_inner = {hf['n_inner']} is not supported (expected 4 * n_embd)")
    return hf


# OpenAI's GPT-2 sizes on the hub, for planning a name that is not on this machine yet (Radford et
# al. 2019, table 2; the hub's config.json files): (n_layer, n_head, n_embd).
OPENAI_SIZES = {"gpt2": (12, 12, 768), "gpt2-medium": (24, 16, 1024), "gpt2-large": (36, 20, 1280),
                "gpt2-xl": (48, 25, 1600)}


def architecture_of(source: str, dropout: float = 0.0) -> ModelConfig:
    """init_from's architecture without downloading anything: its config.json where it is on this
    machine (a directory, or the Hugging Face cache), else OpenAI's published size for its hub name;
    anything else is a CheckpointError saying how to make it known."""
    path = Path(source)
    if path.is_dir():
        return model_config_from_hf(read_hf_config(path), dropout, path / "config.json")
    if HUB_NAME.fullmatch(source):
        snapshot = cached_snapshot(source, ("config.json",))
        if snapshot is not None:
            return model_config_from_hf(read_hf_config(snapshot), dropout, snapshot / "config.json")
        if source in OPENAI_SIZES:
            n_layer, n_head, n_embd = OPENAI_SIZES[source]
            return ModelConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=1024, vocab_size=50257,
                               dropout=dropout, bias=True)
    raise CheckpointError(f"init_from {source!r}: its architecture is not on this machine (no directory with a "
                          "config.json there, nothing in the Hugging Face cache); download it first, or plan a "
                          "hub name: --train.init_from='\"gpt2-medium\"' plans OpenAI's published size")


HF_KEYS = {"n_layer": "n_layer", "n_head": "n_head", "n_embd": "n_embd", "block_size": "n_positions",
           "vocab_size": "vocab_size"}  # ModelConfig's name -> config.json's


def model_config_from_hf(hf: dict, dropout: float, source: str | Path = "config.json") -> ModelConfig:
    """The ModelConfig of a Hugging Face GPT-2 config.json, validated as a config file is: a
    CheckpointError naming the file and its key otherwise."""
    for ours, theirs in HF_KEYS.items():
        if type(hf.get(theirs)) is not int:
            raise CheckpointError(f"init_from {source}: {theirs} must be an integer, got {hf.get(theirs)!r}")
    cfg = ModelConfig(**{ours: hf[theirs] for ours, theirs in HF_KEYS.items()}, dropout=dropout, bias=True)

    def fail(key: str, problem: str) -> None:
        name = key.removeprefix("model.")
        problem = problem.replace("model.n_head", "n_head")
        raise CheckpointError(f"init_from {source}: {HF_KEYS.get(name, name)} {problem}")

    cfg.validate(fail)
    return cfg


def check_hf_weights_present(folder: Path) -> None:
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise CheckpointError(f"init_from {folder}: neither model.safetensors nor pytorch_model.bin is there")


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    safetensors_path, bin_path = folder / "model.safetensors", folder / "pytorch_model.bin"
    if safetensors_path.exists():
        from safetensors.torch import load_file

        try:
            weights = load_file(str(safetensors_path))
        except Exception as e:  # safetensors raises its own error types for a damaged file
            raise CheckpointError(f"init_from {safetensors_path}: unreadable ({e})") from None
    elif bin_path.exists():
        try:
            weights = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"init_from {bin_path}: unreadable ({str(e).splitlines()[0]})") from None
    else:
        check_hf_weights_present(folder)
    # The hub's gpt2 files name keys without the "transformer." prefix; save_pretrained adds it.
    return {k.removeprefix("transformer."): v for k, v in weights.items()}


def load_hf_into(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy a Hugging Face GPT-2 checkpoint into `model`, whose config must match it."""
    folder = Path(folder)
    weights = read_hf_weights(folder)
    cfg = model.config
    expected = {"wte.weight", "wpe.weight", "ln_f.weight", "ln_f.bias"}
    for i in range(cfg.n_layer):
        for name in ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", *CONV1D_WEIGHTS,
                     "attn.c_attn.bias", "attn.c_proj.bias", "mlp.c_fc.bias", "mlp.c_proj.bias"):
            expected.add(f"h.{i}.{name}")
    missing = sorted(expected - weights.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CheckpointError(f"init_from {folder}: the weights lack {shown}")
    ours = model.state_dict()
    with torch.no_grad():
        for name in sorted(expected):
            tensor = weights[name]
            if any(name.endswith(w) for w in CONV1D_WEIGHTS):
                tensor = tensor.t()  # Conv1D stores (in, out); nn.Linear holds (out, in)
            target = ours[f"transformer.{name}"]
            if name == "wte.weight":  # our embedding is padded to a multiple of 64 rows
                target = target[: tensor.shape[0]]
            if target.shape != tensor.shape:
                raise CheckpointError(f"init_from {folder}: {name} has shape {tuple(tensor.shape)}, "
                                      f"config.json implies {tuple(target.shape)}")
            target.copy_(tensor)
        model.transformer.wte.weight[cfg.vocab_size:].zero_()


EOT_ID = 50256  # GPT-2's <|endoftext|>


def hf_config_of(cfg: ModelConfig) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
        "n_inner": None, "activation_function": "gelu_new", "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout, "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "scale_attn_weights": True, "use_cache": True, "tie_word_embeddings": True, "torch_dtype": "float32",
        # GPT-2's end-of-text id, where the model's vocabulary holds it (a small vocabulary does not)
        **({"bos_token_id": EOT_ID, "eos_token_id": EOT_ID} if EOT_ID < cfg.vocab_size else {}),
    }


def export_hf(model_state: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path,
              force: bool = False) -> Path:
    """Write config.json and model.safetensors that GPT2LMHeadModel.from_pretrained loads. A model
    trained without biases is written with zero biases: the same function. Only OpenAI's
    architecture (model.arch = "gpt2") has a Hugging Face GPT-2 to become; anything else is
    refused before a file is written. The directory appears whole or not at all (written beside
    it, then renamed into place); an existing one is replaced only with `force`."""
    from safetensors.torch import save_file

    if cfg.arch != "gpt2":
        switches = ", ".join(f"{k} = {getattr(cfg, k)!r}" for k, v in GPT2_SWITCHES.items() if getattr(cfg, k) != v)
        raise CheckpointError(f"export: a model.arch = {cfg.arch!r} model ({switches}) has no Hugging Face GPT-2 "
                              "equivalent; gptfast's own checkpoint runs as it is in `python -m gptfast.sample` "
                              "and `python -m gptfast.eval`")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export: {out} is a file, not a directory; name a directory to export into")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise CheckpointError(f"export: {out} already holds files (an earlier export?); pass --force to replace "
                              "it, or name a new directory")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        if not key.startswith("transformer."):
            continue  # lm_head.weight is the tied wte
        name = key.removeprefix("transformer.")
        if name == "wte.weight":
            value = value[: cfg.vocab_size]
        if any(name.endswith(w) for w in CONV1D_WEIGHTS):
            value = value.t()
        tensors[key] = value.detach().to(torch.float32).contiguous().clone()
    if not cfg.bias:
        for i in range(cfg.n_layer):
            for name, size in (("ln_1", cfg.n_embd), ("ln_2", cfg.n_embd), ("attn.c_attn", 3 * cfg.n_embd),
                               ("attn.c_proj", cfg.n_embd), ("mlp.c_fc", 4 * cfg.n_embd), ("mlp.c_proj", cfg.n_embd)):
                tensors.setdefault(f"transformer.h.{i}.{name}.bias", torch.zeros(size))
        tensors.setdefault("transformer.ln_f.bias", torch.zeros(cfg.n_embd))
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    replaced = out.parent / f".{out.name}.replaced-{os.getpid()}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        os.chmod(staging / "model.safetensors", default_file_mode())  # safetensors writes 0600; config.json is 0644
        (staging / "config.json").write_text(json.dumps(hf_config_of(cfg), indent=2) + "\n")
        if out.exists():
            os.replace(out, replaced)
        os.replace(staging, out)
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        if replaced.exists() and not out.exists():
            os.replace(replaced, out)  # put the earlier export back
        raise CheckpointError(f"export to {out} failed: {e.strerror or e}; {out} is as it was") from None
    shutil.rmtree(replaced, ignore_errors=True)
    return out
