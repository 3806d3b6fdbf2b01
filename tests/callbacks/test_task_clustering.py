"""TaskClustering: fingerprints on the clients, k-means on the server, clusters written to the federation."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from atlas_pl.callbacks.task_clustering import TaskClustering, _codes
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.lora.adapters import LoraSpec
from tests.conftest import phase_trainer

DEMO_SHAPE = {"n_layer": 4, "n_embd": 128, "n_head": 4, "initializer_range": 0.1}
TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def _setup(seed: int, num_clients: int = 12, **fed_kwargs):
    L.seed_everything(seed, verbose=False)
    fed = Federation(
        model="gpt2-tiny",
        model_overrides=dict(DEMO_SHAPE),
        lora=LoraSpec(rank=4, target_modules=TARGETS),
        num_clients=num_clients,
        cut_layer=1,
        learning_rate=3e-3,
        **fed_kwargs,
    )
    dm = FederatedDataModule(
        num_clients=num_clients,
        num_groups=3,
        tasks_per_group=2,
        examples_per_client=48,
        max_length=40,
        batch_size=16,
        local_steps=1,
        seed=seed,
    )
    return fed, dm


@pytest.mark.parametrize("signal", ["grad_B", "contrast"])
def test_fingerprints_recover_the_synthetic_task_groups_for_five_seeds(tmp_path, signal) -> None:
    aris = []
    for seed in range(5):
        fed, dm = _setup(seed)
        clustering = TaskClustering(num_clusters=3, num_batches=4, seed=seed, signal=signal)
        phase_trainer(tmp_path, [clustering]).fit(fed, datamodule=dm)
        aris.append(clustering.metrics(clustering.result, dm)["clustering/ari_vs_group"])
    assert aris == [1.0] * 5


def test_clusters_reach_the_federation_and_only_fingerprint_bytes_leave_the_clients(tmp_path) -> None:
    fed, dm = _setup(0)
    clustering = TaskClustering(num_clusters=3)
    phase_trainer(tmp_path, [clustering], max_epochs=1).fit(fed, datamodule=dm)

    assert fed.cluster_ids == clustering.result.labels
    assert len(set(fed.cluster_ids)) == 3
    assert {c.server_adapter for c in fed.clients} == {"server_c0", "server_c1", "server_c2"}
    assert fed.channel.stats.fingerprints_up == 12 * 64 * 4
    assert {"val_loss/cluster_0", "val_loss/cluster_1", "val_loss/cluster_2"} <= set(fed.history[-1])


def test_a_resumed_run_keeps_its_clusters_without_fingerprinting_again(tmp_path) -> None:
    fed, dm = _setup(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    phase_trainer(tmp_path, [TaskClustering(num_clusters=3), ckpt], max_epochs=1).fit(fed, datamodule=dm)

    resumed, dm2 = _setup(0)
    clustering = TaskClustering(num_clusters=3)
    calls = []
    clustering.run = lambda *args, **kwargs: calls.append(args)  # would fingerprint again
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    trainer = phase_trainer(tmp_path, [clustering, ckpt2], max_epochs=2)
    trainer.fit(resumed, datamodule=dm2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))

    assert calls == []
    assert resumed.cluster_ids == fed.cluster_ids
    for name in ("server_c1", "server_c2"):
        assert name in resumed.backbone.server_adapters


def test_more_clusters_than_clients_is_an_error_naming_the_value(tmp_path) -> None:
    fed, dm = _setup(0, num_clients=4)
    with pytest.raises(ValueError, match="num_clusters"):
        phase_trainer(tmp_path, [TaskClustering(num_clusters=9)]).fit(fed, datamodule=dm)


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_clusters"):
        TaskClustering(num_clusters=0)
    with pytest.raises(ValueError, match="dim"):
        TaskClustering(dim=0)
    with pytest.raises(ValueError, match="sides"):
        TaskClustering(sides="both_ways")
    with pytest.raises(ValueError, match="k_tolerance"):
        TaskClustering(k_tolerance=-0.1)
    with pytest.raises(ValueError, match="'contrast'"):
        TaskClustering(signal="gradient")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_silhouette.*'chance'"):
        TaskClustering(min_silhouette="random")  # type: ignore[arg-type]


def test_dp_noise_reports_an_epsilon(tmp_path) -> None:
    fed, dm = _setup(0, num_clients=6)
    clustering = TaskClustering(num_clusters=2, dp_noise_multiplier=1.0)
    phase_trainer(tmp_path, [clustering]).fit(fed, datamodule=dm)
    eps = clustering.metrics(clustering.result, dm)["clustering/dp_epsilon"]
    assert 0 < eps < float("inf")


def test_codes_number_names_by_first_appearance() -> None:
    assert _codes(["b", "a", "b", "c"]) == [0, 1, 0, 2]
    assert torch.tensor(_codes(["x"])).tolist() == [0]


@pytest.mark.parametrize(("assign", "expected"), [("true_group", 3), ("one", 1), ("random", None)])
def test_ablation_assignments_skip_fingerprints(tmp_path, assign, expected) -> None:
    fed, dm = _setup(0, num_clients=6)
    clustering = TaskClustering(num_clusters=2, assign=assign)
    phase_trainer(tmp_path, [clustering]).fit(fed, datamodule=dm)
    assert fed.channel.stats.fingerprints_up == 0
    if expected is not None:
        assert clustering.result.num_clusters == expected
    if assign == "true_group":
        assert clustering.metrics(clustering.result, dm)["clustering/ari_vs_group"] == 1.0
