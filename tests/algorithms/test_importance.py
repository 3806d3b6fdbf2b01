"""Module importance from LoRA gradients and its per-cluster average."""

from __future__ import annotations

import math

import pytest
import torch

from atlas_pl.algorithms.importance import cluster_importance, module_importance, module_of, normalize_importance


@pytest.mark.parametrize(
    "key",
    [
        "transformer.h.0.attn.c_attn.lora_B",
        "transformer.h.0.attn.c_attn.lora_A",
        "base_model.model.transformer.h.0.attn.c_attn.lora_B.client3.weight",
        "transformer.h.0.attn.c_attn",
    ],
)
def test_module_of_strips_factor_adapter_and_peft_prefix(key):
    assert module_of(key) == "transformer.h.0.attn.c_attn"


def test_grad_norm_is_the_frobenius_norm_of_both_factors():
    grads = {"m0.lora_A": torch.full((2, 3), 1.0), "m0.lora_B": torch.full((4, 2), 2.0), "m1.lora_B": torch.ones(1, 1)}
    imp = module_importance(grads)
    assert imp == pytest.approx({"m0": math.sqrt(6 * 1 + 8 * 4), "m1": 1.0})


def test_grad_norm_at_init_is_the_norm_of_grad_b():
    grads = {"m.lora_A": torch.zeros(2, 3), "m.lora_B": torch.tensor([[3.0, 4.0]])}
    assert module_importance(grads)["m"] == pytest.approx(5.0)


def test_saliency_sums_weight_times_gradient():
    grads = {"m.lora_A": torch.tensor([[1.0, -2.0]]), "m.lora_B": torch.tensor([[3.0]])}
    weights = {"m.lora_A": torch.tensor([[2.0, 1.0]]), "m.lora_B": torch.tensor([[-1.0]])}
    assert module_importance(grads, weights, method="saliency")["m"] == pytest.approx(2 + 2 + 3)


def test_saliency_without_weights_is_an_error():
    with pytest.raises(ValueError, match="weights"):
        module_importance({"m.lora_B": torch.ones(1)}, method="saliency")


def test_unknown_method_and_empty_grads_are_errors():
    with pytest.raises(ValueError, match="method"):
        module_importance({"m.lora_B": torch.ones(1)}, method="fisher")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        module_importance({})


def test_normalize_importance_sums_to_one_and_handles_all_zero():
    assert normalize_importance({"a": 1.0, "b": 3.0}) == pytest.approx({"a": 0.25, "b": 0.75})
    assert normalize_importance({"a": 0.0, "b": 0.0}) == {"a": 0.5, "b": 0.5}
    with pytest.raises(ValueError, match="'b'"):
        normalize_importance({"a": 1.0, "b": -1.0})


def test_cluster_importance_normalizes_each_client_so_none_dominates():
    small = {"a": 1.0, "b": 3.0}
    huge = {"a": 3000.0, "b": 1000.0}  # same scale-free disagreement, 1000x larger gradients
    out = cluster_importance([small, huge, {"a": 5.0, "b": 5.0}], cluster_ids=[0, 0, 1])
    assert out[0] == pytest.approx({"a": 0.5, "b": 0.5})
    assert out[1] == pytest.approx({"a": 0.5, "b": 0.5})


def test_cluster_importance_averages_modules_over_the_clients_that_have_them():
    out = cluster_importance([{"a": 1.0}, {"a": 1.0, "b": 1.0}], cluster_ids=[2, 2])
    assert out == {2: pytest.approx({"a": 0.75, "b": 0.5})}


def test_cluster_importance_needs_one_id_per_client():
    with pytest.raises(ValueError, match="cluster_ids"):
        cluster_importance([{"a": 1.0}], cluster_ids=[0, 1])
