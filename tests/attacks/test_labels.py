"""Label inference from a U-shaped split's returned gradients: the labels leak without a defence."""

from __future__ import annotations

import pytest
import torch

from atlas_pl.attacks import label_leakage
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.channel import InProcessChannel
from atlas_pl.split.step import split_forward_backward


class _Tap(InProcessChannel):
    """Keeps what the server receives from the client's head in a U-shaped step."""

    def send_head_gradients(self, grad, client_idx=0):  # type: ignore[no-untyped-def]
        self.seen = grad.detach().clone()
        return super().send_head_gradients(grad, client_idx)


def test_the_gradients_a_u_shaped_client_returns_disclose_its_binary_labels() -> None:
    torch.manual_seed(0)
    tiny = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 1000}
    base = load_model("bert-tiny", "classification", 2, tiny).eval()
    split = SplitBackbone(base, 1, LoraSpec(rank=4), pooling="cls")
    split.shape = "u_shaped"
    split.add_client_adapter("c")
    split.add_server_adapter("s")
    labels = torch.tensor([0, 1] * 8)
    ids = torch.randint(5, 1000, (16, 12), generator=torch.Generator().manual_seed(1))
    tap = _Tap()
    split_forward_backward(split, tap, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels},
                           "c", "s")  # fmt: skip
    scores = label_leakage(tap.seen, labels)
    assert scores["direction_auc"] >= 0.95, scores  # softmax(z) - onehot(y): the two classes point apart
    shuffled = label_leakage(tap.seen, labels[torch.randperm(16, generator=torch.Generator().manual_seed(2))])
    assert shuffled["direction_auc"] < scores["direction_auc"]


def test_label_leakage_needs_binary_labels_with_both_classes() -> None:
    with pytest.raises(ValueError, match="binary labels with both classes"):
        label_leakage(torch.randn(4, 3), torch.tensor([1, 1, 1, 1]))
