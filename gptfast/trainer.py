"""The training loop: accumulation, clipping, schedule, evaluation, metrics, checkpoints, resume."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gptfast import checkpoint as ckpt
from gptfast.config import Config, to_toml
from gptfast.data import TokenLoader, ensure_prepared, get_tokenizer
from gptfast.errors import CheckpointError, ConfigError, RunDirError, TrainingDiverged
from gptfast.hardware import mfu, peak_bf16_flops
from gptfast.model import GPT, triton_unavailable_reason
from gptfast.optim import FusedAdamW, build_optimizer, lr_at

AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 when run alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls) -> "DistInfo":
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(name: str) -> torch.device:
    """`auto` -> cuda when present, else cpu; asking for CUDA on a machine without it is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device = {name!r} but this machine has no CUDA device: for a CPU run "
                              "use configs/cpu_smoke.toml, or add --train.device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device = {name!r} but only {torch.cuda.device_count()} CUDA devices exist")
    return device


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def prepare_run_dir(out_dir: Path) -> None:
    """Create `out_dir`, prove it is writable before any training time is spent, and clear the
    temporary files a killed run left half-written (they were never renamed into place)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
        for leftover in out_dir.glob(".*.tmp"):
            leftover.unlink()
    except OSError as e:
        raise RunDirError(f"train.out_dir {str(out_dir)!r} cannot be written: {e.strerror or e}") from None


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    train_loss: float | None  # loss of the last logged step
    val_loss: float | None  # the last evaluation
    sample: str  # text sampled at the end ("" when train.sample_tokens is 0, or when stopped)
    stopped: bool = False  # stopped early on request (a signal), after writing a checkpoint
    checkpoint: Path | None = None  # the last checkpoint written


def _silent(_: str) -> None:
    pass


def _fmt(value: float | None, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def _finite_or_none(value: float) -> float | None:
    """NaN and Inf are not JSON: metrics.jsonl records them as null."""
    return value if math.isfinite(value) else None


class Trainer:
    """Builds everything a run needs from a Config, then `run()` trains to train.max_steps."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.dist = DistInfo.from_env()
        if not self.dist.main:  # one voice: rank 0 logs, evaluates and writes files
            log = _silent
        self.cfg, self.log = cfg, log
        t = cfg.train
        self.device = resolve_device(t.device)
        if self.dist.world_size > 1:
            self.device = self._init_distributed(cfg)
        self.out_dir = Path(t.out_dir)
        # CPU has no fast bf16 matmuls worth the rounding, so the CPU path trains in fp32.
        self.amp_dtype = AUTOCAST_DTYPES.get(t.dtype) if self.device.type == "cuda" else None
        if self.device.type == "cpu" and t.dtype != "float32":
            log(f"device cpu: training in float32 (train.dtype = {t.dtype} applies on CUDA)")
        torch.manual_seed(t.seed)

        if t.init_from:  # the architecture is the pretrained checkpoint's, on resume too
            from gptfast import hf

            hf_model = hf.model_config_from_hf(hf.read_hf_config(Path(t.init_from)), cfg.model.dropout)
            cfg = dataclasses.replace(cfg, model=hf_model)
        if t.memory_budget:
            cfg = self._apply_memory_plan(cfg)
        self.cfg, t = cfg, cfg.train
        self.model = GPT(cfg.model, cfg.kernels, cfg.checkpointing).to(self.device)
        reason = triton_unavailable_reason(self.device)
        triton_ops = [name for name in ("layernorm", "cross_entropy", "adamw") if getattr(cfg.kernels, name)]
        if triton_ops and reason:
            log(f"kernels {', '.join(triton_ops)}: {reason}; this {self.device.type} run uses PyTorch's ops")
        elif triton_ops:
            log(f"Triton kernels: {', '.join(triton_ops)}")
        log(f"model: {self.model.num_params():,} parameters ({cfg.model.n_layer} layers, "
            f"{cfg.model.n_head} heads, {cfg.model.n_embd} wide, context {cfg.model.block_size})")
        log(f"tokens per optimizer step: {cfg.tokens_per_step:,} = {t.micro_batch_size} micro-batch x "
            f"{t.grad_accum_steps} accumulation x {cfg.model.block_size} context")

        if self.dist.main:  # rank 0 prepares a missing dataset; the others wait for it
            ensure_prepared(cfg.data, log=log)
        self._barrier()
        folder = ensure_prepared(cfg.data, log=log)
        self.loader = TokenLoader(folder, cfg.model.vocab_size, cfg.model.block_size,
                                  t.micro_batch_size, t.seed, self.device)
        if self.dist.main:  # only once the data is known good: bad input leaves nothing behind
            prepare_run_dir(self.out_dir)
        self._barrier()

        self.optimizer = build_optimizer(self.model, cfg.optim, self.device,
                                         triton_adamw=cfg.kernels.adamw and reason is None)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.step = 0
        self.val_loss: float | None = None
        self.bad_steps = 0  # consecutive optimizer steps skipped for a non-finite loss or norm
        self.skipped_steps = 0  # all skipped steps since this process started
        self.stop_requested = False  # set by a signal handler: finish the step, checkpoint, return
        if t.resume:
            self._resume()
        elif self.dist.main:
            self._set_aside_previous_run()
        if t.init_from and self.step == 0:
            from gptfast import hf

            hf.load_hf_into(self.model, t.init_from)
            log(f"initialised from {t.init_from} (fresh optimizer, step 0)")
        if self.dist.main:
            self._write_config()
        self._barrier()
        if self.dist.world_size > 1:
            if self.step == 0:  # each rank its own dropout stream; rank 0's is the one checkpoints keep
                torch.manual_seed(t.seed + 1_000_003 * self.dist.rank)
            elif self.dist.rank:
                # Only rank 0's RNG state is checkpointed: with dropout > 0 the other ranks' masks
                # after a resume differ from an uninterrupted run's (without dropout it is exact).
                torch.manual_seed(t.seed + 1_000_003 * self.dist.rank + self.step)
            ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.train_model = torch.compile(ddp) if t.compile else ddp
            self.eval_model = self.model  # rank 0 evaluates alone: no DDP wrapper, no collectives
        else:
            self.train_model = torch.compile(self.model) if t.compile else self.model
            self.eval_model = self.train_model
        self.flops_per_token = self.model.flops_per_token()
        self.peak_flops = peak_bf16_flops(torch.cuda.get_device_name(self.device)) if self.device.type == "cuda" else None

    def _init_distributed(self, cfg: Config) -> torch.device:
        """Join the torchrun job: NCCL on CUDA (one GPU per rank), gloo on CPU; accumulation is split
        across ranks so tokens per optimizer step stay as configured."""
        world = self.dist.world_size
        if cfg.train.grad_accum_steps % world:
            raise ConfigError(f"train.grad_accum_steps = {cfg.train.grad_accum_steps} is not divisible by the "
                              f"{world} processes: tokens per step could not stay as configured; use a multiple of {world}")
        device = self.device
        if device.type == "cuda":
            device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        self.log(f"distributed: {world} processes ({dist.get_backend()}), "
                 f"{cfg.train.grad_accum_steps // world} micro-batches each per optimizer step")
        return device

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    def _apply_memory_plan(self, cfg: Config) -> Config:
        """train.memory_budget: the fastest micro-batch and checkpointing policy predicted to fit,
        printed first; tokens per optimizer step stay as configured."""
        from gptfast import memory

        act_bytes = 2 if self.amp_dtype is not None else 4
        chosen = memory.plan(cfg, memory.budget_bytes(cfg.train.memory_budget, "train.memory_budget"), act_bytes)
        memory.format_plan(chosen, self.log)
        return memory.apply_plan(cfg, chosen.choice)

    # -- run directory ---------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.jsonl"

    def _write_config(self) -> None:
        text = to_toml(self.cfg).encode()
        ckpt.atomic_write_bytes(self.out_dir / "config.toml", lambda f: f.write(text))

    def _set_aside_previous_run(self) -> None:
        """train.resume = false starts over; an earlier run's files move to old_<n>/, not deleted."""
        previous = ckpt.list_checkpoints(self.out_dir)
        previous += [ckpt.checksum_path(p) for p in previous if ckpt.checksum_path(p).exists()]
        if self.metrics_path.exists():
            previous.append(self.metrics_path)
        if not previous:
            return
        n = 1
        while (self.out_dir / f"old_{n}").exists():
            n += 1
        keep = self.out_dir / f"old_{n}"
        keep.mkdir()
        for path in previous:
            path.rename(keep / path.name)
        self.log(f"train.resume = false: moved the previous run's files to {keep}")

    def _resume(self) -> None:
        """Continue from the newest readable checkpoint; a corrupt one is reported and skipped."""
        candidates = ckpt.list_checkpoints(self.out_dir)
        state, errors = None, []
        for path in reversed(candidates):
            try:
                state = ckpt.load_checkpoint(path)
                break
            except CheckpointError as e:
                errors.append(str(e))
                self.log(f"warning: {e}; trying the previous checkpoint")
        if state is None:
            if errors:
                raise CheckpointError(f"no readable checkpoint in {self.out_dir}: {errors[0]}")
            return
        ckpt.check_same_model(state["config"]["model"], self.cfg.to_dict()["model"], state["path"])
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise CheckpointError(f"{state['path']} was written by a run of {saved_world} processes; resume it with "
                                  f"{saved_world} (this run has {self.dist.world_size})")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{state['path']} does not fit this model: {e}") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = state["step"]
        self.val_loss = state.get("val_loss")
        if self.dist.main:
            self._truncate_metrics(self.step)
        self.log(f"resumed from {state['path']} at step {self.step}")

    def _truncate_metrics(self, step: int) -> None:
        """Drop records of steps after the checkpoint: the resumed run writes them again."""
        if not self.metrics_path.exists():
            return
        lines = self.metrics_path.read_text().splitlines(keepends=True)
        kept = "".join(line for line in lines if line.strip() and json.loads(line)["step"] <= step).encode()
        ckpt.atomic_write_bytes(self.metrics_path, lambda f: f.write(kept))

    def _record(self, record: dict) -> None:
        if not self.dist.main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def save(self) -> Path:
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
        if not bool(finite):  # a skipped step never changes the weights, so this is a bug, not bad luck
            raise TrainingDiverged(f"step {self.step}: the weights hold NaN or Inf; no checkpoint was written")
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "val_loss": self.val_loss,
            "rng": rng,
            "world_size": self.dist.world_size,
            # The loader is a pure function of (seed, step): its whole state is these two numbers.
            "loader": {"seed": self.cfg.train.seed, "step": self.step},
        }
        return ckpt.save_checkpoint(state, self.out_dir, self.step, self.cfg.train.keep_checkpoints)

    # -- training --------------------------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """One optimizer step over grad_accum_steps micro-batches. Returns (mean loss, grad norm,
        applied): the first two as device tensors; `applied` is False when the loss or the
        gradient norm was NaN/Inf and the update was skipped, leaving parameters and optimizer
        state untouched. Deciding that costs the one host sync of the step."""
        t, o = self.cfg.train, self.cfg.optim
        lr = lr_at(self.step, o)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        # Each rank takes its share of the step's micro-batches; the windows are those a single
        # process would draw (the loader is a function of the global micro-step index).
        local_steps = t.grad_accum_steps // self.dist.world_size
        for i in range(local_steps):
            x, y = self.loader.batch("train", self.step, self.dist.rank * local_steps + i)
            # DDP averages gradients over ranks, so each rank divides by its own share
            with self._no_sync(last=i == local_steps - 1), self.autocast():
                loss = self.train_model(x, y) / local_steps
            loss_sum += loss.detach()
            with self._no_sync(last=i == local_steps - 1):
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
        if self.dist.world_size > 1:  # the mean loss over ranks, and whether any rank was asked to stop
            shared = torch.stack([loss_sum, torch.tensor(float(self.stop_requested), device=self.device)])
            dist.all_reduce(shared)
            loss_sum = shared[0] / self.dist.world_size
            self.stop_requested = bool(shared[1] > 0)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        fused = isinstance(self.optimizer, FusedAdamW)
        if fused:  # FusedAdamW clips inside its step, reusing this norm
            grad_norm = self.optimizer.compute_grad_norm()
        elif o.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
        else:  # the norm is still logged; computing it does not rescale the gradients
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
        # Under float16 an overflowing gradient is the loss scaler's business (it skips the step
        # and lowers the scale); only the loss itself is checked there.
        checked = loss_sum if self.scaler is not None else torch.stack([loss_sum, grad_norm.float()])
        applied = bool(torch.isfinite(checked).all())
        if applied:
            self._optimizer_step()
        elif fused:
            self.optimizer.discard_grad_norm()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum, grad_norm, applied

    def _no_sync(self, last: bool):
        """Skip DDP's gradient all-reduce on every micro-step but the step's last."""
        model = self.train_model
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
        if isinstance(model, DistributedDataParallel) and not last:
            return model.no_sync()
        return contextlib.nullcontext()

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when the fp16 gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over the fixed val batches (the same windows at every evaluation)."""
        self.model.eval()
        total = 0.0
        for i in range(self.cfg.train.eval_steps):
            x, y = self.loader.batch("val", step=i)
            with self.autocast():
                total += self.eval_model(x, y).item()
        self.model.train()
        return total / self.cfg.train.eval_steps

    @torch.no_grad()
    def sample(self, max_new_tokens: int, temperature: float = 0.8, top_k: int = 200) -> str:
        enc = get_tokenizer()
        self.model.eval()
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.train.seed)
        idx = torch.tensor([[enc.eot_token]], device=self.device)
        with self.autocast():
            out = self.model.generate(idx, max_new_tokens, temperature, top_k, generator=generator)
        self.model.train()
        return enc.decode(out[0, 1:].tolist())

    def run(self) -> TrainResult:
        """Train to train.max_steps, or until `stop_requested` is set (by a signal handler): then
        the current step finishes, a checkpoint is written and the result says `stopped`."""
        t = self.cfg.train
        self.model.train()
        if self.step >= t.max_steps:
            self.log(f"nothing to do: step {self.step} >= train.max_steps = {t.max_steps}")
        tokens_per_step = self.cfg.tokens_per_step
        train_loss, checkpoint = None, None
        last_time, last_step = time.perf_counter(), self.step
        while self.step < t.max_steps:
            loss, grad_norm, applied = self.train_step()
            done = self.step == t.max_steps
            if not applied:
                self._skipped_step(loss, grad_norm)
            else:
                self.bad_steps = 0
            if self.step % t.log_interval == 0 or done:
                train_loss = loss.item()  # the step has synced already: this read is free
                now = time.perf_counter()
                step_time = (now - last_time) / (self.step - last_step)
                last_time, last_step = now, self.step
                tokens_per_second = tokens_per_step / step_time
                record = {
                    "step": self.step, "loss": _finite_or_none(train_loss), "lr": lr_at(self.step - 1, self.cfg.optim),
                    "grad_norm": _finite_or_none(grad_norm.item()), "tokens_per_second": tokens_per_second,
                    "mfu": mfu(self.flops_per_token, tokens_per_second, self.peak_flops),
                    "peak_memory_bytes": (torch.cuda.max_memory_allocated(self.device)
                                          if self.device.type == "cuda" else None),
                    "eta_seconds": step_time * (t.max_steps - self.step), "skipped_steps": self.skipped_steps,
                }
                self._record(record)
                self.log(self._format(record))
            if (self.step % t.eval_interval == 0 or done) and self.dist.main:
                self.val_loss = self.evaluate()
                self._record({"step": self.step, "val_loss": _finite_or_none(self.val_loss)})
                self.log(f"step {self.step} | val loss {self.val_loss:.4f}")
            saved_now = self.step % t.checkpoint_interval == 0 or done
            if (saved_now or self.stop_requested) and self.dist.main:
                checkpoint = self.save()
                self.log(f"step {self.step} | checkpoint {checkpoint}")
            if self.stop_requested and not done:
                return TrainResult(self.step, train_loss, self.val_loss, "", stopped=True, checkpoint=checkpoint)
        text = ""
        self._barrier()
        if t.sample_tokens and self.dist.main:
            text = self.sample(t.sample_tokens)
            self.log(f"sample ({t.sample_tokens} tokens):\n{text}")
        return TrainResult(self.step, train_loss, self.val_loss, text, checkpoint=checkpoint)

    def _skipped_step(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.bad_steps += 1
        self.skipped_steps += 1
        self._record({"step": self.step, "skipped": True, "loss": _finite_or_none(loss.item()),
                      "grad_norm": _finite_or_none(grad_norm.item())})
        self.log(f"step {self.step} | non-finite loss {loss.item()} or gradient norm {grad_norm.item()}: update "
                 f"skipped ({self.bad_steps} in a row, {self.skipped_steps} in this run)")
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            last = ckpt.latest_checkpoint(self.out_dir)
            raise TrainingDiverged(
                f"{self.bad_steps} optimizer steps in a row (up to step {self.step}) had a NaN or Inf loss or "
                f"gradient norm (train.max_bad_steps = {self.cfg.train.max_bad_steps}); the run stopped. "
                + (f"The last good checkpoint is {last}: lower optim.lr or raise optim.warmup_steps and resume."
                   if last else "No checkpoint was written yet."))

    def _format(self, r: dict) -> str:
        parts = [f"step {r['step']}/{self.cfg.train.max_steps}", f"loss {_fmt(r['loss'], '.4f')}",
                 f"lr {r['lr']:.2e}", f"grad norm {_fmt(r['grad_norm'], '.3f')}",
                 f"{r['tokens_per_second']:,.0f} tok/s"]
        if r["mfu"] is not None:
            parts.append(f"mfu {100 * r['mfu']:.1f}%")
        if r["peak_memory_bytes"] is not None:
            parts.append(f"peak mem {r['peak_memory_bytes'] / 2**30:.2f} GiB")
        parts.append(f"eta {format_duration(r['eta_seconds'])}")
        if r["skipped_steps"]:
            parts.append(f"skipped {r['skipped_steps']}")
        return " | ".join(parts)
