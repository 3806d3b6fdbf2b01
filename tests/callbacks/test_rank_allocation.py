"""RankAllocation: budget-fitted, importance-shaped ranks written into the federation's adapters."""

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from scipy.stats import spearmanr

from atlas_pl.callbacks.cluster_aggregation import ClusterAggregation
from atlas_pl.callbacks.rank_allocation import RankAllocation
from atlas_pl.data import FederatedDataModule
from atlas_pl.federation import Federation
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.protocol import ClientSizing
from tests.conftest import phase_trainer

SHAPE = {"n_layer": 4, "n_embd": 64, "n_head": 2, "initializer_range": 0.1}
TARGETS = ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]


def _setup(num_clients: int = 4, cut_layer: int = 2):
    L.seed_everything(0, verbose=False)
    fed = Federation(
        model="gpt2-tiny",
        model_overrides=dict(SHAPE),
        lora=LoraSpec(rank=8, target_modules=TARGETS),
        num_clients=num_clients,
        cut_layer=cut_layer,
        learning_rate=3e-3,
    )
    dm = FederatedDataModule(
        num_clients=num_clients,
        num_groups=2,
        tasks_per_group=1,
        examples_per_client=32,
        max_length=32,
        batch_size=8,
        local_steps=1,
        seed=0,
    )
    return fed, dm



def _sizing(fed, dm) -> ClientSizing:
    """What ``Federation.client_sizing`` reports during fit (it reads the Trainer's datamodule)."""
    return ClientSizing(fed.backbone.model.config, dm.batch_size, dm.max_length, tuple(fed.backbone.targets),
                        fed.backbone.cut_layer)  # fmt: skip


def _budgets(fed, dm, extra_mib: list[float]) -> list[int]:
    dm.setup()
    estimate = RankAllocation.estimate_fn(_sizing(fed, dm))
    modules = list(fed.backbone.bank.ranks["client_0"])
    floor = estimate(None, dict.fromkeys(modules, 1)).total
    return [int(floor + x * 2**20) for x in extra_mib]


def test_estimates_fit_budgets_ranks_grow_with_budget_and_patterns_agree(tmp_path) -> None:
    fed, dm = _setup()
    fed.assign_clusters([0, 0, 0, 0])
    budgets = _budgets(fed, dm, [0.05, 0.3, 1.0, 3.0])
    allocation = RankAllocation(budgets=budgets, r_min=1, r_max=16)
    phase_trainer(tmp_path, [allocation]).fit(fed, datamodule=dm)

    rows = allocation.allocations
    assert all(a["peak_bytes"] <= a["budget_bytes"] for a in rows)
    totals = [sum(a["rank_pattern"].values()) for a in rows]
    assert totals == sorted(totals) and totals[-1] > totals[0]
    modules = list(rows[0]["rank_pattern"])
    for a in rows[1:3]:  # below the budgets where clipping at r_max flattens the pattern
        rho = spearmanr([rows[-1]["rank_pattern"][m] for m in modules], [a["rank_pattern"][m] for m in modules])[0]
        assert rho != rho or rho >= 0.5  # NaN when one pattern is constant
    for i, a in enumerate(rows):
        assert fed.backbone.bank.ranks[f"client_{i}"] == a["rank_pattern"]


def test_uniform_pattern_gives_every_module_one_rank(tmp_path) -> None:
    fed, dm = _setup()
    allocation = RankAllocation(budgets=_budgets(fed, dm, [0.2, 2.0]), pattern="uniform", r_max=16)
    phase_trainer(tmp_path, [allocation]).fit(fed, datamodule=dm)
    for a in allocation.allocations:
        assert len(set(a["rank_pattern"].values())) == 1


def test_resume_restores_the_allocated_ranks(tmp_path) -> None:
    fed, dm = _setup()
    budgets = _budgets(fed, dm, [0.1, 2.0])
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    phase_trainer(tmp_path, [RankAllocation(budgets=budgets), ckpt], max_epochs=1).fit(fed, datamodule=dm)

    resumed, dm2 = _setup()
    allocation = RankAllocation(budgets=budgets)
    allocation.run = lambda *a, **k: pytest.fail("a resumed run must not allocate again")
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    phase_trainer(tmp_path, [allocation, ckpt2], max_epochs=2).fit(
        resumed, datamodule=dm2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    for i in range(4):
        assert resumed.backbone.bank.ranks[f"client_{i}"] == fed.backbone.bank.ranks[f"client_{i}"]


def test_a_budget_below_the_minimum_names_the_client_and_the_minimum(tmp_path) -> None:
    fed, dm = _setup()
    budgets = _budgets(fed, dm, [1.0, 1.0, -0.5, 1.0])
    with pytest.raises(ValueError, match=r"client 2: memory budget .* below"):
        phase_trainer(tmp_path, [RankAllocation(budgets=budgets)]).fit(fed, datamodule=dm)


def test_constructor_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RankAllocation()
    with pytest.raises(ValueError, match="profile"):
        RankAllocation(profiles=["toaster-2mb"])
    with pytest.raises(ValueError):
        RankAllocation(budgets=["eight gigs"])
    with pytest.raises(ValueError, match="r_min"):
        RankAllocation(budgets=["1GB"], r_min=8, r_max=4)


def test_shared_weakest_ranks_fit_everyone_and_strongest_ranks_exceed_small_budgets(tmp_path) -> None:
    fed, dm = _setup()
    budgets = _budgets(fed, dm, [0.1, 0.5, 1.0, 3.0])
    weakest = RankAllocation(budgets=budgets, pattern="uniform", share="weakest")
    phase_trainer(tmp_path, [weakest]).fit(fed, datamodule=dm)
    assert len({tuple(a["rank_pattern"].values()) for a in weakest.allocations}) == 1
    assert all(a["peak_bytes"] <= a["budget_bytes"] for a in weakest.allocations)

    fed2, dm2 = _setup()
    strongest = RankAllocation(budgets=budgets, pattern="uniform", share="strongest")
    phase_trainer(tmp_path, [strongest]).fit(fed2, datamodule=dm2)
    assert strongest.allocations[0]["peak_bytes"] > strongest.allocations[0]["budget_bytes"]
    assert strongest.allocations[-1]["peak_bytes"] <= strongest.allocations[-1]["budget_bytes"]



def test_cut_layers_follow_budgets_train_merge_and_survive_a_resume(tmp_path) -> None:
    fed, dm = _setup(cut_layer=1)
    dm.setup()
    estimate = RankAllocation.estimate_fn(_sizing(fed, dm), fixed_cut=False)
    need = {cut: estimate(cut, dict.fromkeys(fed.backbone.client_module_names(cut), 2)).total for cut in (1, 2, 3)}
    budgets = [need[1] + 1000, need[3] + 2**22, need[2] + 1000, need[3] + 2**22]
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    allocation = RankAllocation(budgets=budgets, r_min=2, r_max=8, cut_layers=[1, 2, 3])
    phase_trainer(tmp_path, [allocation, ClusterAggregation("exact"), ckpt], max_epochs=1).fit(fed, datamodule=dm)

    cuts = [a["cut_layer"] for a in allocation.allocations]
    assert cuts[0] == 1 and cuts[1] == cuts[3] == 3  # the weakest keeps one block, the strongest three
    assert [fed.backbone.cut_of(f"client_{i}") for i in range(4)] == cuts
    assert all(a["peak_bytes"] <= a["budget_bytes"] for a in allocation.allocations)
    p1 = {m: s * b @ a for m, (a, b, s) in fed.backbone.bank.factors("client_1").items()}
    p3 = {m: s * b @ a for m, (a, b, s) in fed.backbone.bank.factors("client_3").items()}
    for module in p1:  # same cut and ranks, one cluster: the same merged update
        torch.testing.assert_close(p1[module], p3[module])

    resumed, dm2 = _setup(cut_layer=1)
    again = RankAllocation(budgets=budgets, r_min=2, r_max=8, cut_layers=[1, 2, 3])
    ckpt2 = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    phase_trainer(tmp_path, [again, ckpt2], max_epochs=2).fit(
        resumed, datamodule=dm2, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt")
    )
    assert [resumed.backbone.cut_of(f"client_{i}") for i in range(4)] == cuts


def test_a_client_cut_before_the_federations_cut_is_rejected(tmp_path) -> None:
    fed, dm = _setup()  # federation cut 2
    with pytest.raises(ValueError, match=r"cut_layer.*\[2, 3\]"):
        phase_trainer(tmp_path, [RankAllocation(budgets=["1GB"], cut_layers=[1, 2])]).fit(fed, datamodule=dm)
