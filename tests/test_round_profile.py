"""RoundProfiler: every round split into its parts, the parts adding up to Lightning's own epoch time."""

from __future__ import annotations

import json
import math

import lightning as L
import pytest

from atlas_pl.callbacks import ClusterAggregation, RoundCheckpoint
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.profiling import PARTS, RoundProfiler, part_of
from tests.conftest import tiny_data_kwargs, tiny_federation_kwargs


def test_an_action_takes_the_part_its_name_says_else_its_enclosing_actions() -> None:
    assert part_of("split/client_backward", None) == "client"
    assert part_of("[Callback]ClusterAggregation.on_train_batch_end", "step_other") == "aggregation"
    assert part_of("[Strategy]SingleDeviceStrategy.validation_step", None) == "evaluation"
    assert part_of("[Callback]TaskClustering.on_after_backward", "server") == "server"
    assert part_of("run_training_batch", None) == "other"


@pytest.mark.parametrize("schedule", ["sequential", "synchronous"])
def test_each_round_is_split_into_parts_that_add_up_to_lightnings_epoch_time(tmp_path, schedule) -> None:
    L.seed_everything(0, verbose=False)
    profiler = RoundProfiler(dirpath=tmp_path, filename="profile")
    fed = Federation(**tiny_federation_kwargs())
    dm = FederatedDataModule(**tiny_data_kwargs(schedule=schedule))
    callbacks = [ClusterAggregation("fedavg"), RoundCheckpoint(str(tmp_path / "ckpt"))]
    L.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, default_root_dir=tmp_path, profiler=profiler,
              callbacks=callbacks).fit(fed, datamodule=dm)  # fmt: skip
    rounds = profiler.rounds
    assert len(rounds) == 3
    steps = 4 * 2 if schedule == "sequential" else 2  # 4 clients x 2 local steps, or 2 synchronous steps
    assert len(profiler.recorded_durations["split/server"]) >= 3 * steps  # one per step (or per client)
    assert len(profiler.recorded_durations["split/optimizers"]) == 3 * steps
    epochs = profiler.recorded_durations["run_training_epoch"]
    for r, epoch in zip(rounds, epochs):
        assert set(r) == {*PARTS, "round"} and all(v >= 0 for v in r.values())
        assert r["client"] > 0 and r["server"] > 0 and r["evaluation"] > 0 and r["aggregation"] > 0
        assert r["checkpoint"] > 0  # every round's last.ckpt, the last round's included (written after its epoch)
        assert math.isclose(r["round"], sum(r[p] for p in PARTS))
        assert epoch < r["round"]  # the epoch, plus the round-end hooks that run after it
    med = profiler.breakdown()
    assert med["round"] > 0 and "Round profile" in profiler.summary()
    written = json.loads((tmp_path / "fit-profile.rounds.json").read_text())
    assert written["parts"] == list(PARTS) and len(written["rounds"]) == 3


def test_validation_every_second_round_and_on_a_fixed_sample_of_examples(tmp_path) -> None:
    """The two evaluation budgets of a long run: Lightning's ``check_val_every_n_epoch`` and
    ``data.max_val_examples_per_client``; the round history keeps the validated rounds only."""
    L.seed_everything(0, verbose=False)
    fed = Federation(**tiny_federation_kwargs())
    dm = FederatedDataModule(**tiny_data_kwargs(max_val_examples_per_client=2))
    dm.setup()
    assert [len(d) for d in dm.val_datasets] == [5, 5, 5, 5]  # 24 examples x 0.2
    assert sum(len(b["input_ids"]) for b in dm.val_dataloader()) == 4 * 2  # the first 2 of every client
    assert sum(len(b["input_ids"]) for b in dm.test_dataloader()) > 4 * 2  # test is never capped
    L.Trainer(max_epochs=4, check_val_every_n_epoch=2, accelerator="cpu", logger=False, enable_progress_bar=False,
              enable_model_summary=False, num_sanity_val_steps=0, enable_checkpointing=False,
              default_root_dir=tmp_path).fit(fed, datamodule=dm)  # fmt: skip
    assert [h["round"] for h in fed.history] == [1, 3]
    assert all(math.isfinite(h["val_loss"]) for h in fed.history)
