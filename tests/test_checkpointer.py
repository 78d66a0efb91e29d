"""The checkpointer (gptfast/checkpointer.py): every part restored through its own state_dict."""

from pathlib import Path

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


def test_a_disk_too_full_for_a_checkpoint_is_found_before_step_1(tiny_config, tmp_path, monkeypatch):
    """The checkpoint's size is known before training: a file system that cannot hold one stops
    the run before step 1 (one line, nothing trained, no run directory left), and a disk that
    fills during the run stops it before the write, naming the newest healthy checkpoint."""
    import collections
    import shutil

    from gptfast import checkpointer
    from gptfast.errors import RunDirError
    from gptfast.trainer import Trainer

    usage = collections.namedtuple("usage", "total used free")
    real_usage = shutil.disk_usage
    monkeypatch.setattr(checkpointer.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**5, 10**5))
    with pytest.raises(RunDirError, match=r"has 0.1 MiB free, but a checkpoint needs about .*before training "
                                          r"starts.*no healthy checkpoint was written yet"):
        Trainer(tiny_config(), log=lambda _: None)
    assert not (tmp_path / "run").exists()

    monkeypatch.setattr(checkpointer.shutil, "disk_usage", real_usage)
    trainer = Trainer(tiny_config({"train.checkpoint_interval": 3}), log=lambda _: None)
    expected = trainer.checkpointer.expected_bytes()
    real_save = trainer.checkpointer.save
    saved = []

    def save(healthy):
        if saved:  # the disk is full by the second checkpoint
            monkeypatch.setattr(checkpointer.shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 10**5, 10**5))
        saved.append(real_save(healthy))
        return saved[-1]

    trainer.checkpointer.save = save
    with pytest.raises(RunDirError, match=r"before the checkpoint of step 6.*newest healthy checkpoint .*ckpt_00000003\.pt is intact"):
        trainer.run()
    assert abs(saved[0].stat().st_size - expected) < 0.1 * expected  # the estimate is the checkpoint's size


def test_a_resume_on_a_dataset_prepared_again_from_other_inputs_is_refused(tmp_path, capsys):
    """The checkpoint keeps the data's fingerprint: re-preparing the dataset under the same name
    from other files, then resuming, is refused like a changed seed (one line, nothing moved);
    allow_config_change lets it through, saying so."""
    from conftest import REPO, tiny_overrides
    from gptfast.datasets import prepare_recipe
    from gptfast.train import main as train_main

    def corpus(name, text):
        path = tmp_path / name
        path.write_text(text)
        return [str(path)]

    data = tmp_path / "data"
    words = " ".join(f"word{i}" for i in range(3000))
    prepare_recipe("text", data, name="d", inputs=corpus("a.txt", words), val_fraction=0.2, log=lambda _: None)
    argv = [str(REPO / "configs" / "cpu_smoke.toml"), *tiny_overrides(data, tmp_path / "run", {"data.dataset": '"d"'})]
    assert train_main(argv + ["--train.max_steps=3"]) == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    prepare_recipe("text", data, name="d", inputs=corpus("b.txt", words.upper()), val_fraction=0.2,
                   log=lambda _: None, force=True)
    capsys.readouterr()
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the dataset 'd' is not the one trained on" in err, err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
    assert train_main(argv + ["--train.allow_config_change=true"]) == 0
    assert "resume: changed the dataset 'd' is not the one trained on" in capsys.readouterr().out


def resave(path, change, checksum: bool):
    """Rewrite checkpoint `path` with `change(blob)` applied: a whole, readable file (valid zip CRCs),
    with a matching checksum or none."""
    from gptfast import checkpoint as ckpt

    blob = torch.load(path, map_location="cpu", weights_only=True)
    change(blob)
    torch.save(blob, path)
    ckpt.checksum_path(path).unlink()
    if checksum:
        ckpt.checksum_path(path).write_text(ckpt.file_sha256(path) + "\n")


def restored_after(tiny_config, damage):
    """(step resumed at, log lines) after `damage(newest checkpoint)` on a 6-step run's checkpoints 3 and 6."""
    from gptfast import checkpoint as ckpt

    Trainer(tiny_config(), log=quiet).run()
    newest = ckpt.latest_checkpoint(tiny_config().train.out_dir)
    damage(newest)
    lines = []
    resumed = Trainer(tiny_config({"train.max_steps": 7}), log=lines.append)
    resumed.close()
    return resumed.step, lines, newest


def test_an_unchecksummed_checkpoint_with_a_damaged_weight_is_not_blessed(tiny_config):
    from gptfast import checkpoint as ckpt

    def inf_in_wte(blob):
        blob["model"]["transformer.wte.weight"][3, 5] = float("inf")

    step, lines, newest = restored_after(tiny_config, lambda p: resave(p, inf_in_wte, checksum=False))
    assert step == 3  # the previous checkpoint
    assert any("transformer.wte.weight holds non-finite values" in line for line in lines), lines
    assert not ckpt.checksum_path(newest).exists()  # never blessed


def test_an_unchecksummed_checkpoint_with_a_flipped_bit_fails_its_zip_crc(tiny_config):
    def flip(path):
        from gptfast import checkpoint as ckpt

        ckpt.checksum_path(path).unlink()
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x10  # inside the tensors' bytes
        path.write_bytes(bytes(data))

    step, lines, _ = restored_after(tiny_config, flip)
    assert step == 3 and any("fails its CRC" in line for line in lines), lines


def test_optimizer_state_of_the_wrong_shape_falls_back_naming_the_tensor(tiny_config):
    def wrong_shape(blob):
        state = blob["optimizer"]["state"]
        state[0]["exp_avg"] = state[0]["exp_avg"][:-1].clone()

    step, lines, _ = restored_after(tiny_config, lambda p: resave(p, wrong_shape, checksum=True))
    assert step == 3
    assert any("is damaged: optimizer state 'exp_avg' of transformer.wte.weight has shape" in line
               for line in lines), lines


def test_a_reader_never_writes_into_the_run_directory(tiny_config):
    from gptfast import checkpoint as ckpt

    Trainer(tiny_config(), log=quiet).run()
    newest = ckpt.latest_checkpoint(tiny_config().train.out_dir)
    ckpt.checksum_path(newest).unlink()
    lines = []
    assert ckpt.load_checkpoint(newest, log=lines.append)["step"] == 6  # as sample, export and eval read it
    assert not ckpt.checksum_path(newest).exists() and "could not be verified" in lines[0]


@pytest.mark.parametrize("when", ["hashing", "loading"])
def test_a_reader_whose_checkpoint_is_rotated_away_chooses_again(tiny_config, monkeypatch, when):
    """sample / export / eval on a running trainer's directory: the newest checkpoint removed by
    its rotation while it is read. The reader takes the next newest, once, not an error."""
    from gptfast import checkpoint as ckpt

    Trainer(tiny_config(), log=quiet).run()
    out = tiny_config().train.out_dir
    newest = ckpt.latest_checkpoint(out)
    target = ckpt if when == "hashing" else ckpt.torch
    real = target.file_sha256 if when == "hashing" else target.load
    name = "file_sha256" if when == "hashing" else "load"

    def rotating(path, *args, **kwargs):
        if Path(path) == newest and newest.exists():
            newest.unlink()  # what rotation does between the reader's choice and its read
            ckpt.checksum_path(newest).unlink()
        return real(path, *args, **kwargs)

    monkeypatch.setattr(target, name, rotating)
    lines = []
    assert ckpt.load_checkpoint(out, log=lines.append)["step"] == 3
    assert any("rotated away while it was read; choosing again" in line for line in lines)
