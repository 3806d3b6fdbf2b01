"""GraphAggregation (MIRA) checked by value: the graph and the Laplacian mixing computed by hand."""

import lightning as L
import numpy as np
import pytest
from lightning.pytorch.callbacks import Callback

from atlas_pl.callbacks import GraphAggregation
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from tests.conftest import tiny_data_kwargs, tiny_federation_kwargs


class Before(Callback):
    """Every client's adapters (both sides) at the round's last batch, before GraphAggregation (later in the list)."""

    def __init__(self) -> None:
        self.updates: dict[tuple[int, str], dict] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            for c in pl_module.participants():
                for side in pl_module.adapter_sides():
                    u = pl_module.pull(c, side)
                    self.updates[c, side] = {m: (a.double().numpy().copy(), b.double().numpy().copy(), u.scalings[m])
                                             for m, (a, b) in u.factors.items()}  # fmt: skip


def test_each_client_moves_toward_its_neighbours_on_the_hand_computed_similarity_graph(
    fast_trainer_kwargs, seeded
) -> None:
    probe, mira = Before(), GraphAggregation(strength=0.4)
    fed = Federation(**tiny_federation_kwargs(share="none"))
    dm = FederatedDataModule(**tiny_data_kwargs())
    L.Trainer(max_epochs=1, callbacks=[probe, mira], **fast_trainer_kwargs).fit(fed, datamodule=dm)
    clients, sides = sorted({c for c, _ in probe.updates}), list(fed.adapter_sides())
    vec = {c: np.concatenate([(s * (b @ a)).ravel() for side in sides
                              for _, (a, b, s) in sorted(probe.updates[c, side].items())])
           for c in clients}  # fmt: skip
    w = np.array([[0.0 if k == j else max(0.0, vec[k] @ vec[j] / np.linalg.norm(vec[k]) / np.linalg.norm(vec[j]))
                   for j in clients] for k in clients])  # fmt: skip
    assert (w > 0).any()
    w = w / w.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(mira.graph.numpy(), w, rtol=1e-6, atol=1e-9)
    for k in clients:
        after = fed.pull(k, "client")
        for m, (a, b) in after.factors.items():
            hand_a = 0.6 * probe.updates[k, "client"][m][0] + 0.4 * sum(
                w[k, j] * probe.updates[j, "client"][m][0] for j in clients
            )
            hand_b = 0.6 * probe.updates[k, "client"][m][1] + 0.4 * sum(
                w[k, j] * probe.updates[j, "client"][m][1] for j in clients
            )
            np.testing.assert_allclose(a.detach().double().numpy(), hand_a, rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(b.detach().double().numpy(), hand_b, rtol=1e-5, atol=1e-7)
            assert not np.allclose(hand_b, probe.updates[k, "client"][m][1])  # the mixing changed something


def test_strength_outside_zero_one_and_unequal_ranks_are_refused(fast_trainer_kwargs) -> None:
    with pytest.raises(ValueError, match="`strength` must be a number in"):
        GraphAggregation(strength=1.5)
    fed = Federation(**tiny_federation_kwargs(share="none"))
    fed.resize(0, {m: 2 for m in fed.adapter_layout(0, "client")})
    trainer = L.Trainer(max_epochs=1, callbacks=[GraphAggregation()], **fast_trainer_kwargs)
    with pytest.raises(ValueError, match="needs one rank and the same modules for all"):
        trainer.fit(fed, datamodule=FederatedDataModule(**tiny_data_kwargs()))
