"""Label-word scoring and greedy generation through the split model."""

import pytest
import torch

from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.scoring import answer_starts, greedy_generate, score_label_words

TINY = {"vocab_size": 1000, "n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64}
X, A, EOS = 7, 11, 999


def _backbone() -> SplitBackbone:
    torch.manual_seed(0)
    split = SplitBackbone(load_model("gpt2-tiny", overrides=dict(TINY)), 1, LoraSpec(rank=2))
    split.add_client_adapter("c")
    split.add_server_adapter("s")
    return split.eval()


def _always_predict(split: SplitBackbone, token: int) -> None:
    """Hand-built model: the final norm ignores its input (weight 0) and outputs the direction of ``token``'s
    (tied) embedding, so every position predicts ``token`` with probability close to 1."""
    wte = split.model.transformer.wte.weight
    ln_f = split.model.transformer.ln_f
    with torch.no_grad():
        wte[token] *= 5.0
        ln_f.weight.zero_()
        ln_f.bias.copy_(wte[token] / wte[token].norm() * 40.0)


def _batch(prompt_lengths: list[int], answer: list[int]) -> dict:
    rows = [list(range(20, 20 + n)) + answer for n in prompt_lengths]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    labels = torch.full_like(ids, -100)
    for b, (row, n) in enumerate(zip(rows, prompt_lengths)):
        ids[b, : len(row)] = torch.tensor(row)
        labels[b, n : len(row)] = torch.tensor(answer)
    return {"input_ids": ids, "labels": labels}


def test_label_word_scoring_picks_the_label_the_model_predicts() -> None:
    split = _backbone()
    _always_predict(split, X)
    batch = _batch([3, 5, 4], [A, EOS])  # the gold answer in the batch is irrelevant to the scores
    candidates = [[A, EOS], [A + 1, EOS], [X, EOS]]

    scores = score_label_words(split, batch["input_ids"], batch["labels"], candidates, "c", "s")

    assert scores.shape == (3, 3)
    assert scores.argmax(dim=1).tolist() == [2, 2, 2]


def test_label_word_scores_equal_the_full_model_log_likelihood() -> None:
    split = _backbone()
    with torch.no_grad():
        for name in ("c", "s"):
            for _, b, _ in split.bank.factors(name).values():
                b.normal_(std=0.2)
    candidates = [[A, EOS], [5, 6, EOS]]
    batch = _batch([4, 6], [A, EOS])

    scores = score_label_words(split, batch["input_ids"], batch["labels"], candidates, "c", "s", max_sequences=3)

    split.activate("c", "s")
    for b, n in enumerate([4, 6]):
        for c, cand in enumerate(candidates):
            seq = torch.tensor([list(range(20, 20 + n)) + cand])
            with torch.no_grad():
                logp = split.model(input_ids=seq).logits.log_softmax(-1)[0]
            expected = sum(float(logp[n - 1 + k, tok]) for k, tok in enumerate(cand))
            assert scores[b, c].item() == pytest.approx(expected, abs=1e-4)


def test_mean_normalization_divides_by_candidate_length() -> None:
    split = _backbone()
    batch = _batch([3], [A, EOS])
    candidates = [[A, EOS], [5, 6, EOS]]

    total = score_label_words(split, batch["input_ids"], batch["labels"], candidates, "c", "s")
    mean = score_label_words(split, batch["input_ids"], batch["labels"], candidates, "c", "s", norm="mean")

    torch.testing.assert_close(mean, total / torch.tensor([2.0, 3.0]))


def test_scoring_rejects_empty_candidates_and_rows_without_answers() -> None:
    split = _backbone()
    batch = _batch([3], [A, EOS])
    with pytest.raises(ValueError, match="candidates"):
        score_label_words(split, batch["input_ids"], batch["labels"], [[A], []])
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_starts(torch.full((2, 4), -100))


def test_greedy_generation_follows_the_model_and_stops_at_eos() -> None:
    split = _backbone()
    _always_predict(split, X)
    assert greedy_generate(split, [[20, 21], [22]], 3, EOS, "c", "s") == [[X, X, X], [X, X, X]]
    _always_predict(split, EOS)
    assert greedy_generate(split, [[20, 21]], 3, EOS, "c", "s") == [[]]
