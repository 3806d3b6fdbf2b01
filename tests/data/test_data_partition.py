from __future__ import annotations

import numpy as np
import pytest

from atlas_pl.data import assign_clients, label_entropy, split_eval, split_task

LABELS = np.repeat(np.arange(4), 250)  # 1000 examples, 4 balanced classes


def _all_indices(splits) -> np.ndarray:
    return np.concatenate([np.concatenate([s.train, s.val]) for s in splits])


def _mean_entropy(splits) -> float:
    return float(np.mean([label_entropy(LABELS[np.concatenate([s.train, s.val])], 4) for s in splits]))


def test_assign_clients_round_robin_by_default():
    assert assign_clients(3, 7, None) == [0, 1, 2, 0, 1, 2, 0]


def test_assign_clients_with_explicit_counts_per_task():
    out = assign_clients(3, None, [1, 3, 2])
    assert sorted(out) == [0, 1, 1, 1, 2, 2] and out[:3] == [0, 1, 2]
    assert assign_clients(2, 4, 2) == [0, 1, 0, 1]


@pytest.mark.parametrize(("num_clients", "per_task"), [(2, None), (5, 2), (None, [1, 0, 1])])
def test_assign_clients_rejects_inconsistent_counts(num_clients, per_task):
    with pytest.raises(ValueError, match="num_clients|clients_per_task"):
        assign_clients(3, num_clients, per_task)


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_every_example_is_used_exactly_once(method):
    splits = split_task(LABELS, 5, method=method, alpha=0.3, quantity_skew=0.5, seed=1)
    used = _all_indices(splits)
    assert len(used) == len(LABELS) and len(np.unique(used)) == len(LABELS)


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partition_is_deterministic_per_seed(method):
    a = split_task(LABELS, 4, method=method, alpha=0.5, seed=3)
    b = split_task(LABELS, 4, method=method, alpha=0.5, seed=3)
    c = split_task(LABELS, 4, method=method, alpha=0.5, seed=4)
    assert all(np.array_equal(x.train, y.train) and np.array_equal(x.val, y.val) for x, y in zip(a, b))
    assert not all(np.array_equal(x.train, y.train) for x, y in zip(a, c))


def test_smaller_dirichlet_alpha_gives_more_label_skew():
    entropies = {
        alpha: np.mean(
            [_mean_entropy(split_task(LABELS, 5, method="dirichlet", alpha=alpha, seed=s)) for s in range(5)]
        )
        for alpha in (0.1, 1.0, 100.0)
    }
    iid = _mean_entropy(split_task(LABELS, 5, method="iid", seed=0))
    assert entropies[0.1] < entropies[1.0] < entropies[100.0] <= iid + 1e-9
    assert iid > 0.99 * np.log(4)  # iid shares keep the balanced label mix


def test_dirichlet_guarantees_min_examples_per_client():
    for seed in range(10):
        splits = split_task(LABELS, 10, method="dirichlet", alpha=0.05, min_examples=20, seed=seed)
        assert min(len(s.train) + len(s.val) for s in splits) >= 20


def test_dirichlet_tops_up_short_clients_when_redraws_fail():
    splits = split_task(LABELS[:40], 10, method="dirichlet", alpha=0.01, min_examples=4, retries=2, seed=0)
    assert [len(s.train) + len(s.val) for s in splits] == [4] * 10
    assert len(np.unique(_all_indices(splits))) == 40


def test_quantity_skew_spreads_client_sizes_and_zero_means_equal():
    equal = [len(s.train) + len(s.val) for s in split_task(LABELS, 8, seed=0)]
    skewed = [len(s.train) + len(s.val) for s in split_task(LABELS, 8, quantity_skew=1.5, min_examples=5, seed=0)]
    assert max(equal) - min(equal) <= 1
    assert np.std(skewed) > 10 * max(np.std(equal), 1.0) and min(skewed) >= 5 and sum(skewed) == len(LABELS)


def test_cap_limits_each_share_and_val_fraction_splits_it():
    splits = split_task(LABELS, 4, max_examples_per_client=50, val_fraction=0.2, seed=0)
    assert [(len(s.train), len(s.val)) for s in splits] == [(40, 10)] * 4
    assert len(np.unique(_all_indices(splits))) == 200


def test_pool_too_small_for_clients_raises_naming_the_task():
    with pytest.raises(ValueError, match="tiny"):
        split_task(LABELS[:5], 4, min_examples=2, task="tiny")


def test_split_eval_deals_disjoint_capped_shares():
    shares = split_eval(23, 3, cap=None, seed=0)
    assert sorted(np.concatenate(shares).tolist()) == list(range(23))
    capped = split_eval(23, 3, cap=4, seed=0)
    assert [len(s) for s in capped] == [4, 4, 4] and len(np.unique(np.concatenate(capped))) == 12
