"""The checkpointer: saves and restores a run's stateful parts through their own state_dict.

A checkpoint holds each part under its own key (`model`; the optimizer's `optimizer` and `scaler`;
`health`), the run's `TrainState` (step, val losses, training seconds), the RNG states, the world
size and the resolved config. `restore()` continues from the newest healthy, readable checkpoint
of the run directory, after checking that it may: the same model, the same world size, and no
silent change to a setting that decides the trajectory. The file format itself (atomic writes,
checksums, unhealthy markers, rotation) is `gptfast.checkpoint`'s.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch

from gptfast import checkpoint as ckpt
from gptfast.config import Config
from gptfast.configfile import config_changes
from gptfast.device import DistInfo
from gptfast.errors import CheckpointError, ConfigError, RunDirError
from gptfast.memory import format_bytes, optimizer_state_bytes
from gptfast.rundir import RunDir


class Stateful(Protocol):
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainState:
    """Where the run is: what a checkpoint carries beside the parts' own state."""

    step: int = 0  # optimizer steps completed
    val_loss: float | None = None  # the last evaluation
    best_val_loss: float | None = None  # over the whole run, resumes included
    train_seconds: float = 0.0  # wall time spent in optimizer steps, over the whole run

    def evaluated(self, val_loss: float) -> None:
        self.val_loss = val_loss
        if self.best_val_loss is None or val_loss < self.best_val_loss:
            self.best_val_loss = val_loss

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.val_loss = state.get("val_loss")
        self.best_val_loss = state.get("best_val_loss", self.val_loss)  # older checkpoints lack it
        self.train_seconds = state.get("train_seconds", 0.0)


class Checkpointer:
    """Writes and restores the checkpoints of one run directory (rank 0 writes; every rank restores)."""

    def __init__(self, run_dir: RunDir, cfg: Config, dist: DistInfo, device: torch.device,
                 parts: dict[str, Stateful], state: TrainState, log: Callable[[str], None], dataset: str | None = None):
        """dataset: the training data's fingerprint (TokenLoader.fingerprint), kept in each
        checkpoint: a resume on other data is refused like any change of trajectory."""
        self.run_dir, self.cfg, self.dist, self.device = run_dir, cfg, dist, device
        self.parts, self.state, self.log, self.dataset = parts, state, log, dataset

    # -- writing ---------------------------------------------------------------------------------

    def expected_bytes(self) -> int:
        """A checkpoint's size, known before step 1: the model's tensors (shared ones once) and the
        optimizer's state (AdamW's two moments; Muon's one momentum for the block matrices)."""
        tensors = {t.untyped_storage().data_ptr(): t.nbytes for t in self.parts["model"].state_dict().values()}
        n_params = sum(p.numel() for p in self.parts["model"].parameters())
        return sum(tensors.values()) + sum(optimizer_state_bytes(self.cfg, n_params).values())

    def check_free_space(self, before: str) -> None:
        """RunDirError when out_dir's file system cannot hold one more checkpoint (rotation removes
        the oldest only after the new one is written), said before anything is trained for it."""
        if not self.dist.main:
            return
        need = int(self.expected_bytes() * 1.05) + 2**20
        free = shutil.disk_usage(self.run_dir.path).free
        if free < need:
            raise RunDirError(
                f"train.out_dir {str(self.run_dir.path)!r} has {format_bytes(free)} free, but a checkpoint needs about "
                f"{format_bytes(need)} ({before}); free some space or set train.out_dir elsewhere; "
                + ckpt.intact_note(self.run_dir.path))

    def save(self, healthy: bool) -> Path:
        """The checkpoint of this step, marked unhealthy when the run is not healthy."""
        self.check_free_space(f"before the checkpoint of step {self.state.step}")
        if healthy:
            finite = torch.stack([torch.isfinite(p).all() for p in self.parts["model"].parameters()]).all()
            # the health guard judged the parameter norm after the last update, so this cannot fail
            assert bool(finite), f"step {self.state.step}: the health guard passed non-finite weights"
        blob = {name: part.state_dict() for name, part in self.parts.items() if name != "optimizer"}
        blob.update(self.parts["optimizer"].state_dict())  # its "optimizer" and "scaler" entries
        blob.update(self.state.state_dict())
        blob.update(config=self.cfg.to_dict(), world_size=self.dist.world_size, rng=self._rng_state(),
                    dataset=self.dataset)
        return ckpt.save_checkpoint(blob, self.run_dir.path, self.state.step, self.cfg.train.keep_checkpoints,
                                    healthy)

    def condemn(self, step: int) -> None:
        """The checkpoint of `step` holds weights a later step found unhealthy: mark it so."""
        if self.dist.main:
            ckpt.mark_unhealthy(ckpt.checkpoint_path(self.run_dir.path, step))

    def newest_healthy(self) -> Path | None:
        return ckpt.latest_checkpoint(self.run_dir.path, healthy_only=True)

    def _rng_state(self) -> dict:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}

    # -- restoring -------------------------------------------------------------------------------

    def restore(self) -> bool:
        """Continue from the newest healthy, readable checkpoint; a corrupt one is reported and
        skipped, and newer unhealthy ones are set aside (moved, not deleted). False: nothing to
        resume, the run starts at step 0."""
        blob = self._newest_readable()
        if blob is None:
            return False
        self.check_resumable(blob)
        try:
            for name, part in self.parts.items():
                if name == "optimizer":
                    part.load_state_dict({"optimizer": blob["optimizer"], "scaler": blob.get("scaler")})
                elif blob.get(name) is not None:  # `health` is absent from the oldest checkpoints
                    part.load_state_dict(blob[name])
        except (RuntimeError, ValueError, KeyError) as e:
            raise CheckpointError(f"{blob['path']} does not fit this model and optimizer: {e}") from None
        self.state.load_state_dict(blob)
        torch.set_rng_state(blob["rng"]["torch"])
        if self.device.type == "cuda" and blob["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(blob["rng"]["cuda"], self.device)
        if self.dist.main:
            out = self.run_dir.path
            self.run_dir.set_aside(ckpt.run_files(out, after_step=self.state.step),
                                   f"resuming from the healthy checkpoint of step {self.state.step}; "
                                   "the newer, unhealthy checkpoints")
            self.run_dir.truncate_metrics(self.state.step)
        self.log(f"resumed from {blob['path']} at step {self.state.step}")
        return True

    def _newest_readable(self) -> dict | None:
        out = self.run_dir.path
        errors = []
        for path in reversed(ckpt.list_checkpoints(out, healthy_only=True)):
            try:
                blob = ckpt.load_checkpoint(path, log=self.log, bless=self.dist.main)
                self._check_optimizer_shapes(blob)
                return blob
            except CheckpointError as e:
                errors.append(str(e))
                self.log(f"warning: {e}; trying the previous checkpoint")
        if errors:
            raise CheckpointError(f"no readable checkpoint in {out}: {errors[0]}")
        unhealthy = ckpt.list_checkpoints(out)
        if unhealthy:
            raise CheckpointError(f"every checkpoint in {out} is marked unhealthy (newest "
                                  f"{unhealthy[-1].name}); start over with --train.resume=false")
        return None

    def _check_optimizer_shapes(self, blob: dict) -> None:
        """A checkpoint whose optimizer state does not fit its parameters' shapes is damaged (it
        would fail at the first step): a CheckpointError, so the previous checkpoint is tried."""
        from gptfast.optim import state_shape_problem

        model = self.parts["model"]
        if not isinstance(blob.get("optimizer"), dict) or not ckpt.same_shapes(blob["model"], model.state_dict()):
            return  # another model: check_resumable names the difference
        names = {id(p): name for name, p in model.named_parameters()}
        if problem := state_shape_problem(self.parts["optimizer"].inner, blob["optimizer"], names):
            raise CheckpointError(f"checkpoint {blob['path']} is damaged: {problem}")

    def check_resumable(self, blob: dict) -> None:
        """Same model, same world size, and no silent change to what decides the trajectory."""
        path = blob["path"]
        ckpt.check_same_model(blob["config"]["model"], self.cfg.to_dict()["model"], path)
        saved_world = blob.get("world_size", 1)
        if saved_world != self.dist.world_size:
            raise CheckpointError(f"{path} was written by a run of {saved_world} processes; resume it with "
                                  f"{saved_world} (this run has {self.dist.world_size}), or start a new run: "
                                  "--train.out_dir=ANOTHER_DIR, or --train.resume=false (sets this run aside)")
        trajectory, other = config_changes(blob["config"], self.cfg.to_dict())
        if blob.get("dataset") and self.dataset and blob["dataset"] != self.dataset:  # older checkpoints lack it
            trajectory.append(f"the dataset {self.cfg.data.dataset!r} is not the one trained on: it was prepared "
                              f"again or replaced (fingerprint {blob['dataset']} at the checkpoint, {self.dataset} "
                              "now)")
        if trajectory and not self.cfg.train.allow_config_change:
            raise ConfigError(f"resuming {path} with changed settings that change the training trajectory "
                              f"({'; '.join(trajectory)}); restore them, or pass --train.allow_config_change=true, "
                              "or start over with --train.resume=false")
        for change in trajectory + other:
            self.log(f"resume: changed {change}")


