from __future__ import annotations

import pytest

from atlas_pl.data import ClientChunkBatchSampler, RoundBatchSampler, sample_clients

SIZES = [10, 3, 7, 12, 5, 8]
OFFSETS = [sum(SIZES[:i]) for i in range(len(SIZES))]


def _client_of(index: int) -> int:
    return max(c for c, o in enumerate(OFFSETS) if o <= index)


def test_sample_clients_is_deterministic_and_sorted():
    a = sample_clients(20, 0.3, seed=5, round_idx=7)
    assert a == sample_clients(20, 0.3, seed=5, round_idx=7)
    assert a == sorted(a) and len(set(a)) == len(a)


def test_sample_clients_varies_across_rounds():
    rounds = {tuple(sample_clients(20, 0.3, seed=5, round_idx=r)) for r in range(10)}
    assert len(rounds) > 1


@pytest.mark.parametrize(("n", "frac", "expected"), [(10, 0.3, 3), (10, 1.0, 10), (10, 0.01, 1), (3, 0.5, 2)])
def test_sample_clients_returns_rounded_fraction_with_at_least_one(n, frac, expected):
    assert len(sample_clients(n, frac, seed=0, round_idx=0)) == expected


@pytest.mark.parametrize("frac", [0.0, -0.5, 1.5])
def test_sample_clients_rejects_fraction_outside_unit_interval(frac):
    with pytest.raises(ValueError, match="fraction"):
        sample_clients(10, frac, seed=0, round_idx=0)


def test_round_sampler_batches_come_from_a_single_client():
    s = RoundBatchSampler(OFFSETS, SIZES, batch_size=4, local_steps=3, fraction=1.0, seed=0)
    for batch in s:
        assert len({_client_of(i) for i in batch}) == 1


def test_round_sampler_yields_local_steps_batches_per_sampled_client_in_order():
    s = RoundBatchSampler(OFFSETS, SIZES, batch_size=4, local_steps=3, fraction=0.5, seed=2)
    s.set_epoch(3)
    batches = list(s)
    clients = sample_clients(len(SIZES), 0.5, seed=2, round_idx=3)
    assert len(batches) == len(s) == len(clients) * 3
    assert [_client_of(b[0]) for b in batches] == [c for c in clients for _ in range(3)]
    for b in batches:
        assert len(b) == min(4, SIZES[_client_of(b[0])])


def test_round_sampler_cycles_small_clients_covering_all_examples():
    s = RoundBatchSampler(OFFSETS, SIZES, batch_size=2, local_steps=4, seed=0)
    batches = [b for b in s if _client_of(b[0]) == 1]  # client 1 has 3 examples, needs 8
    assert len(batches) == 4
    flat = [i for b in batches for i in b]
    assert set(flat) == {OFFSETS[1], OFFSETS[1] + 1, OFFSETS[1] + 2}
    assert len(set(flat[:3])) == 3  # a full permutation before repeating


def test_round_sampler_is_reproducible_after_set_epoch():
    s1 = RoundBatchSampler(OFFSETS, SIZES, batch_size=4, local_steps=2, fraction=0.5, seed=9)
    s1.set_epoch(4)
    first = list(s1)
    s1.set_epoch(5)
    other = list(s1)
    resumed = RoundBatchSampler(OFFSETS, SIZES, batch_size=4, local_steps=2, fraction=0.5, seed=9)
    resumed.set_epoch(4)
    assert list(resumed) == first == list(resumed)
    assert other != first


def test_round_sampler_exposes_itself_as_sampler_for_lightning_set_epoch():
    from lightning.fabric.utilities.data import _set_sampler_epoch
    from torch.utils.data import DataLoader

    s = RoundBatchSampler(OFFSETS, SIZES, batch_size=4, local_steps=2, seed=0)
    dl = DataLoader(list(range(sum(SIZES))), batch_sampler=s)
    _set_sampler_epoch(dl, 6)
    assert s.epoch == 6


def test_round_sampler_rank_sharding_partitions_the_sampled_clients():
    world = 3
    shards = [
        RoundBatchSampler(OFFSETS, SIZES, batch_size=4, local_steps=2, fraction=1.0, seed=1, rank=r, world_size=world)
        for r in range(world)
    ]
    for s in shards:
        s.set_epoch(2)
    per_rank = [{_client_of(b[0]) for b in s} for s in shards]
    assert sorted(c for cs in per_rank for c in cs) == list(range(len(SIZES)))
    assert all(not (a & b) for i, a in enumerate(per_rank) for b in per_rank[i + 1 :])
    assert sum(len(s) for s in shards) == len(SIZES) * 2


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"batch_size": 0}, "batch_size"), ({"local_steps": 0}, "local_steps"), ({"fraction": 0.0}, "fraction")],
)
def test_round_sampler_rejects_bad_arguments_naming_them(kwargs, name):
    args = {"batch_size": 2, "local_steps": 1, "fraction": 1.0, "seed": 0} | kwargs
    with pytest.raises(ValueError, match=name):
        RoundBatchSampler(OFFSETS, SIZES, **args)


def test_chunk_sampler_covers_each_client_in_order_without_mixing():
    s = ClientChunkBatchSampler(OFFSETS, SIZES, batch_size=4)
    batches = list(s)
    assert len(batches) == len(s)
    assert [i for b in batches for i in b] == list(range(sum(SIZES)))
    assert all(len({_client_of(i) for i in b}) == 1 for b in batches)


def test_interleaved_rounds_hold_the_same_batches_in_a_seeded_mixed_order():
    from atlas_pl.data.sampling import RoundBatchSampler

    kwargs = dict(client_offsets=[0, 10, 20], client_sizes=[10, 10, 10], batch_size=2, local_steps=3, seed=1)
    plain = list(RoundBatchSampler(**kwargs))
    mixed = list(RoundBatchSampler(**kwargs, interleave=True))
    assert sorted(map(tuple, mixed)) == sorted(map(tuple, plain)) and mixed != plain
    assert mixed == list(RoundBatchSampler(**kwargs, interleave=True))
