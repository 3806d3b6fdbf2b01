"""Label differential privacy (``data.label_dp_epsilon``): randomized-response training labels, true eval labels."""

from __future__ import annotations

import numpy as np
import pytest

from atlas_pl.algorithms import keep_probability, randomized_response
from atlas_pl.data import FederatedDataModule


def test_randomized_response_keeps_labels_at_its_probability_and_flips_uniformly() -> None:
    labels = np.arange(30000) % 3
    noisy = randomized_response(labels, 3, 1.0, seed=0)
    keep = keep_probability(1.0, 3)
    assert keep == pytest.approx(np.e / (np.e + 2))
    assert float((noisy == labels).mean()) == pytest.approx(keep, abs=0.01)
    flipped = labels[noisy != labels]
    shift = (noisy[noisy != labels] - flipped) % 3  # 1 or 2: each other class alike
    assert float((shift == 1).mean()) == pytest.approx(0.5, abs=0.02)
    assert np.array_equal(noisy, randomized_response(labels, 3, 1.0, seed=0))  # drawn once: the same every time
    assert float((randomized_response(labels, 3, 8.0, seed=0) == labels).mean()) > 0.99


@pytest.mark.parametrize(("args", "match"), [
    ((np.array([0, 1]), 2, 0.0), "label_dp_epsilon must be > 0"),
    ((np.array([0, 1]), 1, 1.0), ">= 2 classes"),
    ((np.array([0, 2]), 2, 1.0), r"labels must lie in \[0, 2\)"),
])  # fmt: skip
def test_bad_randomized_response_input_is_named(args: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        randomized_response(*args)


def _dm(data_dir, cache_dir, **kwargs) -> FederatedDataModule:
    dm = FederatedDataModule(num_clients=3, tasks=["senti_a", "senti_b", "nli_c"], data_dir=str(data_dir),
                             cache_dir=cache_dir, batch_size=4, local_steps=2, seed=3, **kwargs)  # fmt: skip
    dm.setup()
    return dm


def test_clients_train_on_noisy_labels_and_are_scored_on_true_ones(data_dir, cache_dir) -> None:
    clean, private = _dm(data_dir, cache_dir), _dm(data_dir, cache_dir, label_dp_epsilon=0.5)
    flips = total = 0
    for c in range(3):
        assert private.val_datasets[c] == clean.val_datasets[c] and private.test_datasets[c] == clean.test_datasets[c]
        for a, b in zip(clean.train_datasets[c], private.train_datasets[c]):
            total += 1
            if a["label"] != b["label"]:
                flips += 1
                assert a["input_ids"] != b["input_ids"]  # the answer tokens follow the noisy label
            else:
                assert a == b
        hist = np.bincount([x["label"] for x in private.train_datasets[c]], minlength=len(private._label_hists[c]))
        assert private._label_hists[c] == hist.tolist()  # the histogram is of what the client trains on
    assert 0.2 < flips / total < 0.55  # 1 - keep: 0.38 (two classes) and 0.55 (three classes)


def test_label_dp_is_refused_for_generative_tasks_and_bad_epsilon(data_dir, cache_dir) -> None:
    with pytest.raises(ValueError, match="label_dp_epsilon"):
        FederatedDataModule(num_clients=2, tasks=["senti_a"], data_dir=str(data_dir), label_dp_epsilon=-1.0)
    with pytest.raises(ValueError, match="generative tasks"):
        FederatedDataModule(num_clients=2, tasks=[{"name": "qa", "path": str(data_dir / "senti_a"), "kind": "qa"}],
                            data_dir=str(data_dir), label_dp_epsilon=1.0)  # fmt: skip
