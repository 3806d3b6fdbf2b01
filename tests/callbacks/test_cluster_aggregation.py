"""ClusterAggregation: per-cluster merge in a Federation, and the reusable DDP mode in a plain Lightning module."""

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, get_peft_model
from torch import nn

from atlas_pl.callbacks.cluster_aggregation import ClusterAggregation
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.strategies import ClientParallelStrategy
from tests.conftest import tiny_data_kwargs, tiny_federation_kwargs


def _products(fed: Federation, name: str) -> dict[str, torch.Tensor]:
    return {m: s * b @ a for m, (a, b, s) in fed.backbone.bank.factors(name).items()}


def test_clusters_are_aggregated_separately_and_members_share_the_merge(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs())
    fed.set_clusters([0, 0, 1, 1])
    dm = FederatedDataModule(**tiny_data_kwargs())
    trainer = L.Trainer(max_epochs=1, callbacks=[ClusterAggregation("exact")], **fast_trainer_kwargs)
    trainer.fit(fed, datamodule=dm)

    p = [_products(fed, f"client_{i}") for i in range(4)]
    for module in p[0]:
        torch.testing.assert_close(p[0][module], p[1][module])
        torch.testing.assert_close(p[2][module], p[3][module])
        assert not torch.allclose(p[0][module], p[2][module])
    assert "aggregation/client_update_norm/cluster_1" in trainer.callback_metrics
    assert fed.channel.stats.adapters_up > 0


def test_fedavg_method_matches_the_federations_builtin_fedavg(fast_trainer_kwargs) -> None:
    results = []
    for callbacks in ([], [ClusterAggregation("fedavg")]):
        L.seed_everything(0, verbose=False)
        fed = Federation(**tiny_federation_kwargs())
        L.Trainer(max_epochs=1, callbacks=callbacks, **fast_trainer_kwargs).fit(
            fed, datamodule=FederatedDataModule(**tiny_data_kwargs())
        )
        results.append(fed.backbone.bank.state("client_0"))
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key])


def test_flora_with_several_clusters_is_refused(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs())
    fed.set_clusters([0, 0, 1, 1])
    trainer = L.Trainer(max_epochs=1, callbacks=[ClusterAggregation("flora")], **fast_trainer_kwargs)
    with pytest.raises(ValueError, match="flora"):
        trainer.fit(fed, datamodule=FederatedDataModule(**tiny_data_kwargs()))


def test_constructor_rejects_unknown_methods_and_bad_periods() -> None:
    with pytest.raises(ValueError, match="method"):
        ClusterAggregation("median")
    with pytest.raises(ValueError, match="every_n_rounds"):
        ClusterAggregation(every_n_rounds=0)


# ------------------------------------------------------------------------------------------ DDP, one client per rank
class PeftRegressor(L.LightningModule):
    """A plain Lightning module with a peft LoRA model; the LoRA rank depends on the process rank."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.model: nn.Module | None = None

    def setup(self, stage: str) -> None:
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1))
        rank = 2 if self.global_rank == 0 else 8  # heterogeneous ranks across processes
        self.model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, target_modules=["0"]))
        self.num_examples = 1 + self.global_rank  # weights 1/3 and 2/3
        torch.manual_seed(100 + self.global_rank)
        for name, p in self.model.named_parameters():
            if "lora_B" in name:
                nn.init.normal_(p, std=0.5)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.0)  # adapters stay put

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(4, 8), torch.randn(4, 1))
        return torch.utils.data.DataLoader(data, batch_size=2)


class Snapshot(Callback):
    """Saves this process's adapter before and after aggregation."""

    def __init__(self, when: str) -> None:
        self.when = when

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        layer = pl_module.model.base_model.model[0]
        a, b, s = layer.lora_A["default"].weight, layer.lora_B["default"].weight, layer.scaling["default"]
        torch.save(
            {"delta": (s * b @ a).detach(), "rank": a.shape[0]},
            f"{pl_module.out_dir}/{self.when}_{trainer.global_rank}.pt",
        )


def test_reusable_callback_merges_heterogeneous_ranks_across_two_gloo_processes(tmp_path) -> None:
    module = PeftRegressor(str(tmp_path))
    strategy = ClientParallelStrategy(start_method="spawn")
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        callbacks=[Snapshot("before"), ClusterAggregation("exact"), Snapshot("after")],
    )
    trainer.fit(module)

    before = [torch.load(tmp_path / f"before_{r}.pt") for r in (0, 1)]
    after = [torch.load(tmp_path / f"after_{r}.pt") for r in (0, 1)]
    merged = (1 / 3) * before[0]["delta"] + (2 / 3) * before[1]["delta"]
    assert [b["rank"] for b in before] == [2, 8]
    torch.testing.assert_close(after[1]["delta"], merged, rtol=1e-5, atol=1e-5)  # rank 8 >= rank of the merge
    _, s, _ = torch.linalg.svd(merged)
    best_rank2 = torch.sqrt((s[2:] ** 2).sum()) / torch.linalg.norm(s)
    error = torch.linalg.norm(after[0]["delta"] - merged) / torch.linalg.norm(merged)
    assert error.item() == pytest.approx(best_rank2.item(), rel=1e-4)  # the best rank-2 approximation


# ------------------------------------------------------------------------ DDP mode: the module's client attributes
class BareLoraModule(L.LightningModule):
    """A foreign module with one peft LoRA layer and only the client attributes it is given."""

    def __init__(self, **client_attributes) -> None:
        super().__init__()
        torch.manual_seed(0)
        base = nn.Sequential(nn.Linear(4, 4))
        self.model = get_peft_model(base, LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
        for name, value in client_attributes.items():
            setattr(self, name, value)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.01)

    def train_dataloader(self):
        data = torch.utils.data.TensorDataset(torch.randn(4, 4), torch.randn(4, 4))
        return torch.utils.data.DataLoader(data, batch_size=2)


def _ours(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("ClusterAggregation:")]


def test_module_without_client_attributes_warns_once_per_attribute_and_uses_the_defaults(fast_trainer_kwargs) -> None:
    callback = ClusterAggregation("exact")
    module = BareLoraModule()
    trainer = L.Trainer(max_epochs=2, devices=1, callbacks=[callback], **fast_trainer_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)  # checks at fit start, then aggregates twice
    messages = _ours(caught)
    assert len(messages) == 2, messages
    assert (
        "BareLoraModule has no `num_examples` attribute; using num_examples=1 (this client's aggregation weight; "
        "every client counts equally); fix: set `self.num_examples = ...` in the module's __init__ or setup"
    ) in messages[0]
    assert "has no `cluster_id` attribute; using cluster_id=0" in messages[1] and "self.cluster_id = ..." in messages[1]
    assert callback.last_round == 1 and list(callback.reports) == [0]


@pytest.mark.parametrize(
    ("attributes", "record"),
    [
        ({"num_examples": 30, "cluster_id": 2}, (30.0, 2)),
        ({"num_examples": torch.tensor(7), "cluster_id": np.int64(1)}, (7.0, 1)),
        ({"num_examples": 0.5, "cluster_id": torch.tensor(3)}, (0.5, 3)),
    ],
    ids=["ints", "tensor_and_numpy", "float_and_tensor"],
)
def test_module_with_client_attributes_gets_its_values_and_no_warning(attributes, record) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ClusterAggregation().client_record(BareLoraModule(**attributes)) == record


@pytest.mark.parametrize(
    ("attributes", "needle"),
    [
        ({"num_examples": 0}, "`BareLoraModule.num_examples` must be a number > 0"),
        ({"num_examples": float("nan")}, "num_examples` must be a number > 0"),
        ({"num_examples": "120"}, "num_examples` must be a number > 0 (this client's aggregation weight), got '120'"),
        ({"num_examples": True}, "num_examples` must be a number > 0"),
        ({"num_examples": 10, "cluster_id": 1.5}, "`BareLoraModule.cluster_id` must be an int, got 1.5"),
        ({"num_examples": 10, "cluster_id": "a"}, "cluster_id` must be an int, got 'a'"),
    ],
)
def test_bad_client_attribute_values_are_rejected_at_fit_start(fast_trainer_kwargs, attributes, needle) -> None:
    trainer = L.Trainer(max_epochs=1, devices=1, callbacks=[ClusterAggregation()], **fast_trainer_kwargs)
    with pytest.raises(ValueError, match="fix: set it") as info:
        trainer.fit(BareLoraModule(**{"cluster_id": 0, **attributes}))
    assert needle in str(info.value)
