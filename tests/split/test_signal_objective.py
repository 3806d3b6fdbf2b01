"""The ``contrast`` task signal: the gradient of a class-balanced, prediction-free loss.

Cross-entropy's gradient in the logits is ``p − e_gold``: besides which inputs go to which answer, it carries the
model's current predictions and the batch's label frequencies, which two tasks on the same texts share whatever
their answers. ``contrast_loss`` keeps only the label-dependent part, so a task and its label-swapped copy give
exactly opposite signals.
"""

from __future__ import annotations

import pytest
import torch

from atlas_pl.federation import Federation
from atlas_pl.split.backbone import contrast_loss
from atlas_pl.split.signal import task_signal
from tests.conftest import tiny_federation_kwargs


def _logit_grad(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    logits = logits.clone().requires_grad_(True)
    contrast_loss(logits, gold).backward()
    return logits.grad


def test_contrast_gradient_is_the_balanced_label_part_whatever_the_logits() -> None:
    gold = torch.tensor([0, 0, 0, 0, 0, 2, 2, 1])  # 5 / 1 / 2 of classes 0 / 1 / 2
    expected = torch.zeros(8, 4)
    for i, y in enumerate(gold.tolist()):
        weight = 1.0 / (3 * int((gold == y).sum()))  # three classes present, each the same total weight
        expected[i] = weight * (torch.full((4,), 0.25) - torch.nn.functional.one_hot(torch.tensor(y), 4))
    for scale in (0.0, 1.0, 30.0):
        torch.testing.assert_close(_logit_grad(scale * torch.randn(8, 4), gold), expected)
    assert torch.allclose(expected.sum(0)[:3], torch.full((3,), 0.25 - 1 / 3))  # each present class pulled alike


def _classifier(bias: float = 0.0) -> Federation:
    tiny_bert = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "num_labels": 2}
    fed = Federation(**tiny_federation_kwargs(model="bert-tiny", task_format="classification", share="none",
                                              num_clients=1, model_overrides=tiny_bert))  # fmt: skip
    fed.backbone.configure_tasks([2])
    for head in fed.backbone.heads.modules():
        if isinstance(head, torch.nn.Linear):  # an untrained head that favours class 0, as a real one may
            head.bias.data = torch.tensor([bias, -bias])
    return fed.eval()  # no dropout: both signals see the same forward


def _batch(labels: list[int]) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (len(labels), 12), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor(labels), "task_id": 0}


def _flat(signal: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([signal[k] for k in sorted(signal)])


def test_a_label_swapped_task_gets_the_opposite_contrast_signal_but_a_similar_gradient() -> None:
    torch.manual_seed(0)
    fed = _classifier(bias=2.0)
    labels = [0, 0, 0, 0, 0, 0, 1, 1]  # imbalanced: cross-entropy's label-frequency term is large
    swapped = [1 - y for y in labels]
    client = fed.clients[0]
    a, b = (_flat(task_signal(client, [_batch(y)], "contrast")) for y in (labels, swapped))
    assert a.norm() > 0
    torch.testing.assert_close(a, -b, rtol=1e-4, atol=1e-7)
    ce_a, ce_b = (_flat(task_signal(client, [_batch(y)], "grad_B")) for y in (labels, swapped))
    cosine = torch.nn.functional.cosine_similarity(ce_a, ce_b, dim=0)
    assert cosine > 0.5  # cross-entropy: the prediction / label-frequency part dominates, the two look alike


def test_the_signal_restores_the_training_objective_and_rejects_unknown_kinds() -> None:
    fed = _classifier()
    task_signal(fed.clients[0], [_batch([0, 1])], "contrast")
    assert fed.backbone.objective == "cross_entropy"
    with pytest.raises(ValueError, match="`kind` must be one of"):
        task_signal(fed.clients[0], [_batch([0, 1])], "gradient")  # type: ignore[arg-type]
