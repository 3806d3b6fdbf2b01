"""ClusterAggregation in a Federation, checked by value against hand-computed merges; protocol and argument checks."""

import warnings

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, get_peft_model
from torch import nn

from atlas_pl import PeftClientMixin
from atlas_pl.algorithms import FedAvg
from atlas_pl.callbacks.cluster_aggregation import ClusterAggregation
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.protocol import FederationProtocolError
from tests.conftest import tiny_data_kwargs, tiny_federation_kwargs


class BeforeAggregation(Callback):
    """Keeps every client's factors at the round's last batch, before ClusterAggregation (later in the list) runs."""

    def __init__(self) -> None:
        self.factors: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor, float]]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            bank = pl_module.backbone.bank
            for i, client in enumerate(pl_module.clients):
                factors = bank.factors(client.client_adapter).items()
                self.factors[i] = {m: (a.detach().clone(), b.detach().clone(), s) for m, (a, b, s) in factors}


def _fit(callbacks, fast_trainer_kwargs, clusters=(0, 0, 1, 1), **federation) -> Federation:
    fed = Federation(**tiny_federation_kwargs(**federation))
    fed.assign_clusters(list(clusters))
    dm = FederatedDataModule(**tiny_data_kwargs())
    L.Trainer(max_epochs=1, callbacks=callbacks, **fast_trainer_kwargs).fit(fed, datamodule=dm)
    return fed


def _best_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(matrix)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def test_members_receive_the_best_rank_r_of_the_hand_weighted_sum_of_their_clusters_updates(
    fast_trainer_kwargs, seeded
) -> None:
    probe = BeforeAggregation()
    fed = _fit([probe, ClusterAggregation("exact")], fast_trainer_kwargs)
    weights = np.array(fed.num_examples, dtype=np.float64)
    for members in ([0, 1], [2, 3]):
        p = weights[members] / weights[members].sum()
        for module in probe.factors[0]:
            hand = 0.0  # Σ p_i s_i B_i A_i of the cluster, formed densely
            for k, i in enumerate(members):
                a, b, s = probe.factors[i][module]
                hand = hand + p[k] * s * (b.double() @ a.double()).numpy()
            for i in members:
                a, b, s = fed.backbone.bank.factors(fed.clients[i].client_adapter)[module]
                after = s * (b.detach().double() @ a.detach().double()).numpy()
                np.testing.assert_allclose(after, _best_rank(hand, a.shape[0]), rtol=1e-4, atol=1e-6)
    assert fed.channel.stats.adapters_up > 0


def test_fedavg_gives_every_member_the_hand_weighted_mean_of_a_and_b(fast_trainer_kwargs, seeded) -> None:
    probe = BeforeAggregation()
    fed = _fit([probe, ClusterAggregation(FedAvg())], fast_trainer_kwargs, clusters=(0, 0, 0, 0))
    p = np.array(fed.num_examples, dtype=np.float64) / sum(fed.num_examples)
    for module in probe.factors[0]:
        mean_a = sum(p[i] * probe.factors[i][module][0].double().numpy() for i in range(4))
        mean_b = sum(p[i] * probe.factors[i][module][1].double().numpy() for i in range(4))
        for i in range(4):
            a, b, _ = fed.backbone.bank.factors(fed.clients[i].client_adapter)[module]
            np.testing.assert_allclose(a.detach().double().numpy(), mean_a, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(b.detach().double().numpy(), mean_b, rtol=1e-5, atol=1e-7)


def test_aggregation_is_logged_per_cluster(fast_trainer_kwargs, seeded) -> None:
    fed = Federation(**tiny_federation_kwargs())
    fed.assign_clusters([0, 0, 1, 1])
    trainer = L.Trainer(max_epochs=1, callbacks=[ClusterAggregation("exact")], **fast_trainer_kwargs)
    trainer.fit(fed, datamodule=FederatedDataModule(**tiny_data_kwargs()))
    assert {"aggregation/client_update_norm/cluster_0", "aggregation/client_bytes/cluster_1"} <= set(
        trainer.callback_metrics
    )


def test_flora_with_several_clusters_is_refused(fast_trainer_kwargs, seeded) -> None:
    with pytest.raises(ValueError, match="FLoRA merges into the frozen base weights"):
        _fit([ClusterAggregation("flora")], fast_trainer_kwargs)


def test_constructor_rejects_unknown_methods_and_bad_periods() -> None:
    with pytest.raises(ValueError, match="`method` must be an AggregationMethod or one of"):
        ClusterAggregation("median")
    with pytest.raises(ValueError, match="every_n_rounds"):
        ClusterAggregation(every_n_rounds=0)


class PlainModule(L.LightningModule):
    """A foreign module that implements no federation method."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4)), batch_size=2)


def test_a_module_without_the_protocol_fails_before_training_naming_every_missing_method(fast_trainer_kwargs) -> None:
    trainer = L.Trainer(max_epochs=1, callbacks=[ClusterAggregation()], **fast_trainer_kwargs)
    with pytest.raises(FederationProtocolError) as info:
        trainer.fit(PlainModule())
    message = str(info.value)
    assert message.startswith("ClusterAggregation needs PlainModule to implement the federation protocol")
    for method in ("local_clients", "cluster_of", "participants", "adapter_sides", "adapter_layout", "pull", "push"):
        assert method in message
    assert "PeftClientMixin" in message and "README" in message
    assert trainer.global_step == 0


# ------------------------------------------------------------------- PeftClientMixin: the client's own attributes
class BareLoraModule(PeftClientMixin, L.LightningModule):
    """A foreign module with one peft LoRA layer and only the client attributes it is given."""

    def __init__(self, **client_attributes) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
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


def test_module_without_client_attributes_warns_once_per_attribute_and_uses_the_defaults(fast_trainer_kwargs) -> None:
    callback = ClusterAggregation("exact")
    module = BareLoraModule()
    trainer = L.Trainer(max_epochs=2, devices=1, callbacks=[callback], **fast_trainer_kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module)  # checks at fit start, then aggregates twice
    messages = [str(w.message) for w in caught if "BareLoraModule has no" in str(w.message)]
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
        assert BareLoraModule(**attributes).client_record() == record


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
    assert trainer.global_step == 0


@pytest.mark.parametrize("reset", [False, True])
def test_reset_optimizer_forgets_the_moments_of_every_member_that_received_a_merge(
    fast_trainer_kwargs, seeded, reset
) -> None:
    fed = _fit([ClusterAggregation("exact", reset_optimizer=reset)], fast_trainer_kwargs)
    merged = fed.adapter_sides()
    assert merged == ("client",)  # share="server": one server adapter per cluster, nothing to merge there
    for idx in range(4):
        for side, opt_idx in zip(("client", "server"), fed.optimizer_index(idx)):
            optimizer = fed.optimizers()[opt_idx].optimizer
            params = [p for g in optimizer.param_groups for p in g["params"]]
            forgotten = reset and side in merged
            assert params and all((p in optimizer.state) != forgotten for p in params)


def test_reset_optimizer_on_a_module_without_reset_optimizer_state_fails_at_setup() -> None:
    with pytest.raises(FederationProtocolError, match=r"reset_optimizer_state\(client, side\)"):
        ClusterAggregation(reset_optimizer=True).setup(L.Trainer(logger=False), BareLoraModule(), "fit")


def test_global_weight_gives_members_the_hand_mixture_of_their_cluster_merge_and_the_merge_of_all(
    fast_trainer_kwargs, seeded
) -> None:
    probe, beta = BeforeAggregation(), 0.3
    fed = _fit([probe, ClusterAggregation("exact", global_weight=beta)], fast_trainer_kwargs)
    n = np.array(fed.num_examples, dtype=np.float64)

    def merge(module: str, members: list[int]) -> np.ndarray:
        p = n[members] / n[members].sum()
        return sum(p[k] * s * (b.double() @ a.double()).numpy()
                   for k, (a, b, s) in enumerate(probe.factors[i][module] for i in members))  # fmt: skip

    for members in ([0, 1], [2, 3]):
        for module in probe.factors[0]:
            hand = (1 - beta) * merge(module, members) + beta * merge(module, [0, 1, 2, 3])
            for i in members:
                a, b, s = fed.backbone.bank.factors(fed.clients[i].client_adapter)[module]
                after = s * (b.detach().double() @ a.detach().double()).numpy()
                np.testing.assert_allclose(after, _best_rank(hand, a.shape[0]), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="`global_weight` must be a number in"):
        ClusterAggregation(global_weight=1.5)
