"""Client faults: a client that raises, diverges (NaN) or does not answer in time is left out of the round's merge,
logged, and trains again next round; too few healthy clients fail the round with the reasons."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from atlas_pl.callbacks import ClusterAggregation, FaultInjection
from atlas_pl.callbacks.cluster_aggregation import check_quorum, collect_updates
from atlas_pl.data import FederatedDataModule
from atlas_pl.faults import FaultSpec, QuorumError
from atlas_pl.federation import Federation
from atlas_pl.protocol import AdapterUpdate
from tests.conftest import tiny_data_kwargs, tiny_federation_kwargs

CLIENTS = 6
# seed 4 draws 6 faulty client-rounds of 18 (33 %), every kind: round 0 {4: raise}, 1 {5: nan},
# 2 {0: timeout, 2: raise, 3: timeout, 5: raise}
INJECTION = dict(rate=0.3, seed=4, delay_s=4.0)
TIMEOUT_S = 3.0  # a healthy tiny step takes milliseconds; 1 s was missed under a loaded CPU (1.3 s seen)


class Snapshot(Callback):
    """At each round's last batch, before (first in the list) and after (last) the merge: every client's factors."""

    def __init__(self, records: list[dict], when: str) -> None:
        self.records, self.when = records, when

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 < trainer.num_training_batches:
            return
        factors = {c: {m: (a.detach().clone(), b.detach().clone())
                       for m, (a, b, _) in pl_module.backbone.bank.factors(pl_module.clients[c].client_adapter).items()}
                   for c in range(pl_module.num_clients)}  # fmt: skip
        if self.when == "before":
            state = {"participants": pl_module.participants(), "faults": pl_module.round_faults()}
            self.records.append({"round": trainer.current_epoch, "before": factors, **state})
        else:
            self.records[-1]["after"] = factors


def _fit(tmp_path, tolerate: bool = True, quorum: float = 0.0, injection: dict | None = None, rounds: int = 3):
    records: list[dict] = []
    fed = Federation(**tiny_federation_kwargs(num_clients=CLIENTS, share="none",
                                              faults={"tolerate": tolerate, "timeout_s": TIMEOUT_S}))  # fmt: skip
    dm = FederatedDataModule(**tiny_data_kwargs(num_clients=CLIENTS, local_steps=2))
    inject = FaultInjection(**(injection or INJECTION))
    callbacks = [Snapshot(records, "before"), inject, ClusterAggregation("fedavg", quorum=quorum),
                 Snapshot(records, "after")]  # fmt: skip
    trainer = L.Trainer(max_epochs=rounds, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
                        enable_checkpointing=False, default_root_dir=tmp_path, callbacks=callbacks)  # fmt: skip
    trainer.fit(fed, datamodule=dm)
    return fed, inject, records


def test_faulty_clients_are_left_out_and_the_merge_equals_the_healthy_clients_merge(tmp_path, seeded) -> None:
    fed, inject, records = _fit(tmp_path, quorum=0.3)
    assert len(fed.history) == 3 and all(torch.isfinite(torch.tensor(h["val_loss"])) for h in fed.history)
    expected_reason = {"raise": "RuntimeError: injected fault", "nan": "non-finite loss", "timeout": "no answer within"}
    logged = {(f["round"], f["client"]): f["reason"] for f in fed.fault_log}
    injected = {(r, c): k for r, faults in inject.injected.items() for c, k in faults.items()}
    assert sum(len(f) for f in inject.injected.values()) == 6 and set(logged) == set(injected)
    for key, kind in injected.items():
        assert logged[key].startswith(expected_reason[kind]), (key, kind, logged[key])
    weights = fed.num_examples
    for rec in records:
        faulty = set(rec["faults"])
        assert faulty == {c for (r, c) in injected if r == rec["round"]}
        healthy = [c for c in range(CLIENTS) if c not in faulty]
        assert rec["participants"] == healthy
        total = sum(weights[c] for c in healthy)
        for c in range(CLIENTS):  # every member, faulty ones included, receives the merge of the healthy ones only
            for m, (a, b) in rec["after"][c].items():
                want_a = sum(weights[h] / total * rec["before"][h][m][0] for h in healthy)
                want_b = sum(weights[h] / total * rec["before"][h][m][1] for h in healthy)
                torch.testing.assert_close(a, want_a, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(b, want_b, rtol=1e-5, atol=1e-6)
    # the NaN client of round 1 trains again, healthy, in round 2
    assert 5 in records[1]["faults"] and records[1]["faults"][5].startswith("non-finite")
    assert all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in records[2]["after"][5].values())


def test_a_cluster_below_quorum_fails_the_round_naming_every_fault(tmp_path, seeded) -> None:
    with pytest.raises(QuorumError, match=r"round 2: only 2 of the 6 clients of cluster 0 answered \(quorum 0.5\)"):
        _fit(tmp_path, quorum=0.5)
    with pytest.raises(QuorumError, match="client 0: RuntimeError: injected fault: client 0 crashed"):
        _fit(tmp_path, injection=dict(rate=1.0, kinds=["raise"]), rounds=1)  # nobody answers


def test_without_tolerance_a_client_error_ends_the_run(tmp_path, seeded) -> None:
    with pytest.raises(RuntimeError, match="injected fault: client 4 crashed"):
        _fit(tmp_path, tolerate=False, rounds=1)


class _Module:
    """The aggregation side of the federation protocol, by hand: three senders, one of them non-finite."""

    def __init__(self, bad: float) -> None:
        a, b = torch.ones(2, 4), torch.ones(4, 2)
        self.updates = {c: AdapterUpdate({"m": (a * (c + 1), b.clone())}, {"m": 1.0}, 1.0) for c in range(3)}
        self.updates[1].factors["m"][1][0, 0] = bad

    def adapter_sides(self):
        return ("client",)

    def local_clients(self):
        return [0, 1, 2, 3]

    def cluster_of(self, c):
        return 0

    def participants(self):
        return [0, 1, 2]

    def round_faults(self):
        return {3: "RuntimeError: boom"}

    def pull(self, c, side):
        return self.updates[c]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_updates_are_dropped_before_any_merge_and_count_against_the_quorum(bad) -> None:
    sides, local, clusters, sent, faults = collect_updates(_Module(bad))
    assert sorted(sent) == [(0, "client"), (2, "client")]
    assert faults == {1: "non-finite client update", 3: "RuntimeError: boom"}
    check_quorum(clusters, sent, faults, 0.5, 7)  # 2 healthy of 4
    with pytest.raises(QuorumError, match="round 7: only 2 of the 4 clients of cluster 0 answered"):
        check_quorum(clusters, sent, faults, 0.75, 7)


def test_bad_fault_settings_are_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        FaultSpec(tolerate=True, timeout_s=0)
    with pytest.raises(ValueError, match="kinds"):
        FaultInjection(kinds=["explode"])
    with pytest.raises(ValueError, match="rate"):
        FaultInjection(rate=1.5)
    with pytest.raises(ValueError, match="quorum"):
        ClusterAggregation(quorum=2)


def test_the_fault_log_is_checkpointed_with_the_federation() -> None:
    fed = Federation(**tiny_federation_kwargs(num_clients=2, faults={"tolerate": True}))
    fed.fault_log = [{"round": 0, "client": 1, "cluster": 0, "reason": "non-finite loss (nan)"}]
    checkpoint = {"state_dict": fed.state_dict()}
    fed.on_save_checkpoint(checkpoint)
    other = Federation(**tiny_federation_kwargs(num_clients=2))
    other.on_load_checkpoint(checkpoint)
    assert other.fault_log == fed.fault_log and other.hparams["faults"]["tolerate"] is False
