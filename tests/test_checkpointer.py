"""The checkpointer (gptfast/checkpointer.py): every part restored through its own state_dict."""

import pytest
import torch

from gptfast.checkpointer import TrainState
from gptfast.errors import CheckpointError
from gptfast.trainer import Trainer


def quiet(_):
    pass


def test_train_state_round_trips_and_reads_older_checkpoints():
    state = TrainState(step=7, val_loss=3.5, best_val_loss=3.25, train_seconds=12.5)
    other = TrainState()
    other.load_state_dict(state.state_dict())
    assert other == state
    other.load_state_dict({"step": 3, "val_loss": 4.0})  # written before the later fields existed
    assert other == TrainState(step=3, val_loss=4.0, best_val_loss=4.0, train_seconds=0.0)


def test_restore_brings_back_every_part(tiny_config):
    first = Trainer(tiny_config({"train.max_steps": 3}), log=quiet)
    first.run()
    torch.manual_seed(123)  # a different RNG state than the checkpoint's
    second = Trainer(tiny_config({"train.max_steps": 6}), log=quiet)
    try:
        assert second.state == first.state
        for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
            assert torch.equal(a, b)
        saved, loaded = first.optimizer.state_dict()["optimizer"], second.optimizer.state_dict()["optimizer"]
        assert repr(saved["state"]) == repr(loaded["state"])
        assert second.health.state_dict() == first.health.state_dict()
    finally:
        second.close()


def test_a_checkpoint_of_another_world_size_is_refused(tiny_config):
    trainer = Trainer(tiny_config({"train.max_steps": 3}), log=quiet)
    trainer.run()
    blob = torch.load(trainer.checkpointer.newest_healthy(), weights_only=True)
    blob.update(world_size=2, path="ckpt")
    with pytest.raises(CheckpointError, match="written by a run of 2 processes"):
        trainer.checkpointer.check_resumable(blob)
