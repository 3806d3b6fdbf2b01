"""Multi-reference scoring of generated text, checked against values worked out by hand.

SQuAD (official script rules, as torchmetrics implements them): answers are lower-cased, punctuation and the articles
a/an/the removed; EM and token F1 are the maximum over the gold answers. ROUGE-L F: the longest common subsequence of
the (lower-cased, alphanumeric) tokens, ``F = 2PR / (P + R)``, against the reference that scores best.
"""

from __future__ import annotations

import pytest

from atlas_pl.metrics import TaskMetrics, example_scores

QA_PREDS = ["the Denver Broncos", "Denver team", "Santa Clara"]
QA_REFS = [["Broncos", "Denver Broncos"], ["Denver Broncos", "Santa Clara"], "Santa Clara, California"]
# 1: "denver broncos" equals the 2nd answer -> EM 1, F1 1 (vs "broncos" alone F1 would be 2/3)
# 2: one shared token of two with "denver broncos": P = R = 1/2 -> F1 1/2; nothing with "santa clara" -> EM 0
# 3: a single reference as a plain string: "santa clara" vs "santa clara california": P 1, R 2/3 -> F1 4/5
QA_F1 = [1.0, 0.5, 0.8]
QA_EM = [1.0, 0.0, 0.0]

SUM_PREDS = ["they meet at noon", "a short note"]
SUM_REFS = [["they will meet at noon", "a meeting happens"], ["the note is short", "short note"]]
# 1: LCS "they meet at noon" = 4 of 4 predicted, 4 of 5 reference tokens: P 1, R 4/5 -> F 8/9 (2nd reference: 0)
# 2: vs "short note": LCS 2, P 2/3, R 1 -> F 4/5; vs "the note is short": LCS 1 ("note" or "short"): F 2/7
SUM_F = [8 / 9, 0.8]


def test_squad_f1_takes_the_best_gold_answer_per_example():
    assert example_scores("qa", QA_PREDS, QA_REFS) == pytest.approx(QA_F1)


def test_rouge_l_takes_the_best_reference_per_example():
    assert example_scores("summarization", SUM_PREDS, SUM_REFS) == pytest.approx(SUM_F, abs=1e-6)


def test_task_metrics_average_the_per_example_maxima():
    metrics = TaskMetrics(["qa", "summarization"], [0, 0], ["squad", "dialogsum"])
    metrics.update_text(0, QA_PREDS[:2], QA_REFS[:2])
    metrics.update_text(0, QA_PREDS[2:], QA_REFS[2:])  # accumulates over batches
    metrics.update_text(1, SUM_PREDS, SUM_REFS)
    out = metrics.compute()
    assert out["squad/em"] == pytest.approx(sum(QA_EM) / 3)
    assert out["squad/f1"] == pytest.approx(sum(QA_F1) / 3)
    assert out["dialogsum/rougeL"] == pytest.approx(sum(SUM_F) / 2, abs=1e-6)
    # ROUGE-1 of example 2 against "short note": 2 shared unigrams, P 2/3, R 1 -> 4/5; example 1: 8/9 as ROUGE-L
    assert out["dialogsum/rouge1"] == pytest.approx((8 / 9 + 0.8) / 2, abs=1e-6)
    assert 0.0 <= out["dialogsum/rouge2"] <= out["dialogsum/rouge1"]


def test_a_single_reference_list_equals_the_plain_string():
    assert example_scores("qa", ["Paris"], [["France"]]) == example_scores("qa", ["Paris"], ["France"]) == [0.0]


def test_bad_kind_or_empty_references_name_the_problem():
    with pytest.raises(ValueError, match="kind"):
        example_scores("classification", ["a"], ["a"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no reference"):
        example_scores("qa", ["a"], [[]])
