"""Exact LoRA aggregation and its baselines against brute-force dense references (small shapes, CPU)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from atlas_pl.algorithms.aggregation import AggregationReport, aggregate_lora, merge_lora_states
from atlas_pl.algorithms.merge import dense_svd_merge, merge_lora, normalize_weights

FAST = settings(max_examples=25, deadline=None)


# --------------------------------------------------------------------------------------------------- helpers
def make_factors(d_out, d_in, ranks, scalings, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(r, d_in, generator=gen).to(dtype), torch.randn(d_out, r, generator=gen).to(dtype), s)
        for r, s in zip(ranks, scalings)
    ]


def dense_reference(factors, num_examples):
    """Brute force ``Σ p_i s_i B_i A_i`` in float64."""
    weights = normalize_weights(num_examples)
    return sum(p * s * b.double() @ a.double() for (a, b, s), p in zip(factors, weights))


def as_states(factors, module="m"):
    return [{f"{module}.lora_A": a, f"{module}.lora_B": b} for a, b, _ in factors]


def product(state, scaling, module="m"):
    return scaling * state[f"{module}.lora_B"].double() @ state[f"{module}.lora_A"].double()


def assert_relative_close(got, ref, rel=1e-5):
    atol = rel * float(ref.norm()) + 1e-12
    torch.testing.assert_close(got.double(), ref.double(), rtol=0, atol=atol)
    assert float((got.double() - ref.double()).norm()) <= rel * float(ref.norm()) + 1e-12


@st.composite
def cases(draw):
    n = draw(st.integers(1, 5))
    ranks = draw(st.lists(st.integers(1, 6), min_size=n, max_size=n))
    counts = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    assume(sum(counts) > 0)
    scalings = draw(st.lists(st.floats(0.1, 4.0), min_size=n, max_size=n))
    d_out, d_in, seed = draw(st.integers(1, 12)), draw(st.integers(1, 12)), draw(st.integers(0, 2**16))
    return make_factors(d_out, d_in, ranks, scalings, seed), counts


# ------------------------------------------------------------------------------------------------ exact merge
@FAST
@given(case=cases())
def test_exact_merge_equals_dense_sum_of_weighted_products(case) -> None:
    factors, counts = case
    update = merge_lora(factors, counts)
    assert_relative_close(update.dense(), dense_reference(factors, counts))


@FAST
@given(case=cases(), rank=st.integers(1, 8))
def test_truncation_error_matches_dense_svd_tail(case, rank) -> None:
    factors, counts = case
    s_ref = torch.linalg.svdvals(dense_reference(factors, counts))
    tail = float(s_ref[rank:].square().sum().sqrt() / s_ref.norm()) if s_ref.norm() > 0 else 0.0
    assert merge_lora(factors, counts).truncation_error(rank) == pytest.approx(tail, abs=1e-5)


@FAST
@given(case=cases(), rank=st.integers(1, 8), scaling=st.floats(0.1, 4.0))
def test_truncated_factors_are_the_best_low_rank_update(case, rank, scaling) -> None:
    factors, counts = case
    ref = dense_reference(factors, counts)
    a, b, error = merge_lora(factors, counts).truncate(rank, scaling)
    assert a.shape == (rank, ref.shape[1]) and b.shape == (ref.shape[0], rank)
    got_error = float((scaling * b.double() @ a.double() - ref).norm() / ref.norm()) if ref.norm() > 0 else 0.0
    assert got_error == pytest.approx(error, abs=1e-5)


def test_exact_merge_with_equal_ranks_matches_weighted_average_of_products() -> None:
    factors = make_factors(6, 5, [2, 2, 2], [0.5, 0.5, 0.5], seed=1)
    counts = [10, 20, 70]
    expected = sum(p * 0.5 * b @ a for (a, b, _), p in zip(factors, [0.1, 0.2, 0.7]))

    got = merge_lora(factors, counts).dense()

    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_client_with_rank_at_least_merged_rank_receives_merged_update_exactly() -> None:
    factors = make_factors(16, 12, [2, 3, 4], [1.0, 2.0, 0.5], seed=2)
    counts, target = [1, 2, 3], [2, 3, 9]
    ref = dense_reference(factors, counts)

    states, report = aggregate_lora(as_states(factors), counts, [1.0, 2.0, 0.5], target_ranks=target)

    assert report.merged_rank["m"] == 9
    assert report.truncation_error["m"][2] == 0.0
    assert_relative_close(product(states[2], 0.5), ref)


def test_rank_above_core_size_is_zero_padded_and_still_exact() -> None:
    factors = make_factors(4, 3, [1, 2], [1.0, 1.0], seed=3)
    update = merge_lora(factors, [1, 1])

    a, b, error = update.truncate(7, 2.0)

    assert a.shape == (7, 3) and b.shape == (4, 7) and error == 0.0
    assert_relative_close(2.0 * b.double() @ a.double(), dense_reference(factors, [1, 1]))


def test_stack_wider_than_module_skips_qr_and_keeps_core_min_sized() -> None:
    factors = make_factors(5, 3, [4, 4], [1.0, 1.0], seed=4)

    update = merge_lora(factors, [1, 1])

    assert update.q_b is None and update.q_a is None
    assert update.u.shape[0] == 5 and update.vh.shape[1] == 3
    assert_relative_close(update.dense(), dense_reference(factors, [1, 1]))


def test_rank_deficient_stack_has_rank_of_distinct_clients() -> None:
    (a, b, s), *_ = make_factors(10, 8, [3], [1.0], seed=5)
    factors = [(a, b, s), (a.clone(), b.clone(), s)]

    update = merge_lora(factors, [1, 1])

    assert update.rank == 3 and update.truncation_error(3) == 0.0
    assert_relative_close(update.dense(), dense_reference(factors, [1, 1]))


def test_fresh_adapters_with_zero_b_merge_to_zeros_without_nan() -> None:
    factors = [(torch.randn(r, 6), torch.zeros(5, r), 2.0) for r in (2, 3)]

    states, report = aggregate_lora(as_states(factors), [1, 1], [2.0, 2.0])

    for state in states:
        assert all(torch.equal(t, torch.zeros_like(t)) for t in state.values())
    assert report.update_norm["m"] == 0.0 and report.truncation_error["m"] == [0.0, 0.0]
    assert report.merged_rank["m"] == 0


def test_low_precision_inputs_come_back_in_their_dtype() -> None:
    factors = make_factors(8, 6, [2, 3], [1.0, 1.0], seed=6, dtype=torch.bfloat16)

    states, _ = aggregate_lora(as_states(factors), [1, 1], [1.0, 1.0])

    assert {t.dtype for s in states for t in s.values()} == {torch.bfloat16}


def test_float64_compute_is_exact_to_double_precision() -> None:
    factors = make_factors(20, 15, [3, 5, 4], [0.7, 1.3, 2.0], seed=7, dtype=torch.float64)

    update = merge_lora(factors, [3, 1, 2], compute_dtype=torch.float64)

    assert_relative_close(update.dense(), dense_reference(factors, [3, 1, 2]), rel=1e-12)


def test_compress_keeps_the_update_within_tolerance_at_its_numerical_rank() -> None:
    factors = make_factors(30, 20, [2, 3], [1.0, 0.5], seed=8)
    update = merge_lora(factors, [2, 1])

    a_frozen, b_frozen = update.compress(rel_tol=1e-6)

    assert a_frozen.shape == (5, 20) and b_frozen.shape == (30, 5)
    assert_relative_close(b_frozen @ a_frozen, dense_reference(factors, [2, 1]), rel=1e-5)


def test_compress_with_loose_tolerance_drops_small_directions() -> None:
    update = merge_lora(make_factors(30, 20, [2, 3], [1.0, 0.5], seed=8), [2, 1])
    tail = update.tail_energy()
    keep = int((tail[1:] > 0.5 * tail[0]).sum()) + 1

    a_frozen, _ = update.compress(rel_tol=0.5)

    assert a_frozen.shape[0] == keep < 5


# --------------------------------------------------------------------------------------- state-dict aggregation
def test_report_holds_update_norm_and_bytes_exchanged() -> None:
    factors = make_factors(8, 6, [2, 4], [1.0, 1.0], seed=9)

    states, report = aggregate_lora(as_states(factors), [1, 3], [1.0, 1.0], target_ranks=[3, 3])

    assert isinstance(report, AggregationReport) and report.method == "exact"
    assert report.update_norm["m"] == pytest.approx(float(dense_reference(factors, [1, 3]).norm()), rel=1e-5)
    assert report.bytes_up == 4 * (2 + 4) * (8 + 6)
    assert report.bytes_down == 4 * 2 * 3 * (8 + 6)
    assert report.bytes_exchanged == report.bytes_up + report.bytes_down


def test_per_module_ranks_and_scalings_apply_per_module() -> None:
    fq, fv = make_factors(8, 6, [2, 3], [1.0, 2.0], seed=10), make_factors(4, 6, [1, 2], [3.0, 4.0], seed=11)
    states = [{**q, **v} for q, v in zip(as_states(fq, "q"), as_states(fv, "v"))]
    scalings = [{"q": 1.0, "v": 3.0}, {"q": 2.0, "v": 4.0}]

    new, _ = aggregate_lora(states, [1, 1], scalings, target_ranks=[{"q": 5, "v": 3}, {"q": 1, "v": 1}])

    assert new[0]["q.lora_A"].shape == (5, 6) and new[0]["v.lora_B"].shape == (4, 3)
    assert new[1]["q.lora_A"].shape == (1, 6)
    assert_relative_close(product(new[0], 1.0, "q"), dense_reference(fq, [1, 1]))
    assert_relative_close(product(new[0], 3.0, "v"), dense_reference(fv, [1, 1]))


def test_target_scalings_are_divided_out_of_the_new_factors() -> None:
    factors = make_factors(8, 6, [2, 2], [1.0, 1.0], seed=12)

    new, _ = aggregate_lora(as_states(factors), [1, 1], [1.0, 1.0], target_ranks=[4, 4], target_scalings=[0.25, 4.0])

    assert_relative_close(product(new[0], 0.25), dense_reference(factors, [1, 1]))
    assert_relative_close(product(new[1], 4.0), dense_reference(factors, [1, 1]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dense_svd_and_exact_agree_at_the_same_target_rank(seed) -> None:
    factors = make_factors(24, 18, [2, 5, 3], [2.0, 0.4, 1.0], seed=seed)
    args = (as_states(factors), [5, 2, 3], [2.0, 0.4, 1.0])

    exact, rep_exact = aggregate_lora(*args, target_ranks=[2, 4, 6], method="exact")
    dense, rep_dense = aggregate_lora(*args, target_ranks=[2, 4, 6], method="dense_svd")

    for e, d, s in zip(exact, dense, [2.0, 0.4, 1.0]):
        assert_relative_close(product(e, s), product(d, s), rel=1e-4)
    assert rep_exact.truncation_error["m"] == pytest.approx(rep_dense.truncation_error["m"], abs=1e-5)


def test_merge_lora_states_returns_one_factored_update_per_module() -> None:
    fq, fv = make_factors(8, 6, [2, 3], [1.0, 2.0], seed=13), make_factors(4, 6, [1, 2], [1.0, 1.0], seed=14)
    states = [{**q, **v} for q, v in zip(as_states(fq, "q"), as_states(fv, "v"))]

    updates = merge_lora_states(states, [1, 2], [{"q": 1.0, "v": 1.0}, {"q": 2.0, "v": 1.0}])

    assert sorted(updates) == ["q", "v"]
    assert_relative_close(updates["q"].dense(), dense_reference(fq, [1, 2]))


def test_dense_svd_merge_equals_dense_sum() -> None:
    factors = make_factors(9, 7, [2, 3], [1.0, 0.5], seed=15)

    assert_relative_close(dense_svd_merge(factors, [1, 1]).dense(), dense_reference(factors, [1, 1]))


# ------------------------------------------------------------------------------------------------- baselines
def test_fedavg_method_averages_a_and_b_separately() -> None:
    # Prepare: two rank-1 clients with equal weight.
    states = [
        {"m.lora_A": torch.tensor([[1.0, 2.0]]), "m.lora_B": torch.tensor([[2.0], [0.0]])},
        {"m.lora_A": torch.tensor([[3.0, 0.0]]), "m.lora_B": torch.tensor([[0.0], [4.0]])},
    ]
    # Execute
    new, report = aggregate_lora(states, [1, 1], [1.0, 1.0], method="fedavg")
    # Assert: mean(A) = [[2, 1]], mean(B) = [[1], [2]]. The exact ΔW = 1/2 [[2, 4], [0, 0]] + 1/2 [[0, 0], [12, 0]]
    # = [[1, 2], [6, 0]], but mean(B) @ mean(A) = [[2, 1], [4, 2]]: error ‖[[1, -1], [-2, 2]]‖ / ‖ΔW‖ = √10 / √41.
    for state in new:
        torch.testing.assert_close(state["m.lora_A"], torch.tensor([[2.0, 1.0]]))
        torch.testing.assert_close(state["m.lora_B"], torch.tensor([[1.0], [2.0]]))
    assert report.truncation_error["m"] == pytest.approx([(10 / 41) ** 0.5] * 2, rel=1e-6)


def test_fedavg_method_rejects_heterogeneous_ranks() -> None:
    factors = make_factors(4, 3, [1, 2], [1.0, 1.0])

    with pytest.raises(ValueError, match=r"FedAvg needs one rank.*\[1, 2\].*use Exact"):
        aggregate_lora(as_states(factors), [1, 1], [1.0, 1.0], method="fedavg")


def test_zero_pad_pads_averages_and_slices_to_each_rank() -> None:
    # Prepare: client 0 rank 1, client 1 rank 2, weights 1/4 and 3/4.
    states = [
        {"m.lora_A": torch.tensor([[1.0, 2.0]]), "m.lora_B": torch.tensor([[1.0], [0.0]])},
        {"m.lora_A": torch.tensor([[3.0, 4.0], [5.0, 6.0]]), "m.lora_B": torch.tensor([[1.0, 2.0], [3.0, 4.0]])},
    ]
    # Execute
    new, _ = aggregate_lora(states, [1, 3], [1.0, 1.0], method="zero_pad")
    # Assert: A = 1/4 [[1, 2], [0, 0]] + 3/4 [[3, 4], [5, 6]]; B = 1/4 [[1, 0], [0, 0]] + 3/4 [[1, 2], [3, 4]].
    torch.testing.assert_close(new[1]["m.lora_A"], torch.tensor([[2.5, 3.5], [3.75, 4.5]]))
    torch.testing.assert_close(new[1]["m.lora_B"], torch.tensor([[1.0, 1.5], [2.25, 3.0]]))
    torch.testing.assert_close(new[0]["m.lora_A"], torch.tensor([[2.5, 3.5]]))
    torch.testing.assert_close(new[0]["m.lora_B"], torch.tensor([[1.0], [2.25]]))


def test_zero_pad_reports_its_error_against_the_exact_merge() -> None:
    factors = make_factors(6, 5, [1, 3], [1.0, 1.0], seed=16)
    ref = dense_reference(factors, [1, 1])

    new, report = aggregate_lora(as_states(factors), [1, 1], [1.0, 1.0], method="zero_pad")

    errors = [float((product(s, 1.0) - ref).norm() / ref.norm()) for s in new]
    assert report.truncation_error["m"] == pytest.approx(errors, rel=1e-5)


def test_flora_returns_dense_base_update_and_fresh_adapters() -> None:
    factors = make_factors(6, 5, [2, 3], [1.0, 0.5], seed=17)
    gen = torch.Generator().manual_seed(0)

    new, report = aggregate_lora(as_states(factors), [1, 2], [1.0, 0.5], method="flora", generator=gen)

    assert_relative_close(report.base_updates["m"], dense_reference(factors, [1, 2]))
    assert [s["m.lora_A"].shape for s in new] == [(2, 5), (3, 5)]
    assert all(torch.count_nonzero(s["m.lora_B"]) == 0 and torch.count_nonzero(s["m.lora_A"]) > 0 for s in new)
    assert report.bytes_down == 2 * 4 * 5 * (6 + 5) + 4 * 5 * (6 + 5)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_mismatched_module_keys_are_rejected_naming_the_keys() -> None:
    states = as_states(make_factors(4, 3, [1, 1], [1.0, 1.0]))
    states[1] = {"other.lora_A": states[1]["m.lora_A"], "other.lora_B": states[1]["m.lora_B"]}

    with pytest.raises(ValueError, match=r"client 1's state has keys .*other.lora_A.*same modules"):
        aggregate_lora(states, [1, 1], [1.0, 1.0])


def test_d_in_mismatch_is_rejected_naming_both_shapes() -> None:
    factors = make_factors(4, 3, [1], [1.0]) + make_factors(4, 5, [1], [1.0])

    with pytest.raises(ValueError, match=r"client 1 adapts a \[4×5\].*\[4×3\].*same module"):
        merge_lora(factors, [1, 1])


def test_target_rank_below_one_is_rejected() -> None:
    factors = make_factors(4, 3, [1, 2], [1.0, 1.0])

    with pytest.raises(ValueError, match=r"`rank` must be an int >= 1, got 0; .*at least rank 1"):
        aggregate_lora(as_states(factors), [1, 1], [1.0, 1.0], target_ranks=[0, 2])


def test_empty_adapter_rank_is_rejected() -> None:
    factors = [(torch.zeros(0, 3), torch.zeros(4, 0), 1.0)]

    with pytest.raises(ValueError, match=r"`rank of client 0` must be an int >= 1, got 0"):
        merge_lora(factors, [1])


def test_weights_length_mismatch_is_rejected_naming_both_lengths() -> None:
    factors = make_factors(4, 3, [1, 2], [1.0, 1.0])

    with pytest.raises(ValueError, match=r"`num_examples` has 3 entries but `factors` has 2 clients; pass one"):
        merge_lora(factors, [1, 1, 1])
    with pytest.raises(ValueError, match=r"`num_examples` has 1 entries but `states` has 2 clients; pass one"):
        aggregate_lora(as_states(factors), [1], [1.0, 1.0])


def test_unknown_method_is_rejected_listing_the_choices() -> None:
    factors = make_factors(4, 3, [1], [1.0])

    with pytest.raises(ValueError, match=r"`method` must be an AggregationMethod or one of .*'exact'.*got 'svd'"):
        aggregate_lora(as_states(factors), [1], [1.0], method="svd")  # type: ignore[arg-type]


def test_non_positive_scaling_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"`scaling of client 0` must be a finite float > 0 \(alpha / r\), got 0.0"):
        merge_lora(make_factors(4, 3, [1], [0.0]), [1])


def test_missing_module_in_per_module_scalings_is_rejected() -> None:
    factors = make_factors(4, 3, [1], [1.0])

    with pytest.raises(ValueError, match=r"`scalings` lacks module 'm' \(has \['q'\]\); give a value"):
        aggregate_lora(as_states(factors), [1], [{"q": 1.0}])
