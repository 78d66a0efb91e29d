"""The training loop: accumulation, the health verdict, evaluation, checkpoints.

`Trainer(cfg)` places the process (device, torchrun rank), resolves the config once
(`gptfast.resolve`), opens the data, claims the run directory, builds the model and optimizer,
restores the newest healthy checkpoint (or starts over) and wraps the model for training.
Everything that can reject the user's input runs before the run directory is touched. `run()`
then trains to train.max_steps. The parts are components of their own: the optimizer with its
schedule and clipping (`optim.ScheduledOptimizer`), the health verdict (`health.HealthMonitor`),
checkpoints (`checkpointer.Checkpointer`), records (`metrics.RunMetrics`) and data parallelism
(`distributed`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from gptfast import distributed
from gptfast.checkpointer import Checkpointer, TrainState
from gptfast.config import Config
from gptfast.configfile import to_toml
from gptfast.datasets import dataset_dir, ensure_prepared, missing_dataset_problem
from gptfast.device import DistInfo, autocast_dtype, device_name
from gptfast.errors import DataError, GptfastError, PreStartProblems
from gptfast.gradaccum import GradAccumulation
from gptfast.hardware import peak_bf16_flops
from gptfast.health import HealthGuard, HealthMonitor, Verdict
from gptfast.hellaswag import evaluate_model, hellaswag_items
from gptfast.inference import autocast, sample_text
from gptfast.loader import TokenLoader
from gptfast.loggers import Loggers, check_backends
from gptfast.metrics import RunMetrics
from gptfast.model import GPT
from gptfast.optim import build_scheduled_optimizer, lr_at
from gptfast.progress import Progress, announce
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
    summary: dict | None = None  # the end-of-run summary record (metrics.RunMetrics.summary)


def _silent(_: str) -> None:
    pass


class Trainer:
    """Builds everything a run needs from a Config, then `run()` trains to train.max_steps."""

    def __init__(self, cfg: Config, log: Callable[[str], None] = print):
        self.dist = DistInfo.from_env()
        self.log = log if self.dist.main else _silent  # one voice: rank 0 logs, evaluates, writes
        self.device, self.cfg = self._pre_start(cfg)
        self.amp_dtype = autocast_dtype(self.device, cfg.train.dtype)
        self.hellaswag_items = hellaswag_items(self.cfg.eval, self.log) if self.dist.main else None
        self.loader = self._open_data()
        try:
            self.run_dir = self._claim_run_dir()
            try:
                self._build()
                self._start_or_resume()
                self.health.baseline(self.model)  # the first update is judged against these weights
                distributed.seed_rank(self.cfg.train.seed, self.dist, self.step)
                # after any restore: the weight copies are made from the weights the run starts on
                fused = self.cfg.kernels.fused_grad_accum
                self.grad_accum = GradAccumulation(self.model, self.amp_dtype) if fused else None
                self.train_model, self.eval_model = distributed.wrap(self.model, self.cfg.train, self.dist,
                                                                     self.device, self.grad_accum)
            except BaseException:
                self.run_dir.abandon()  # a bad init_from or checkpoint leaves no held lock behind
                raise
        except BaseException:
            self.loader.close()
            raise

    # -- construction, in the order __init__ runs it ---------------------------------------------

    def _pre_start(self, cfg: Config) -> tuple[torch.device, Config]:
        """(device, resolved config), or every problem that stops the run before its start in one
        error (device, memory fit, log backends, dataset): not one problem per try."""
        problems: list[GptfastError] = []

        def attempt(check):
            try:
                return check()
            except GptfastError as e:
                problems.append(e)

        device = attempt(lambda: distributed.place_process(cfg.train, self.dist, self.log))
        resolved = None
        if device is not None:
            resolved = attempt(lambda: resolve_config(cfg, device, autocast_dtype(device, cfg.train.dtype), self.log))
        elif cfg.train.memory_budget and not cfg.train.init_from:  # no device, but the budget's plan can still fail
            from gptfast import memory

            attempt(lambda: memory.plan(cfg, memory.budget_bytes(cfg.train.memory_budget, "train.memory_budget")))
        attempt(lambda: check_backends(cfg.log))
        if problem := missing_dataset_problem(cfg.data):
            problems.append(DataError(problem))
        if problems:
            raise problems[0] if len(problems) == 1 else PreStartProblems(problems)
        return device, resolved

    def _open_data(self) -> TokenLoader:
        """Rank 0 prepares a missing dataset while the others wait; then every rank checks it."""
        cfg, t = self.cfg, self.cfg.train
        if self.dist.main:
            ensure_prepared(cfg.data, log=self.log)
        distributed.barrier(self.dist)
        loader = TokenLoader(dataset_dir(cfg.data), cfg.model.vocab_size, cfg.model.block_size, t.micro_batch_size,
                             t.seed, self.device, tokens_before=cfg.tokens_before, log=self.log, fetch=self.dist.main)
        try:
            loader.fetch_ahead(cfg.tokens_before(t.max_steps))  # an on-demand dataset's shards, in the background
        except BaseException:
            loader.close()
            raise
        return loader

    def _claim_run_dir(self) -> RunDir:
        """Only once the input is known good: bad input leaves nothing behind. Rank 0 owns the files."""
        run_dir = RunDir(self.cfg.train.out_dir, self.log)
        if self.dist.main:
            run_dir.acquire()
        distributed.barrier(self.dist)
        return run_dir

    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        torch.manual_seed(t.seed)
        self.model = GPT(cfg.model, cfg.kernels, cfg.recompute).to(self.device)
        self.log(f"model: {self.model.num_params():,} parameters ({cfg.model.n_layer} layers, "
                 f"{cfg.model.n_head} heads, {cfg.model.n_embd} wide, context {cfg.model.block_size})")
        self.log(f"tokens per optimizer step: {cfg.tokens_per_step:,} = {t.micro_batch_size} micro-batch x "
                 f"{t.grad_accum_steps} accumulation x {cfg.model.block_size} context"
                 + (f", from {cfg.tokens_at(0):,} ({t.grad_accum_start} accumulation) over the first "
                    f"{t.batch_warmup_steps} steps" if t.grad_accum_start else ""))
        float16 = self.amp_dtype == torch.float16
        self.optimizer = build_scheduled_optimizer(self.model, cfg.optim, t.max_steps, self.device,
                                                   triton_adamw=cfg.kernels.adamw, float16=float16)
        self.health = HealthMonitor(HealthGuard(t.loss_spike_factor, t.max_param_growth), loss_scaled=float16)
        self.state = TrainState()
        self.checkpointer = Checkpointer(self.run_dir, cfg, self.dist, self.device,
                                         {"model": self.model, "optimizer": self.optimizer, "health": self.health},
                                         self.state, self.log, dataset=self.loader.fingerprint)
        self.checkpointer.check_free_space("before training starts")  # not at the first checkpoint, trained for
        self.target_reached: dict | None = None  # when train.target_val_loss was reached
        self.skipped_steps = 0  # all steps skipped as unhealthy since this process started
        self.stop_requested = False  # set by a signal handler: finish the step, checkpoint, return
        self.doc_fraction = self._doc_mask_fraction()
        self.flops_per_token = self.model.flops_per_token(doc_fraction=self.doc_fraction)
        self.peak_flops = peak_bf16_flops(device_name(self.device)) if self.device.type == "cuda" else None

    def _flops_at(self, step: int) -> int:
        """Training FLOPs per token of optimizer step `step`: of its attention window."""
        return self.model.flops_per_token(self.cfg.window_at(step), self.doc_fraction)

    def _doc_mask_fraction(self) -> float:
        """The share of causal (query, key) pairs the document mask keeps, over the first 8 train
        micro-batches at the final window: the attention FLOPs it leaves are counted from it."""
        m = self.cfg.model
        if not m.doc_mask:
            return 1.0
        from gptfast.model import attention_mask, document_ids

        kept = windowed = 0
        for i in range(8):
            x, _ = self.loader.batch("train", 0, i)
            x = x.cpu()
            positions = torch.arange(x.size(1))
            kept += int(attention_mask(positions, x.size(1), m.final_window, document_ids(x, m.eot_token)).sum())
            windowed += x.size(0) * int(attention_mask(positions, x.size(1), m.final_window, None).sum())
        return kept / windowed

    def _start_or_resume(self) -> None:
        t = self.cfg.train
        resumed = t.resume and self.checkpointer.restore()  # the newest healthy checkpoint, if there is one
        if t.init_from and self.step == 0:  # before anything moves: a bad init_from leaves the directory as it was
            from gptfast import hf

            hf.load_hf_into(self.model, t.init_from)
            self.log(f"initialised from {t.init_from} (fresh optimizer, step 0)")
        if self.dist.main and not resumed:
            if t.resume:  # nothing to resume from: metrics an earlier run left without a checkpoint go aside
                self.run_dir.set_aside([self.run_dir.metrics_path], "starting at step 0; the metrics of an earlier "
                                                                    "run that wrote no checkpoint")
            else:
                self.run_dir.set_aside_previous_run()
        if self.dist.main:
            self.run_dir.write_config(to_toml(self.cfg))
        self.loggers = Loggers(self.cfg, self.run_dir, enabled=self.dist.main)
        distributed.barrier(self.dist)

    @property
    def step(self) -> int:
        return self.state.step

    def _record(self, record: dict) -> None:
        if self.dist.main:
            self.loggers.log(record)

    # -- one optimizer step ----------------------------------------------------------------------

    def train_step(self) -> tuple[torch.Tensor, torch.Tensor, Verdict]:
        """One optimizer step over grad_accum_steps micro-batches. Returns (mean loss, grad norm,
        verdict): the first two as device tensors; the update is applied only when the verdict is
        healthy, else parameters and optimizer state stay untouched. Deciding that costs the one
        host sync of the step."""
        t = self.cfg.train
        self.optimizer.set_lr(self.step)
        if self.cfg.model.masked_attention:
            self.model.set_window(self.cfg.window_at(self.step))
        # Each rank takes its share of the step's micro-batches (the batch-size schedule's count at
        # this step); the windows are those a single process would draw (the loader is a function
        # of the global micro-step index).
        local_steps = self.cfg.grad_accum_at(self.step) // self.dist.world_size
        progress = Progress(local_steps, f"step {self.step + 1}/{t.max_steps}: micro-batch", self.log,
                            after=self.cfg.log.progress_seconds)
        loss_sum = torch.zeros((), device=self.device)
        # the loss's upstream gradient is exactly 1 / local_steps (fp16's loss scaler multiplies it)
        self.model.loss_grad_scale = 0.0 if self.amp_dtype == torch.float16 else 1.0 / local_steps
        if self.grad_accum:
            self.grad_accum.begin_step()
        for i in range(local_steps):
            x, y = self.loader.batch("train", self.step, self.dist.rank * local_steps + i)
            # The mean over the step's micro-batches; DDP averages over ranks, so each rank divides
            # by its own share. (Mutant: without `/ local_steps` the gradients are local_steps times too
            # large: tests/test_trainer.py::test_accumulation_equals_one_large_batch.)
            with distributed.no_sync(self.train_model, last=i == local_steps - 1):
                with autocast(self.device, self.amp_dtype):
                    loss = self.train_model(x, y) / local_steps
                loss_sum += loss.detach()
                self.optimizer.backward(loss)
            progress.update(i + 1)
        progress.close()
        self.model.loss_grad_scale = 0.0  # a backward outside the step (a test's, a user's) promises nothing
        if self.grad_accum and self.dist.world_size > 1:
            self.grad_accum.all_reduce(self.dist.world_size)  # the weights DDP leaves alone
        loss_sum, stop = distributed.mean_loss_and_stop(loss_sum, self.stop_requested, self.dist)
        grad_norm = self.optimizer.clip_and_norm()
        verdict, stop_votes = self.health.judge(loss_sum, grad_norm, also=stop)  # the step's one host sync
        self.stop_requested = self.stop_requested or bool(stop_votes)
        if verdict.healthy:
            self.optimizer.step()
            if self.grad_accum:
                self.grad_accum.refresh()  # the next step's forward reads the updated weights' copies
            self.health.updated(self.model)
        else:  # not stepped on: zero_grad below drops them (and FusedAdamW's norm of them)
            # This loss was computed with the weights after the previous update: a checkpoint of
            # them (written at the end of the previous step) is no longer trusted.
            self.checkpointer.condemn(self.step)
        self.optimizer.zero_grad()
        self.state.step += 1
        return loss_sum, grad_norm, verdict

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        """Train to train.max_steps, or until `stop_requested` is set (by a signal handler): then
        the current step finishes, a checkpoint is written and the result says `stopped`."""
        try:
            result = self._run()
        except BaseException:
            try:
                self.close()
            except Exception as e:  # the run's own error is the one to say; this one is logged
                self.log(f"warning: closing the run after its failure: {e}")
            raise
        self.close()
        return result

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
        announce(self.log, self.step, t.max_steps, self.flops_per_token,
                 self.cfg.tokens_before(t.max_steps) - self.cfg.tokens_before(self.step), self.device, self.peak_flops)
        self.metrics = RunMetrics(self.cfg, self._record, self.log, self._flops_at, self.peak_flops,
                                  self.device, first_step=self.step)
        checkpoint, reached = None, False
        while self.step < t.max_steps:
            self._data_ready()
            step_start = time.perf_counter()
            loss, grad_norm, verdict = self.train_step()
            self.state.train_seconds += time.perf_counter() - step_start
            done = self.step == t.max_steps
            if not verdict.healthy:
                self.skipped_steps += 1
                self.metrics.skipped(self.step, loss.item(), grad_norm.item(), verdict.reason,
                                     self.health.bad_in_a_row, self.skipped_steps)
            if self.metrics.due(self.step, done):  # the step has synced already: these reads are free
                self.metrics.step(self.step, loss.item(), grad_norm.item(), lr_at(self.step - 1, self.cfg.optim,
                                  t.max_steps), self.skipped_steps, self.state.train_seconds)
            reached = self._evaluate_if_due(done)
            if self.step % t.checkpoint_interval == 0 or done or reached or self.stop_requested:
                checkpoint = self.save() if self.dist.main else checkpoint
            self.health.stop_if_diverged(self.cfg.train.max_bad_steps, self.step, self.checkpointer.newest_healthy)
            if reached or (self.stop_requested and not done):
                break
        return self._finish(checkpoint, stopped=self.stop_requested and self.step < t.max_steps and not reached)

    def _data_ready(self) -> None:
        """The shards the next step reads are present; a shard that cannot be fetched stops the run
        here, between steps, with a checkpoint of this one: nothing trained is lost."""
        try:
            self.loader.ready(self.step, self.cfg.grad_accum_at(self.step))
        except DataError as e:
            written = self.save() if self.dist.main and self.step else None
            raise DataError(f"{e}; training stopped before step {self.step + 1}"
                            + (f", checkpoint {written} written: the same command resumes from it" if written else "")
                            ) from None

    def _evaluate_if_due(self, done: bool) -> bool:
        """Val loss and HellaSwag when due (rank 0); whether the target was reached now (every rank)."""
        t = self.cfg.train
        evaluated = self.step % t.eval_interval == 0 or done
        val_loss = self.evaluate() if evaluated and self.dist.main else None
        if evaluated and self.dist.main and val_loss is None:
            self.log(f"step {self.step} | evaluation stopped by the stop request: not recorded")
        if val_loss is not None:
            self.state.evaluated(val_loss)
            self.metrics.evaluation(self.step, self.state.val_loss, self.state.train_seconds)
            if t.target_val_loss and self.state.val_loss <= t.target_val_loss and self.target_reached is None:
                gpus = self.dist.world_size if self.device.type == "cuda" else None
                self.target_reached = self.metrics.target_reached(self.step, self.state.val_loss,
                                                                  self.state.train_seconds, gpus)
        interval = self.cfg.eval.hellaswag_interval
        if interval and (self.step % interval == 0 or done) and self.dist.main and not self.stop_requested:
            result = evaluate_model(self.model, lambda: autocast(self.device, self.amp_dtype), self.hellaswag_items,
                                    self.device, self.log, self.cfg.log.progress_seconds,
                                    should_stop=lambda: self.stop_requested)
            if result is not None:
                self.metrics.hellaswag(self.step, result)
        if not (t.target_val_loss and evaluated):
            return False
        reached_now = self.target_reached is not None and self.target_reached["step"] == self.step
        return distributed.rank0_says(reached_now, self.dist, self.device)

    def _finish(self, checkpoint: Path | None, stopped: bool) -> TrainResult:
        t = self.cfg.train
        text = ""
        if not stopped:
            distributed.barrier(self.dist)
            if t.sample_tokens and self.dist.main:
                text = self.sample(t.sample_tokens)
                path = self.run_dir.write_sample(self.step, text)
                self._record({"event": "sample", "step": self.step, "sample_tokens": t.sample_tokens, "text": text})
                self.log(f"sample ({t.sample_tokens} tokens, kept in {path}):\n{text}")
        summary = self.metrics.summary(self.state, self.target_reached, checkpoint)
        return TrainResult(self.step, self.metrics.train_loss, self.state.val_loss, text, stopped=stopped,
                           checkpoint=checkpoint, summary=summary)

    # -- checkpoints and health ------------------------------------------------------------------

    def save(self) -> Path:
        """Write the checkpoint of this step (rank 0), marked unhealthy when the run is not healthy:
        the last update is judged first, so no checkpoint of unjudged weights is called healthy."""
        verdict = self.health.judge_update()
        if not verdict.healthy:
            self.metrics.unhealthy(self.step, verdict.reason, self.health.bad_in_a_row)
        path = self.checkpointer.save(self.health.healthy)
        self.log(f"step {self.step} | checkpoint {path}{'' if self.health.healthy else ' (marked unhealthy)'}")
        return path

    # -- evaluation and sampling -----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean loss over the fixed val batches (the same windows at every evaluation), with one
        host read at the end; None when a stop request came during it (a signal must not wait
        for thousands of batches: schedulers kill ~30 s after SIGTERM)."""
        self.model.eval()
        steps = self.cfg.train.eval_steps
        total = torch.zeros((), device=self.device)
        progress = Progress(steps, "evaluation: batch", self.log, after=self.cfg.log.progress_seconds)
        for i in range(steps):
            if self.stop_requested:
                progress.close()
                self.model.train()
                return None
            x, y = self.loader.batch("val", step=i)
            with autocast(self.device, self.amp_dtype):
                total += self.eval_model(x, y).float()
            progress.update(i + 1)
        progress.close()
        self.model.train()
        return total.item() / steps

    def sample(self, max_new_tokens: int) -> str:
        """Text sampled from the start of a document, seeded by train.seed."""
        return sample_text(self.model, self.device, self.amp_dtype, max_new_tokens, self.cfg.train.seed)
