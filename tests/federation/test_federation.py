"""The federation: one backbone, clients as adapters, FedAvg rounds, resumable checkpoints."""

from __future__ import annotations

import shutil

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from atlas_pl.callbacks import ClusterAggregation, RoundCheckpoint
from atlas_pl.client import SplitClient
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.io import AtomicCheckpointIO
from tests.conftest import TINY_GPT2, tiny_data_kwargs, tiny_federation_kwargs


def _adapters(model: Federation) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_clients_share_one_backbone_and_add_only_adapters() -> None:
    fed = Federation(**tiny_federation_kwargs(num_clients=3))
    frozen = [p for n, p in fed.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for p in frozen)
    assert all(c.split is fed.backbone for c in fed.clients)
    names = {n.split(".lora_")[1].split(".")[1] for n, _ in fed.named_parameters() if "lora_" in n}
    assert names == {"client_0", "client_1", "client_2", "server_c0"}


def test_fedavg_round_leaves_all_clients_with_equal_adapters(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs())
    dm = FederatedDataModule(**tiny_data_kwargs())
    before = _adapters(fed)
    L.Trainer(max_epochs=1, callbacks=[ClusterAggregation("fedavg")], **fast_trainer_kwargs).fit(fed, datamodule=dm)
    states = [fed.backbone.bank.state(f"client_{i}") for i in range(4)]
    for state in states[1:]:
        for key, value in state.items():
            torch.testing.assert_close(value, states[0][key])
    after = _adapters(fed)
    assert any(not torch.equal(before[k], after[k]) for k in before), "training changed no adapter"


def test_without_cluster_aggregation_clients_stay_apart(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs(share="none"))
    L.Trainer(max_epochs=1, **fast_trainer_kwargs).fit(fed, datamodule=FederatedDataModule(**tiny_data_kwargs()))
    a, b = fed.backbone.bank.state("client_0"), fed.backbone.bank.state("client_1")
    assert any(not torch.equal(a[k], b[k]) for k in a)


class StepLosses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(trainer.callback_metrics["train_loss"]))


def test_training_loss_falls_by_nats_when_a_client_fits_its_own_examples(fast_trainer_kwargs, seeded) -> None:
    """A large effect, not a hair: 30 steps on 16 examples take the loss from ~10.3 (uniform over the 50k-token
    vocabulary) to ~6 (measured 5.7-7.5 over seeds 0-2); the threshold, 1.5 nats, is far above float-rounding noise."""
    model = {**TINY_GPT2, "n_embd": 64, "n_head": 4, "initializer_range": 0.1}
    fed = Federation(**tiny_federation_kwargs(num_clients=1, learning_rate=1e-2, model_overrides=model))
    dm = FederatedDataModule(**tiny_data_kwargs(num_clients=1, num_groups=1, tasks_per_group=1, examples_per_client=16,
                                                local_steps=10))  # fmt: skip
    steps = StepLosses()
    kwargs = {**fast_trainer_kwargs, "limit_val_batches": 0, "log_every_n_steps": 1}  # train_loss of every step
    L.Trainer(max_epochs=3, callbacks=[steps], **kwargs).fit(fed, datamodule=dm)
    assert len(steps.losses) == 30
    first, last = sum(steps.losses[:3]) / 3, sum(steps.losses[-3:]) / 3
    assert last < first - 1.5, f"training loss {first:.2f} -> {last:.2f}"


def test_channel_counts_activation_and_gradient_bytes(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs())
    dm = FederatedDataModule(**tiny_data_kwargs())
    L.Trainer(max_epochs=1, callbacks=[ClusterAggregation("fedavg")], **fast_trainer_kwargs).fit(fed, datamodule=dm)
    stats = fed.channel.stats
    # every step sends one fp32 activation [batch, seq, 32] up and its gradient down
    assert stats.activations_up == stats.gradients_down > 0
    assert stats.activations_up % (4 * 32) == 0
    assert stats.adapters_up == 4 * fed.backbone.bank.nbytes("client_0")


def test_mismatched_client_counts_raise_naming_both(fast_trainer_kwargs) -> None:
    fed = Federation(**tiny_federation_kwargs(num_clients=3))
    with pytest.raises(ValueError, match="num_clients"):
        L.Trainer(max_epochs=1, **fast_trainer_kwargs).fit(fed, datamodule=FederatedDataModule(**tiny_data_kwargs()))


def test_split_client_trains_alone_with_a_plain_trainer(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs(num_clients=1))
    client = SplitClient(fed.backbone, learning_rate=1e-2)
    dm = FederatedDataModule(**tiny_data_kwargs(num_clients=1, num_groups=1, tasks_per_group=1))
    before = fed.backbone.bank.state("client")
    L.Trainer(max_epochs=2, **fast_trainer_kwargs).fit(client, datamodule=dm)
    after = fed.backbone.bank.state("client")
    assert any(not torch.equal(before[k], after[k]) for k in before)


class KeepEachRoundsCheckpoint(Callback):
    """Copy ``last.ckpt`` as ``round{r}.ckpt`` when round ``r + 1`` starts: what a crash in that round would leave."""

    def __init__(self, folder) -> None:
        self.folder = folder

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if (self.folder / "last.ckpt").exists():  # (a resumed run starts with no last.ckpt in its own folder)
            shutil.copy(self.folder / "last.ckpt", self.folder / f"round{trainer.current_epoch - 1}.ckpt")


def _fit(tmp_path, max_epochs: int, ckpt_path=None) -> Federation:
    L.seed_everything(0, verbose=False)
    fed = Federation(**tiny_federation_kwargs(lora_dropout=0.1))  # dropout: resume must restore the RNG too
    dm = FederatedDataModule(**tiny_data_kwargs(sample_fraction=0.5))
    ckpt = RoundCheckpoint(dirpath=str(tmp_path / "ckpt"))
    trainer = L.Trainer(max_epochs=max_epochs, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[ClusterAggregation("exact"), ckpt, KeepEachRoundsCheckpoint(tmp_path / "ckpt")],
                        plugins=[AtomicCheckpointIO()],
                        default_root_dir=tmp_path)
    trainer.fit(fed, datamodule=dm, ckpt_path=ckpt_path)
    return fed


def test_resume_after_a_round_matches_an_uninterrupted_run(tmp_path) -> None:
    full = _fit(tmp_path / "full", max_epochs=3)
    _fit(tmp_path / "cut", max_epochs=1)
    last = tmp_path / "cut" / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=False)
    assert all("lora_" in k for k in checkpoint["state_dict"]), "checkpoint must not hold the frozen backbone"
    resumed = _fit(tmp_path / "cut", max_epochs=3, ckpt_path=str(last))
    full_state, resumed_state = _adapters(full), _adapters(resumed)
    for key in full_state:
        torch.testing.assert_close(resumed_state[key], full_state[key], rtol=0, atol=0)
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]


def test_resume_from_a_checkpoint_written_mid_run_matches_an_uninterrupted_run(tmp_path) -> None:
    full = _fit(tmp_path / "full", max_epochs=3)
    round0 = tmp_path / "full" / "ckpt" / "round0.ckpt"  # written at the end of round 0 of a 3-round fit
    assert len(torch.load(round0, weights_only=False)["federation"]["history"]) == 1
    resumed = _fit(tmp_path / "cut", max_epochs=3, ckpt_path=str(round0))
    full_state, resumed_state = _adapters(full), _adapters(resumed)
    for key in full_state:
        torch.testing.assert_close(resumed_state[key], full_state[key], rtol=0, atol=0)
    assert resumed.history == full.history


def test_per_client_server_adapters_and_heads_are_averaged_for_classifiers(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs(
        model="bert-tiny", task_format="classification", share="none",
        model_overrides={"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_labels": 4}))
    dm = FederatedDataModule(**tiny_data_kwargs(task_format="classification"))
    L.Trainer(max_epochs=1, callbacks=[ClusterAggregation("fedavg")], **fast_trainer_kwargs).fit(fed, datamodule=dm)
    states = [fed.backbone.adapter_state(f"server_{i}") for i in range(4)]
    assert any(k.startswith("head.") for k in states[0])
    for state in states[1:]:
        for key, value in state.items():
            torch.testing.assert_close(value, states[0][key])
    assert 0.0 <= fed.history[-1]["val_acc"] <= 1.0


def test_centralized_training_shares_one_adapter_pair_across_all_clients(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs(share="all"))
    before = fed.backbone.bank.state("client_c0")
    trainer = L.Trainer(max_epochs=1, **fast_trainer_kwargs)
    trainer.fit(fed, datamodule=FederatedDataModule(**tiny_data_kwargs()))
    assert {c.client_adapter for c in fed.clients} == {"client_c0"}
    assert {c.server_adapter for c in fed.clients} == {"server_c0"}
    assert len(trainer.optimizers) == 2
    after = fed.backbone.bank.state("client_c0")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert fed.channel.stats.adapters_up == 0  # nothing to aggregate


def test_centralized_with_clusters_pools_each_clusters_data_into_its_own_adapter_pair(
    fast_trainer_kwargs, seeded
) -> None:
    fed = Federation(**tiny_federation_kwargs(share="all"))
    start = fed.backbone.adapter_state("client_c0")
    fed.assign_clusters([0, 0, 1, 1])  # e.g. TaskClustering(assign="true_task"): one pooled model per task
    assert [c.client_adapter for c in fed.clients] == ["client_c0", "client_c0", "client_c1", "client_c1"]
    assert [c.server_adapter for c in fed.clients] == ["server_c0", "server_c0", "server_c1", "server_c1"]
    for key, value in fed.backbone.adapter_state("client_c1").items():  # a new cluster starts where it was
        torch.testing.assert_close(value, start[key])
    trainer = L.Trainer(max_epochs=1, **fast_trainer_kwargs)
    trainer.fit(fed, datamodule=FederatedDataModule(**tiny_data_kwargs()))
    assert len(trainer.optimizers) == 4
    c0, c1 = fed.backbone.adapter_state("client_c0"), fed.backbone.adapter_state("client_c1")
    assert all(not torch.equal(c0[k], start[k]) for k in start if k.endswith("lora_B"))
    assert any(not torch.equal(c0[k], c1[k]) for k in c0), "the two clusters trained one adapter"
