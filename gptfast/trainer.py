"""The training loop: accumulation, clipping, schedule, the health guard, evaluation, checkpoints.

`Trainer(cfg)` does, in this order: place the process (device, torchrun rank), resolve the config
(init_from's architecture, the memory plan) and check it fits the device, open the data, claim
the run directory, build the model and optimizer, restore the newest healthy checkpoint (or start
over), and wrap the model for training. Everything that can reject the user's input runs before
the run directory is touched. `run()` then trains to train.max_steps.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from gptfast import checkpoint as ckpt
from gptfast.config import Config, config_changes, to_toml
from gptfast.data import TokenLoader, dataset_dir, ensure_prepared, get_tokenizer
from gptfast.device import (DistInfo, autocast_dtype, cpu_threads, device_name, join_process_group,
                            resolve_device)
from gptfast.errors import CheckpointError, ConfigError, TrainingDiverged
from gptfast.hardware import mfu, peak_bf16_flops
from gptfast.health import HealthGuard, Verdict
from gptfast.loggers import Loggers, check_backends
from gptfast.metrics import finite_or_none, format_duration, format_step
from gptfast.model import GPT, LOSS_CHUNK_BYTES, triton_unavailable_reason
from gptfast.optim import FusedAdamW, build_optimizer, lr_at, lr_factor
from gptfast.progress import Progress, cpu_matmul_flops, projected_seconds
from gptfast.resolve import resolve_config
from gptfast.rundir import RunDir


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    train_loss: float | None  # loss of the last logged step
    val_loss: float | None  # the last evaluation
    sample: str  # text sampled at the end ("" when train.sample_tokens is 0, or when stopped)
    stopped: bool = False  # stopped early on request (a signal), after writing a checkpoint
    checkpoint: Path | None = None  # the last checkpoint written
    summary: dict | None = None  # the end-of-run summary record (see Trainer._summary)


def _silent(_: str) -> None:
    pass


class Trainer:
    """Builds everything a run needs from a Config, then `run()` trains to train.max_steps."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.dist = DistInfo.from_env()
        self.log = log if self.dist.main else _silent  # one voice: rank 0 logs, evaluates, writes
        self.device = self._place_process(cfg)
        self.amp_dtype = autocast_dtype(self.device, cfg.train.dtype)
        self.cfg = resolve_config(cfg, self.device, self.amp_dtype, self.log)
        check_backends(self.cfg.log)
        self.hellaswag_items = self._hellaswag_items()
        self.loader = self._open_data()
        self.run_dir = self._claim_run_dir()
        self._build()
        self._start_or_resume()
        self._wrap_for_training()

    # -- construction, in the order __init__ runs it ---------------------------------------------

    def _place_process(self, cfg: Config) -> torch.device:
        device = resolve_device(cfg.train.device)
        if device.type == "cpu" and cfg.train.dtype != "float32":
            self.log(f"device cpu: training in float32 (train.dtype = {cfg.train.dtype} applies on CUDA)")
        if device.type == "cpu" and cpu_threads(self.dist) != torch.get_num_threads():
            torch.set_num_threads(cpu_threads(self.dist))
            self.log(f"device cpu: {torch.get_num_threads()} threads per process")
        world = self.dist.world_size
        if world > 1:
            if cfg.train.grad_accum_steps % world:
                raise ConfigError(f"train.grad_accum_steps = {cfg.train.grad_accum_steps} is not divisible by the "
                                  f"{world} processes: tokens per step could not stay as configured; use a "
                                  f"multiple of {world}")
            device = join_process_group(device, self.dist)
            self.log(f"distributed: {world} processes ({dist.get_backend()}), "
                     f"{cfg.train.grad_accum_steps // world} micro-batches each per optimizer step")
        return device

    def _hellaswag_items(self) -> list | None:
        """The HellaSwag items evaluated during training, read (or downloaded) before anything else
        is touched, so a missing offline file is one error at the start."""
        e = self.cfg.eval
        if not e.hellaswag_interval or not self.dist.main:
            return None
        from gptfast import hellaswag

        path = hellaswag.data_file("val", e.hellaswag_input or None, self.log)
        return hellaswag.read_items(path, e.hellaswag_limit or None)

    def _open_data(self) -> TokenLoader:
        """Rank 0 prepares a missing dataset while the others wait; then every rank checks it."""
        cfg, t = self.cfg, self.cfg.train
        if self.dist.main:
            ensure_prepared(cfg.data, log=self.log)
        self._barrier()
        return TokenLoader(dataset_dir(cfg.data), cfg.model.vocab_size, cfg.model.block_size,
                           t.micro_batch_size, t.seed, self.device)

    def _claim_run_dir(self) -> RunDir:
        """Only once the input is known good: bad input leaves nothing behind. Rank 0 owns the files."""
        run_dir = RunDir(self.cfg.train.out_dir, self.log)
        if self.dist.main:
            run_dir.acquire()
        self._barrier()
        return run_dir

    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)
        self.model = GPT(cfg.model, cfg.kernels, cfg.recompute).to(self.device)
        if t.memory_budget:  # planned: the loss keeps to the chunk the planner counted
            self.model.loss_chunk_bytes = LOSS_CHUNK_BYTES
        reason = triton_unavailable_reason(self.device)
        triton_ops = [name for name in ("layernorm", "cross_entropy", "adamw") if getattr(cfg.kernels, name)]
        if triton_ops and reason:
            self.log(f"kernels {', '.join(triton_ops)}: {reason}; this {self.device.type} run uses PyTorch's ops")
        elif triton_ops:
            self.log(f"Triton kernels: {', '.join(triton_ops)}")
        self.log(f"model: {self.model.num_params():,} parameters ({cfg.model.n_layer} layers, "
                 f"{cfg.model.n_head} heads, {cfg.model.n_embd} wide, context {cfg.model.block_size})")
        self.log(f"tokens per optimizer step: {cfg.tokens_per_step:,} = {t.micro_batch_size} micro-batch x "
                 f"{t.grad_accum_steps} accumulation x {cfg.model.block_size} context")
        self.optimizer = build_optimizer(self.model, cfg.optim, self.device,
                                         triton_adamw=cfg.kernels.adamw and reason is None)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.guard = HealthGuard(t.loss_spike_factor, t.max_param_growth)
        self.step = 0
        self.val_loss: float | None = None
        self.best_val_loss: float | None = None  # over the whole run, resumes included
        self.train_seconds = 0.0  # wall time spent in optimizer steps, over the whole run
        self.target_reached: dict | None = None  # when train.target_val_loss was reached
        self.skipped_steps = 0  # all steps skipped as unhealthy since this process started
        self.stop_requested = False  # set by a signal handler: finish the step, checkpoint, return
        self._pending_param_norm: torch.Tensor | None = None  # after the last update, not yet judged

    def _start_or_resume(self) -> None:
        t = self.cfg.train
        if t.resume:
            self._resume()
        elif self.dist.main:
            self.run_dir.set_aside_previous_run()
        if t.init_from and self.step == 0:
            from gptfast import hf

            hf.load_hf_into(self.model, t.init_from)
            self.log(f"initialised from {t.init_from} (fresh optimizer, step 0)")
        if self.dist.main:
            self.run_dir.write_config(to_toml(self.cfg))
        self.loggers = Loggers(self.cfg, self.run_dir, enabled=self.dist.main)
        self._barrier()

    def _wrap_for_training(self) -> None:
        t = self.cfg.train
        if t.compile and t.compile_scope == "blocks":
            self.model.compile_blocks()  # regional compilation: the wrappers below stay uncompiled
        compile_whole = t.compile and t.compile_scope == "model"
        if self.dist.world_size > 1:
            if self.step == 0:  # each rank its own dropout stream; rank 0's is the one checkpoints keep
                torch.manual_seed(t.seed + 1_000_003 * self.dist.rank)
            elif self.dist.rank:
                # Only rank 0's RNG state is checkpointed: with dropout > 0 the other ranks' masks
                # after a resume differ from an uninterrupted run's (without dropout it is exact).
                torch.manual_seed(t.seed + 1_000_003 * self.dist.rank + self.step)
            ddp = DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.train_model = torch.compile(ddp) if compile_whole else ddp
            self.eval_model = self.model  # rank 0 evaluates alone: no DDP wrapper, no collectives
        else:
            self.train_model = torch.compile(self.model) if compile_whole else self.model
            self.eval_model = self.train_model
        self.flops_per_token = self.model.flops_per_token()
        self.peak_flops = peak_bf16_flops(device_name(self.device)) if self.device.type == "cuda" else None

    def _barrier(self) -> None:
        if self.dist.world_size > 1:
            dist.barrier()

    # -- resume ----------------------------------------------------------------------------------

    def _resume(self) -> None:
        """Continue from the newest healthy, readable checkpoint; a corrupt one is reported and
        skipped, and newer unhealthy ones are set aside (moved, not deleted)."""
        out = self.run_dir.path
        candidates = ckpt.list_checkpoints(out, healthy_only=True)
        state, errors = None, []
        for path in reversed(candidates):
            try:
                state = ckpt.load_checkpoint(path, log=self.log)
                break
            except CheckpointError as e:
                errors.append(str(e))
                self.log(f"warning: {e}; trying the previous checkpoint")
        if state is None:
            if errors:
                raise CheckpointError(f"no readable checkpoint in {out}: {errors[0]}")
            unhealthy = ckpt.list_checkpoints(out)
            if unhealthy:
                raise CheckpointError(f"every checkpoint in {out} is marked unhealthy (newest "
                                      f"{unhealthy[-1].name}); start over with --train.resume=false")
            return
        self._check_resumable(state)
        peaks = [group["peak_lr"] for group in self.optimizer.param_groups]  # from this config, not the file
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{state['path']} does not fit this model and optimizer: {e}") from None
        for group, peak in zip(self.optimizer.param_groups, peaks, strict=True):
            group["peak_lr"] = peak
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("health"):
            self.guard.load_state_dict(state["health"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.step = state["step"]
        self.val_loss = state.get("val_loss")
        self.best_val_loss = state.get("best_val_loss", self.val_loss)
        self.train_seconds = state.get("train_seconds", 0.0)
        if self.dist.main:
            newer = ckpt.run_files(out, after_step=self.step)
            self.run_dir.set_aside(newer, f"resuming from the healthy checkpoint of step {self.step}; "
                                          "the newer, unhealthy checkpoints")
            self.run_dir.truncate_metrics(self.step)
        self.log(f"resumed from {state['path']} at step {self.step}")

    def _check_resumable(self, state: dict) -> None:
        """Same model, same world size, and no silent change to what decides the trajectory."""
        path = state["path"]
        ckpt.check_same_model(state["config"]["model"], self.cfg.to_dict()["model"], path)
        saved_world = state.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise CheckpointError(f"{path} was written by a run of {saved_world} processes; resume it with "
                                  f"{saved_world} (this run has {self.dist.world_size}), or start a new run: "
                                  "--train.out_dir=ANOTHER_DIR, or --train.resume=false (sets this run aside)")
        trajectory, other = config_changes(state["config"], self.cfg.to_dict())
        if trajectory and not self.cfg.train.allow_config_change:
            raise ConfigError(f"resuming {path} with changed settings that change the training trajectory "
                              f"({'; '.join(trajectory)}); restore them, or pass --train.allow_config_change=true, "
                              "or start over with --train.resume=false")
        for change in trajectory + other:
            self.log(f"resume: changed {change}")

    # -- checkpoints -----------------------------------------------------------------------------

    def save(self) -> Path:
        """Write the checkpoint of this step, marked unhealthy when the run is not healthy."""
        self._judge_pending_param_norm()
        healthy = self.guard.healthy
        if healthy:
            finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all()
            # the guard judged the parameter norm after the last update, so this cannot fail
            assert bool(finite), f"step {self.step}: the health guard passed non-finite weights"
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "config": self.cfg.to_dict(),
            "step": self.step,
            "val_loss": self.val_loss,
            "best_val_loss": self.best_val_loss,
            "train_seconds": self.train_seconds,
            "rng": rng,
            "world_size": self.dist.world_size,
            "healthy": healthy,
            "health": self.guard.state_dict(),
            # The loader is a pure function of (seed, step): its whole state is these two numbers.
            "loader": {"seed": self.cfg.train.seed, "step": self.step},
        }
        return ckpt.save_checkpoint(state, self.run_dir.path, self.step, self.cfg.train.keep_checkpoints, healthy)

    # -- training --------------------------------------------------------------------------------

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, Verdict]:
        """One optimizer step over grad_accum_steps micro-batches. Returns (mean loss, grad norm,
        verdict): the first two as device tensors; the update is applied only when the verdict is
        healthy, else parameters and optimizer state stay untouched. Deciding that costs the one
        host sync of the step."""
        t, o = self.cfg.train, self.cfg.optim
        factor = lr_factor(self.step, o, t.max_steps)
        for group in self.optimizer.param_groups:  # each group's own peak (AdamW's lr, Muon's muon_lr)
            group["lr"] = group["peak_lr"] * factor
        loss_sum = torch.zeros((), device=self.device)
        # Each rank takes its share of the step's micro-batches; the windows are those a single
        # process would draw (the loader is a function of the global micro-step index).
        local_steps = t.grad_accum_steps // self.dist.world_size
        progress = Progress(local_steps, f"step {self.step + 1}/{t.max_steps}: micro-batch", self.log,
                            after=self.cfg.log.progress_seconds)
        for i in range(local_steps):
            x, y = self.loader.batch("train", self.step, self.dist.rank * local_steps + i)
            # The mean over the step's micro-batches; DDP averages over ranks, so each rank divides
            # by its own share. (Mutant: without `/ local_steps` the gradients are local_steps times too
            # large: tests/test_trainer.py::test_accumulation_equals_one_large_batch.)
            with self._no_sync(last=i == local_steps - 1), self.autocast():
                loss = self.train_model(x, y) / local_steps
            loss_sum += loss.detach()
            with self._no_sync(last=i == local_steps - 1):
                if self.scaler is not None:
                    self.scaler.scale(loss).backward()
                else:
                    loss.backward()
            progress.update(i + 1)
        progress.close()
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
        verdict = self._judge(loss_sum, grad_norm)
        if verdict.healthy:
            self._optimizer_step()
            self._pending_param_norm = self._param_norm()
        elif fused:
            self.optimizer.discard_grad_norm()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss_sum, grad_norm, verdict

    def _judge(self, loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> Verdict:
        """The health verdict on this step, from one host read of (loss, grad norm, the parameter
        norm after the previous update)."""
        pending = self._pending_param_norm
        values = [loss_sum, grad_norm.float()] + ([pending] if pending is not None else [])
        host = torch.stack(values).tolist()  # the step's one host sync
        loss, norm = host[0], host[1]
        if self.scaler is not None:  # under float16 an overflowing gradient is the loss scaler's business
            norm = 0.0
        self._pending_param_norm = None
        verdict = self.guard.check_param_norm(host[2]) if pending is not None else Verdict(True)
        if verdict.healthy:
            verdict = self.guard.check_step(loss, norm)
        if not verdict.healthy and self.dist.main:
            # This loss was computed with the weights after the previous update: a checkpoint of them
            # (written at the end of the previous step) is no longer trusted.
            ckpt.mark_unhealthy(ckpt.checkpoint_path(self.run_dir.path, self.step))
        self.guard.record(verdict, loss)
        return verdict

    def _judge_pending_param_norm(self) -> None:
        """Judge the last update before a checkpoint of its weights is written (one host sync)."""
        if self._pending_param_norm is not None:
            verdict = self.guard.check_param_norm(self._pending_param_norm.item())
            self._pending_param_norm = None
            if not verdict.healthy:
                self.guard.record(verdict, float("nan"))
                self._report_unhealthy(verdict)

    @torch.no_grad()
    def _param_norm(self) -> torch.Tensor:
        norms = torch._foreach_norm([p for p in self.model.parameters()])
        return torch.linalg.vector_norm(torch.stack(norms).float())

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
        steps = self.cfg.train.eval_steps
        progress = Progress(steps, "evaluation: batch", self.log, after=self.cfg.log.progress_seconds)
        for i in range(steps):
            x, y = self.loader.batch("val", step=i)
            with self.autocast():
                total += self.eval_model(x, y).item()
            progress.update(i + 1)
        progress.close()
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
        try:
            return self._run()
        finally:
            self.close()

    def close(self) -> None:
        """Close the loggers and release the run directory for another trainer (run() does this
        when it returns)."""
        try:
            self.loggers.close()
            self.loader.close()
        finally:
            self.run_dir.release()

    def _run(self) -> TrainResult:
        t = self.cfg.train
        self.model.train()
        if self.step >= t.max_steps:
            self.log(f"nothing to do: step {self.step} >= train.max_steps = {t.max_steps}")
        else:
            self._project_duration()
        tokens_per_step = self.cfg.tokens_per_step
        train_loss, checkpoint = None, None
        session = {"start": time.perf_counter(), "first_step": self.step, "tokens_per_second": [], "mfu": []}
        last_time, last_step = time.perf_counter(), self.step
        while self.step < t.max_steps:
            step_start = time.perf_counter()
            loss, grad_norm, verdict = self.train_step()
            self.train_seconds += time.perf_counter() - step_start
            done = self.step == t.max_steps
            if not verdict.healthy:
                self._skipped_step(loss, grad_norm, verdict)
            # the first step of a session is logged too: its time is the first measured projection
            if self.step % t.log_interval == 0 or done or self.step == session["first_step"] + 1:
                train_loss = loss.item()  # the step has synced already: this read is free
                now = time.perf_counter()
                step_time = (now - last_time) / (self.step - last_step)
                last_time, last_step = now, self.step
                tokens_per_second = tokens_per_step / step_time
                record = {
                    "step": self.step, "loss": finite_or_none(train_loss), "lr": lr_at(self.step - 1, self.cfg.optim, t.max_steps),
                    "grad_norm": finite_or_none(grad_norm.item()), "tokens_per_second": tokens_per_second,
                    "mfu": mfu(self.flops_per_token, tokens_per_second, self.peak_flops),
                    "peak_memory_bytes": (torch.cuda.max_memory_allocated(self.device)
                                          if self.device.type == "cuda" else None),
                    "eta_seconds": step_time * (t.max_steps - self.step), "skipped_steps": self.skipped_steps,
                    "tokens": self.step * tokens_per_step, "elapsed_seconds": self.train_seconds,
                }
                if self.step > session["first_step"] + 1:  # the first step holds compilation and warm-up
                    session["tokens_per_second"].append(tokens_per_second)
                    session["mfu"].append(record["mfu"])
                self._record(record)
                self.log(format_step(record, t.max_steps))
            evaluated = self.step % t.eval_interval == 0 or done
            if evaluated and self.dist.main:
                self.val_loss = self.evaluate()
                if self.best_val_loss is None or self.val_loss < self.best_val_loss:
                    self.best_val_loss = self.val_loss
                self._record({"step": self.step, "val_loss": finite_or_none(self.val_loss),
                              "tokens": self.step * tokens_per_step, "elapsed_seconds": self.train_seconds})
                self.log(f"step {self.step} | val loss {self.val_loss:.4f}")
                if t.target_val_loss and self.val_loss <= t.target_val_loss and self.target_reached is None:
                    self._reached_target()
            interval = self.cfg.eval.hellaswag_interval
            if interval and (self.step % interval == 0 or done) and self.dist.main:
                self._evaluate_hellaswag()
            reached = bool(t.target_val_loss) and evaluated and self._target_reached_everywhere()
            done = done or reached
            saved_now = self.step % t.checkpoint_interval == 0 or done
            if (saved_now or self.stop_requested) and self.dist.main:
                checkpoint = self.save()
                health = "" if ckpt.is_healthy(checkpoint) else " (marked unhealthy)"
                self.log(f"step {self.step} | checkpoint {checkpoint}{health}")
            self._stop_if_diverged()
            if reached:
                break
            if self.stop_requested and not done:
                summary = self._summary(session, checkpoint)
                return TrainResult(self.step, train_loss, self.val_loss, "", stopped=True, checkpoint=checkpoint,
                                   summary=summary)
        text = ""
        self._barrier()
        if t.sample_tokens and self.dist.main:
            text = self.sample(t.sample_tokens)
            self.log(f"sample ({t.sample_tokens} tokens):\n{text}")
        summary = self._summary(session, checkpoint)
        return TrainResult(self.step, train_loss, self.val_loss, text, checkpoint=checkpoint, summary=summary)

    @torch.no_grad()
    def _evaluate_hellaswag(self) -> dict:
        """HellaSwag on the uncompiled model (items vary in length: no recompilation), logged."""
        from gptfast import hellaswag

        self.model.eval()

        def logits(ids):
            with self.autocast(), self.model.uncompiled():
                return self.model(ids)

        result = hellaswag.evaluate(logits, self.hellaswag_items, get_tokenizer(), self.cfg.model.block_size,
                                    self.device, log=self.log, progress_seconds=self.cfg.log.progress_seconds)
        self.model.train()
        self._record({"step": self.step, "hellaswag_acc": result["acc"], "hellaswag_acc_norm": result["acc_norm"],
                      "hellaswag_items": result["items"], "tokens": self.step * self.cfg.tokens_per_step})
        self.log(f"step {self.step} | hellaswag acc_norm {result['acc_norm']:.4f} (acc {result['acc']:.4f}, "
                 f"{result['items']} items)")
        return result

    def _reached_target(self) -> None:
        """train.target_val_loss reached: record what it took (rank 0)."""
        t = self.cfg.train
        hours = self.train_seconds / 3600
        self.target_reached = {
            "event": "target_reached", "step": self.step, "target_val_loss": t.target_val_loss,
            "val_loss": self.val_loss, "tokens": self.step * self.cfg.tokens_per_step,
            "train_seconds": self.train_seconds,
            "gpu_hours": hours * self.dist.world_size if self.device.type == "cuda" else None,
        }
        self._record(self.target_reached)
        gpu = f", {self.target_reached['gpu_hours']:.2f} GPU-hours" if self.target_reached["gpu_hours"] else ""
        self.log(f"target val loss {t.target_val_loss} reached at step {self.step}: val loss {self.val_loss:.4f} "
                 f"after {format_duration(self.train_seconds)} of training{gpu}, "
                 f"{self.target_reached['tokens']:,} tokens")

    def _target_reached_everywhere(self) -> bool:
        """Whether the run ends here for its target: rank 0 evaluates, every rank stops with it."""
        reached = self.target_reached is not None and self.target_reached["step"] == self.step
        if self.dist.world_size > 1:
            flag = torch.tensor(float(reached), device=self.device)
            dist.broadcast(flag, src=0)
            reached = bool(flag.item())
        return reached

    def _project_duration(self) -> None:
        """Before the first step: the run's projected wall time, an estimate from the model's FLOPs
        and the device's throughput (an assumed 40% of a GPU's bf16 peak; a measured matmul rate on
        the CPU). A projection beyond a day on a CPU, or a month on a GPU, is a warning."""
        tokens = (self.cfg.train.max_steps - self.step) * self.cfg.tokens_per_step
        if self.device.type == "cuda":
            if self.peak_flops is None:
                return
            rate, basis, limit = 0.4 * self.peak_flops, "40% of the GPU's bf16 peak", 30 * 86400
        elif self.device.type == "cpu":
            # threads share the probe's matmul rate; a step's small ops run well below it
            rate, basis, limit = 0.5 * cpu_matmul_flops(), "half this CPU's measured matmul rate", 86400
        else:
            return
        seconds = projected_seconds(self.flops_per_token, tokens, rate)
        line = (f"projected: ~{format_duration(seconds)} for {self.cfg.train.max_steps - self.step:,} steps "
                f"({tokens:,} tokens) on {self.device.type} (an estimate at {basis}; "
                "the first step's time is the measured one)")
        if seconds <= limit:
            self.log(line)
            return
        hint = ("this config is meant for a GPU: on the CPU try configs/cpu_smoke.toml, or fewer steps with "
                "--train.max_steps=N" if self.device.type == "cpu" else "fewer steps with --train.max_steps=N")
        self.log(f"warning: {line}; {hint}")

    def _summary(self, session: dict, checkpoint: Path | None) -> dict:
        """The end-of-run summary: logged as one line, recorded by every logger."""
        wall = time.perf_counter() - session["start"]
        steps = self.step - session["first_step"]
        rates, utilisations = session["tokens_per_second"], [m for m in session["mfu"] if m is not None]
        record = {
            "event": "summary", "step": self.step, "steps_this_session": steps,
            "wall_seconds": wall, "train_seconds": self.train_seconds,
            "tokens": self.step * self.cfg.tokens_per_step, "tokens_this_session": steps * self.cfg.tokens_per_step,
            "final_val_loss": finite_or_none(self.val_loss) if self.val_loss is not None else None,
            "best_val_loss": finite_or_none(self.best_val_loss) if self.best_val_loss is not None else None,
            "mean_tokens_per_second": sum(rates) / len(rates) if rates else None,
            "mean_mfu": sum(utilisations) / len(utilisations) if utilisations else None,
            "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None,
            "checkpoint": str(checkpoint) if checkpoint else None,
            "target_val_loss": self.cfg.train.target_val_loss or None,
            "target_reached_step": self.target_reached["step"] if self.target_reached else None,
            "target_reached_seconds": self.target_reached["train_seconds"] if self.target_reached else None,
            "target_reached_tokens": self.target_reached["tokens"] if self.target_reached else None,
        }
        self._record(record)
        parts = [f"summary: step {self.step} ({steps} this session) in {format_duration(wall)}",
                 f"{record['tokens_this_session']:,} tokens"]
        if record["final_val_loss"] is not None:
            parts.append(f"val loss {record['final_val_loss']:.4f} (best {record['best_val_loss']:.4f})")
        if record["mean_tokens_per_second"] is not None:
            parts.append(f"{record['mean_tokens_per_second']:,.0f} tok/s mean")
        if record["mean_mfu"] is not None:
            parts.append(f"mfu {100 * record['mean_mfu']:.1f}%")
        if record["peak_memory_bytes"] is not None:
            parts.append(f"peak mem {record['peak_memory_bytes'] / 2**30:.2f} GiB")
        if self.target_reached:
            parts.append(f"target {self.cfg.train.target_val_loss} reached at step {self.target_reached['step']} "
                         f"({format_duration(self.target_reached['train_seconds'])} of training)")
        elif self.cfg.train.target_val_loss:
            parts.append(f"target {self.cfg.train.target_val_loss} not reached")
        parts.append(f"checkpoint {checkpoint}" if checkpoint else "no checkpoint written")
        self.log(" | ".join(parts))
        return record

    def _record(self, record: dict) -> None:
        if self.dist.main:
            self.loggers.log(record)

    def _report_unhealthy(self, verdict: Verdict) -> None:
        self._record({"step": self.step, "unhealthy": verdict.reason})
        self.log(f"step {self.step} | unhealthy: {verdict.reason} ({self.guard.bad_in_a_row} in a row)")

    def _skipped_step(self, loss: torch.Tensor, grad_norm: torch.Tensor, verdict: Verdict) -> None:
        self.skipped_steps += 1
        self._record({"step": self.step, "skipped": True, "loss": finite_or_none(loss.item()),
                      "grad_norm": finite_or_none(grad_norm.item()), "reason": verdict.reason})
        self.log(f"step {self.step} | {verdict.reason}: update skipped ({self.guard.bad_in_a_row} in a row, "
                 f"{self.skipped_steps} in this run)")

    def _stop_if_diverged(self) -> None:
        t = self.cfg.train
        if self.guard.bad_in_a_row < t.max_bad_steps:
            return
        last = ckpt.latest_checkpoint(self.run_dir.path, healthy_only=True)
        raise TrainingDiverged(
            f"{self.guard.bad_in_a_row} optimizer steps in a row (up to step {self.step}) were unhealthy "
            f"(train.max_bad_steps = {t.max_bad_steps}); the run stopped. "
            + (f"The newest healthy checkpoint is {last}; rerunning the same command resumes from it "
               "(lower optim.lr or raise optim.warmup_steps first)." if last else
               "No healthy checkpoint was written; start over with a lower optim.lr."))
