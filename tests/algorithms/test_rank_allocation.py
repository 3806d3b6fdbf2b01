"""Budget-fitted rank allocation: budgets respected, patterns shared within a cluster, ranks grow with budget."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr
from transformers import GPT2Config

from atlas_pl.algorithms.rank_allocation import (
    RankAllocator,
    block_index,
    client_memory_fn,
    normalize_pattern,
    rank_pattern,
    scale_ranks,
)
from atlas_pl.memory import ModelShape, estimate_client_memory, estimate_latency, parse_size

SHAPE = ModelShape.from_config(GPT2Config(n_layer=6, n_embd=128, n_head=4, vocab_size=1000, n_positions=128))
TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
MODULES = [f"transformer.h.{i}.{t}" for i in range(6) for t in TARGETS]
IMPORTANCE = {m: 1.0 + (k * 7919) % 23 for k, m in enumerate(MODULES)}  # distinct, fixed
ESTIMATE = client_memory_fn(SHAPE, batch_size=4, seq_len=64, cut_layer=3, target_modules=TARGETS, device="cpu")
FAST = settings(max_examples=30, deadline=None)


def floor_bytes(cut=3, r=1):
    return estimate_client_memory(SHAPE, cut, 4, 64, rank=r, target_modules=TARGETS, device="cpu").total


def client_modules(cut):
    return {m: v for m, v in IMPORTANCE.items() if block_index(m) < cut}


def test_rank_pattern_is_proportional_to_importance_and_clipped():
    assert rank_pattern({"a": 1.0, "b": 0.5, "c": 0.01}, r_min=2, r_max=16) == {"a": 16, "b": 8, "c": 2}
    assert rank_pattern({"a": 1.0, "b": 0.5}, r_min=1, r_max=16, scale=5) == {"a": 5, "b": 3}


def test_scale_ranks_rounds_halves_up():
    assert scale_ranks({"a": 0.5, "b": 0.25}, 5.0, 1, 8) == {"a": 3, "b": 1}


def test_normalize_pattern_peaks_at_one():
    assert normalize_pattern({"a": 2.0, "b": 1.0}) == {"a": 1.0, "b": 0.5}
    assert normalize_pattern({"a": 0.0}) == {"a": 1.0}


@FAST
@given(extra=st.integers(min_value=0, max_value=40 * 2**20))
def test_no_client_exceeds_its_budget(extra):
    budget = floor_bytes() + extra
    alloc = RankAllocator(ESTIMATE, r_min=1, r_max=64).allocate(client_modules(3), budget, client="c")
    assert alloc.peak_bytes <= budget
    assert ESTIMATE(3, alloc.rank_pattern).total == alloc.peak_bytes


@FAST
@given(extra=st.integers(min_value=0, max_value=20 * 2**20))
def test_the_scale_is_the_largest_that_fits(extra):
    budget = floor_bytes() + extra
    allocator = RankAllocator(ESTIMATE, r_min=1, r_max=64)
    alloc = allocator.allocate(client_modules(3), budget)
    pi = normalize_pattern(client_modules(3))
    bigger = scale_ranks(pi, alloc.scale * 1.0001 + 1e-9, 1, 64)
    if bigger != alloc.rank_pattern:  # the next breakpoint must not fit (unless everything is at r_max)
        next_up = min(s for s in [(k + 0.5) / p for p in pi.values() for k in range(1, 64)] if s > alloc.scale * 1.0001)
        assert ESTIMATE(3, scale_ranks(pi, next_up * (1 + 1e-12), 1, 64)).total > budget


def test_patterns_agree_within_a_cluster_and_ranks_grow_with_budget():
    allocator = RankAllocator(ESTIMATE, r_min=1, r_max=64)
    span = floor_bytes(r=64) - floor_bytes()
    budgets = [floor_bytes() + int(f * span) for f in (0.05, 0.1, 0.3, 0.5)]  # below r_max clipping
    allocs = [allocator.allocate(client_modules(3), b, client=i) for i, b in enumerate(budgets)]
    modules = sorted(allocs[0].rank_pattern)
    for low, high in zip(allocs, allocs[1:]):
        assert all(high.rank_pattern[m] >= low.rank_pattern[m] for m in modules)
        rho = spearmanr([low.rank_pattern[m] for m in modules], [high.rank_pattern[m] for m in modules])[0]
        assert rho >= 0.9
    assert sum(allocs[-1].rank_pattern.values()) > sum(allocs[0].rank_pattern.values())


def test_clusters_get_their_own_patterns():
    flipped = {m: 30.0 - v for m, v in IMPORTANCE.items()}
    allocator = RankAllocator(ESTIMATE, r_min=1, r_max=64)
    budget = (floor_bytes() + floor_bytes(r=64)) // 2
    a, b = allocator.allocate_all({0: IMPORTANCE, 1: flipped}, [budget] * 2, cluster_ids=[0, 1])
    modules = sorted(a.rank_pattern)
    assert spearmanr([a.rank_pattern[m] for m in modules], [b.rank_pattern[m] for m in modules])[0] < 0


def test_cut_layer_with_the_smallest_latency_among_those_that_fit():
    def latency(cut, ranks):
        return estimate_latency(SHAPE, cut, "phone-1gb", batch_size=4, seq_len=64).total_s

    estimate = client_memory_fn(SHAPE, batch_size=4, seq_len=64, target_modules=TARGETS, device="cpu")
    allocator = RankAllocator(estimate, r_min=1, r_max=16, cut_layers=[1, 2, 3, 4], latency_fn=latency)
    alloc = allocator.allocate(IMPORTANCE, floor_bytes(cut=3) + 2**20)
    assert alloc.cut_layer == 1  # the least client compute; all four fit
    assert set(alloc.rank_pattern) == {m for m in MODULES if block_index(m) < 1}
    assert set(alloc.server_rank_pattern) == {m for m in MODULES if block_index(m) >= 1}
    tight = allocator.allocate(IMPORTANCE, floor_bytes(cut=2))
    assert tight.cut_layer in (1, 2)


def test_without_latency_the_cut_with_most_rank_wins():
    estimate = client_memory_fn(SHAPE, batch_size=4, seq_len=64, target_modules=TARGETS, device="cpu")
    alloc = RankAllocator(estimate, r_min=1, r_max=8, cut_layers=[1, 3]).allocate(IMPORTANCE, "1GB")
    assert alloc.cut_layer == 3 and set(alloc.rank_pattern.values()) == {8}


def test_budget_below_the_minimum_names_client_budget_and_minimum():
    need = floor_bytes(cut=3, r=2)
    allocator = RankAllocator(ESTIMATE, r_min=2, r_max=8)
    with pytest.raises(ValueError, match=r"client 'phone-7'.*budget.*below.*r_min=2") as err:
        allocator.allocate(client_modules(3), need - 1, client="phone-7")
    assert str(need) in str(err.value)


def test_rank_bound_and_size_errors():
    with pytest.raises(ValueError, match="r_min"):
        RankAllocator(ESTIMATE, r_min=9, r_max=8)
    with pytest.raises(ValueError, match="r_max"):
        RankAllocator(ESTIMATE, r_min=1, r_max=0)
    with pytest.raises(ValueError, match="lots"):
        RankAllocator(ESTIMATE).allocate(client_modules(3), "lots")
    with pytest.raises(ValueError, match="cut_layers"):
        RankAllocator(ESTIMATE, cut_layers=[])


def test_allocate_all_checks_lengths_and_patterns():
    allocator = RankAllocator(ESTIMATE)
    with pytest.raises(ValueError, match="one entry per client"):
        allocator.allocate_all({0: IMPORTANCE}, ["1GB"], cluster_ids=[0, 0])
    with pytest.raises(ValueError, match=r"cluster\(s\) \[1\]"):
        allocator.allocate_all({0: IMPORTANCE}, ["1GB"], cluster_ids=[1])


def test_allocation_serializes_to_plain_values():
    import json

    alloc = RankAllocator(ESTIMATE).allocate(client_modules(3), parse_size("1GB"))
    data = json.loads(json.dumps(alloc.as_dict()))
    assert data["rank_pattern"] == alloc.rank_pattern and data["estimate"]["total"] == alloc.peak_bytes
