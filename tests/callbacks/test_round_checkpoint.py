"""``RoundCheckpoint`` in a plain Lightning project (no atlas-pl module): a ``last.ckpt`` after every epoch, atomic."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

import atlas_pl.io
from atlas_pl.callbacks import RoundCheckpoint
from atlas_pl.io import AtomicCheckpointIO


class TinyRegressor(L.LightningModule):
    """A foreign LightningModule: one linear layer, automatic optimization, a validation loop."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=8)


class LastCheckpointProbe(Callback):
    """At the start of every epoch after the first, read ``last.ckpt`` from disk and note which epoch it holds."""

    def __init__(self, path) -> None:
        self.path = path
        self.seen: list[int] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch > 0:
            self.seen.append(int(torch.load(self.path, weights_only=False)["epoch"]))


def _trainer(tmp_path, callbacks, max_epochs: int = 4, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        **kwargs,
    )


def test_last_checkpoint_is_on_disk_before_the_next_round_starts(tmp_path) -> None:
    checkpoint = RoundCheckpoint(dirpath=str(tmp_path / "ckpt"))
    probe = LastCheckpointProbe(tmp_path / "ckpt" / "last.ckpt")
    _trainer(tmp_path, [checkpoint, probe]).fit(TinyRegressor(), _loader(), _loader())
    assert probe.seen == [0, 1, 2]  # written at the end of rounds 0, 1, 2 (and 3 at the end of fit)
    assert [w["round"] for w in checkpoint.writes] == [0, 1, 2, 3]
    assert all(w["bytes"] > 0 and w["seconds"] >= 0 for w in checkpoint.writes)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]


def test_plain_model_checkpoint_with_save_top_k_0_writes_last_only_at_the_end(tmp_path) -> None:
    """The Lightning behaviour RoundCheckpoint exists for (pinned release): if this fails, Lightning changed."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    plain = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    probe = LastCheckpointProbe(tmp_path / "ckpt" / "last.ckpt")
    with pytest.raises(FileNotFoundError):
        _trainer(tmp_path, [plain, probe]).fit(TinyRegressor(), _loader(), _loader())


def test_every_n_epochs_skips_rounds_but_always_writes_the_final_one(tmp_path) -> None:
    checkpoint = RoundCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_epochs=2)
    _trainer(tmp_path, [checkpoint], max_epochs=5).fit(TinyRegressor(), _loader(), _loader())
    assert [w["round"] for w in checkpoint.writes] == [1, 3, 4]


def test_top_k_by_a_monitored_metric_still_works_beside_last(tmp_path) -> None:
    checkpoint = RoundCheckpoint(dirpath=str(tmp_path / "ckpt"), save_top_k=1, monitor="val_loss")
    _trainer(tmp_path, [checkpoint], max_epochs=3).fit(TinyRegressor(), _loader(), _loader())
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert "last.ckpt" in names and len(names) == 2
    assert checkpoint.best_model_path.endswith(".ckpt")


def test_plain_checkpoint_io_is_made_atomic_and_custom_io_is_left_alone(tmp_path) -> None:
    trainer = _trainer(tmp_path, [RoundCheckpoint(dirpath=str(tmp_path / "a"))], max_epochs=1)
    trainer.fit(TinyRegressor(), _loader())
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)

    class CustomIO(TorchCheckpointIO):
        pass

    custom = CustomIO()
    trainer = _trainer(tmp_path, [RoundCheckpoint(dirpath=str(tmp_path / "b"))], max_epochs=1, plugins=[custom])
    trainer.fit(TinyRegressor(), _loader())
    assert trainer.strategy.checkpoint_io is custom


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"round": 1, "w": torch.arange(4)}, path)
    real_save = torch.save

    def half_then_crash(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError("disk full")

    monkeypatch.setattr(atlas_pl.io.torch, "save", half_then_crash)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"round": 2, "w": torch.arange(1000)}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["round"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "the temporary file must be removed"


def test_stale_temporaries_of_a_killed_write_are_removed_at_setup_and_never_resumed_from(tmp_path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    stale = folder / ".last.ckpt.abc123.tmp"
    stale.write_bytes(b"\x80\x02truncated")
    checkpoint = RoundCheckpoint(dirpath=str(folder))
    assert checkpoint._find_last_checkpoints(_trainer(tmp_path, [])) == set()  # `--ckpt_path last` ignores it
    _trainer(tmp_path, [checkpoint], max_epochs=1).fit(TinyRegressor(), _loader())
    assert not stale.exists()
    assert (folder / "last.ckpt").exists()


@pytest.mark.parametrize(
    ("kwargs", "needle"), [({"every_n_epochs": 0}, "every_n_epochs"), ({"save_top_k": -2}, "save_top_k")]
)
def test_bad_arguments_name_the_argument(kwargs, needle) -> None:
    with pytest.raises(ValueError, match=needle):
        RoundCheckpoint(**kwargs)


def test_an_asynchronous_writer_saves_every_round_in_the_background_and_fit_waits_for_the_last(tmp_path) -> None:
    from lightning.pytorch.plugins.io import AsyncCheckpointIO

    class Mutate(Callback):  # training goes on while a write may be in flight: the write must hold its own copy
        def on_train_epoch_start(self, trainer, pl_module) -> None:
            with torch.no_grad():
                pl_module.layer.weight.add_(100.0)

    checkpoint = RoundCheckpoint(dirpath=str(tmp_path / "ckpt"), asynchronous=True)
    trainer = _trainer(tmp_path, [checkpoint, Mutate()], max_epochs=3)
    model = TinyRegressor()
    seen: list[torch.Tensor] = []

    class Snapshot(Callback):  # the weights at each round's end, in the order the writes are asked for
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            seen.append(pl_module.layer.weight.detach().clone())

    trainer.callbacks.insert(0, Snapshot())
    trainer.fit(model, _loader(), _loader())
    assert isinstance(trainer.strategy.checkpoint_io, AsyncCheckpointIO)
    assert isinstance(trainer.strategy.checkpoint_io.checkpoint_io, AtomicCheckpointIO)
    assert [w["round"] for w in checkpoint.writes] == [0, 1, 2] and all(w["asynchronous"] for w in checkpoint.writes)
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 2  # fit returned after the final write completed
    torch.testing.assert_close(last["state_dict"]["layer.weight"], seen[-1])
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["last.ckpt"]
