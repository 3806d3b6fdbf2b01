"""Label inference from a U-shaped split's returned gradients: the labels leak without a defence."""

from __future__ import annotations

import pytest
import torch

from atlas_pl.algorithms import randomized_response
from atlas_pl.attacks import label_leakage
from atlas_pl.federation import Federation
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.channel import GradientSparsity, InProcessChannel
from atlas_pl.split.step import split_forward_backward

TINY = {"num_hidden_layers": 2, "hidden_size": 32, "intermediate_size": 64, "vocab_size": 1000}


class _Tap(InProcessChannel):
    """Keeps the gradient a U-shaped client's head returns (``seen``) and what the server receives (``received``)."""

    def send_head_gradients(self, grad, client_idx=0):  # type: ignore[no-untyped-def]
        self.seen = grad.detach().clone()
        self.received = super().send_head_gradients(grad, client_idx)
        return self.received


def _u_shaped_step(channel: _Tap, labels: torch.Tensor | None = None) -> torch.Tensor:
    """One U-shaped step of a tiny BERT classifier on 16 random sequences through ``channel``; the labels."""
    torch.manual_seed(0)
    base = load_model("bert-tiny", "classification", 2, TINY).eval()
    split = SplitBackbone(base, 1, LoraSpec(rank=4), pooling="cls")
    split.shape = "u_shaped"
    split.add_client_adapter("c")
    split.add_server_adapter("s")
    labels = torch.tensor([0, 1] * 8) if labels is None else labels
    ids = torch.randint(5, 1000, (16, 12), generator=torch.Generator().manual_seed(1))
    split_forward_backward(split, channel, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                            "labels": labels}, "c", "s")  # fmt: skip
    return labels


def test_the_gradients_a_u_shaped_client_returns_disclose_its_binary_labels() -> None:
    tap = _Tap()
    labels = _u_shaped_step(tap)
    scores = label_leakage(tap.seen, labels)
    assert scores["direction_auc"] >= 0.95, scores  # softmax(z) - onehot(y): the two classes point apart
    shuffled = label_leakage(tap.seen, labels[torch.randperm(16, generator=torch.Generator().manual_seed(2))])
    assert shuffled["direction_auc"] < scores["direction_auc"]


def test_randomized_response_labels_leave_the_attack_only_the_noisy_labels() -> None:
    true = torch.tensor([0, 1] * 8)
    noisy = torch.from_numpy(randomized_response(true.numpy(), 2, 0.3, seed=0))
    assert 0 < int((noisy != true).sum()) < 16
    tap = _Tap()
    _u_shaped_step(tap, noisy)  # the client trains on the randomized labels (data.label_dp_epsilon)
    read = label_leakage(tap.seen, noisy)["direction_auc"]
    against_truth = label_leakage(tap.seen, true)["direction_auc"]
    assert read >= 0.95  # the attack still reads the labels the client used ...
    agreement = float((noisy == true).double().mean())
    assert against_truth <= max(agreement, 1 - agreement) + 0.1 < read  # ... which are the true ones only by chance


def test_label_leakage_needs_binary_labels_with_both_classes() -> None:
    with pytest.raises(ValueError, match="binary labels with both classes"):
        label_leakage(torch.randn(4, 3), torch.tensor([1, 1, 1, 1]))


def test_sparsity_keeps_the_largest_entries_of_each_vector_and_counts_them_sparse() -> None:
    grad = torch.randn(4, 8, 100, generator=torch.Generator().manual_seed(0))
    sparse = GradientSparsity(keep=0.1)
    out = sparse.apply(grad)
    assert out.shape == grad.shape and torch.equal((out != 0).sum(-1), torch.full((4, 8), 10))
    top = grad.abs().topk(10, dim=-1).values
    assert torch.equal(out.abs().topk(10, dim=-1).values, top)  # the kept entries are the 10 largest, unchanged
    assert GradientSparsity().apply(grad) is grad  # keep 1: nothing to do
    assert sparse.wire_bytes(grad) == 4 * 8 * 10 * (4 + 4) < grad.numel() * 4  # values + int32 indices
    assert GradientSparsity(keep=0.9).wire_bytes(grad) == grad.numel() * 4  # sparse would be larger: sent dense
    assert GradientSparsity(keep=1e-9).kept(100) == 1


@pytest.mark.parametrize("keep", [0, 1.5, -0.1, True])
def test_bad_sparsity_names_the_field(keep: float) -> None:
    with pytest.raises(ValueError, match=r"gradient_sparsity.keep must be in \(0, 1\]"):
        GradientSparsity(keep=keep)


def test_a_sparsifying_u_shaped_client_sends_only_the_kept_entries() -> None:
    channel = _Tap(sparsity=GradientSparsity(keep=0.125))
    _u_shaped_step(channel)
    assert int((channel.received != 0).sum(-1).max()) <= 4  # 12.5 % of 32 entries per position
    assert channel.stats.head_gradients_up == channel.received.shape[0] * channel.received.shape[1] * 4 * 8


def test_the_federation_option_needs_the_u_shaped_split() -> None:
    with pytest.raises(ValueError, match="split_shape: u_shaped"):
        Federation(model="bert-tiny", task_format="classification", model_overrides=TINY, num_clients=2,
                   gradient_sparsity={"keep": 0.1})  # fmt: skip
    fed = Federation(model="bert-tiny", task_format="classification", model_overrides=TINY, num_clients=2,
                     split_shape="u_shaped", gradient_sparsity={"keep": 0.1})  # fmt: skip
    assert fed.hparams["gradient_sparsity"] == {"keep": 0.1} and fed.channel.sparsity.keep == 0.1
