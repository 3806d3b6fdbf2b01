from __future__ import annotations

import pytest

from atlas_pl.data import GROUPS, make_synthetic_tasks


def test_synthetic_tasks_are_deterministic_per_seed():
    assert make_synthetic_tasks(seed=3) == make_synthetic_tasks(seed=3)


def test_synthetic_tasks_differ_across_seeds():
    a, b = make_synthetic_tasks(seed=0), make_synthetic_tasks(seed=1)
    assert [t.train for t in a] != [t.train for t in b]


def test_synthetic_tasks_have_expected_names_sizes_and_balanced_labels():
    tasks = make_synthetic_tasks(num_groups=6, tasks_per_group=2, examples_per_task=50, val_fraction=0.2)
    assert [t.name for t in tasks] == [f"{g}_{i}" for g in GROUPS for i in range(2)]
    for t in tasks:
        assert len(t.train) == 40 and len(t.validation) == 10
        labels = [e.label for e in t.train + t.validation]
        assert set(labels) == set(range(len(t.label_words)))
        assert max(labels.count(c) for c in set(labels)) - min(labels.count(c) for c in set(labels)) <= 1


def test_groups_have_distinct_label_words_and_tasks_in_a_group_share_them():
    tasks = make_synthetic_tasks(num_groups=6, tasks_per_group=3, examples_per_task=10)
    by_group: dict[str, list[list[str]]] = {}
    for t in tasks:
        by_group.setdefault(t.group, []).append(t.label_words)
    for words in by_group.values():
        assert all(w == words[0] for w in words)
    firsts = [tuple(w[0]) for w in by_group.values()]
    assert len(set(firsts)) == len(firsts)
    all_words = [w for ws in by_group.values() for w in ws[0]]
    assert len(all_words) == len(set(all_words))


def test_label_words_are_single_leading_space_tokens(gpt2_tokenizer):
    for t in make_synthetic_tasks(num_groups=6, tasks_per_group=1, examples_per_task=10):
        for w in t.label_words:
            assert w.startswith(" ") and len(w.split()) == 1
            assert len(gpt2_tokenizer(w)["input_ids"]) == 1


def test_tasks_in_a_group_differ_in_surface():
    tasks = make_synthetic_tasks(num_groups=2, tasks_per_group=3, examples_per_task=60)
    for g in ("sentiment", "topic"):
        vocabs = [frozenset(w for e in t.train for w in e.text.split()) for t in tasks if t.group == g]
        assert len(set(vocabs)) == len(vocabs)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_groups": 0}, "num_groups"),
        ({"num_groups": 7}, "num_groups"),
        ({"tasks_per_group": 0}, "tasks_per_group"),
        ({"examples_per_task": 9}, "examples_per_task"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"val_fraction": 1.0}, "val_fraction"),
    ],
)
def test_bad_synthetic_arguments_raise_value_error_naming_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_synthetic_tasks(**kwargs)
