"""Split training computes exactly what monolithic peft LoRA training computes."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.channel import InProcessChannel
from atlas_pl.split.registry import get_arch
from atlas_pl.split.step import split_forward_backward

TINY = {"vocab_size": 1000}
CASES = [("gpt2-tiny", "causal_lm"), ("llama-tiny", "causal_lm"), ("bert-tiny", "classification")]


def _batch(task: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # right padding on one row
    if task == "classification":
        labels = torch.tensor([0, 1, 1])
    else:
        labels = torch.full_like(ids, -100)
        labels[:, 5:7] = ids[:, 5:7]
        labels[2, 9] = ids[2, 9]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _randomize_lora(bank, name: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a, b, _ in bank.factors(name).values():
            a.copy_(torch.randn(a.shape, generator=g) * 0.1)
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)


@pytest.mark.parametrize("shape", ["two_part", "u_shaped"])
@pytest.mark.parametrize(("name", "task"), CASES)
def test_split_step_lora_gradients_match_monolithic_peft(name: str, task: str, shape: str) -> None:
    torch.manual_seed(0)
    base = load_model(name, task, num_labels=2, overrides=TINY).eval()
    reference = copy.deepcopy(base)
    # peft's sequence classifier reads BERT's pooler; the other pooling modes are checked in test_pooling.py
    split = SplitBackbone(base, cut_layer=2, lora=LoraSpec(rank=4, alpha=8), pooling="pooler")
    split.shape = shape  # type: ignore[assignment]
    split.add_client_adapter("c")
    split.add_server_adapter("s")
    _randomize_lora(split.bank, "c", 1)
    _randomize_lora(split.bank, "s", 2)

    arch = get_arch(reference)
    peft_model = get_peft_model(
        reference,
        LoraConfig(r=4, lora_alpha=8, target_modules=list(arch.default_targets), fan_in_fan_out=arch.fan_in_fan_out),
    )
    ours = {**split.bank.factors("c"), **split.bank.factors("s")}
    with torch.no_grad():
        for module_name, module in peft_model.base_model.model.named_modules():
            if module_name in ours:
                module.lora_A["default"].weight.copy_(ours[module_name][0])
                module.lora_B["default"].weight.copy_(ours[module_name][1])
    batch = _batch(task)
    split_forward_backward(split, InProcessChannel(), batch, "c", "s")
    out = peft_model(**batch)
    out.loss.backward()

    compared = 0
    for module_name, module in peft_model.base_model.model.named_modules():
        if module_name in ours:
            a, b, _ = ours[module_name]
            torch.testing.assert_close(a.grad, module.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.grad, module.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)
            compared += 1
    assert compared == 4 * len(arch.default_targets)


def test_a_client_cutting_later_than_the_backbone_matches_monolithic_peft() -> None:
    torch.manual_seed(0)
    base = load_model("gpt2-tiny", "causal_lm", overrides=TINY).eval()
    reference = copy.deepcopy(base)
    split = SplitBackbone(base, cut_layer=1, lora=LoraSpec(rank=4, alpha=8))
    split.add_client_adapter("c", cut_layer=3)  # this client keeps blocks 0-2; the server adapter starts at block 1
    split.add_server_adapter("s")
    _randomize_lora(split.bank, "c", 1)
    _randomize_lora(split.bank, "s", 2)
    arch = get_arch(reference)
    peft_model = get_peft_model(
        reference,
        LoraConfig(r=4, lora_alpha=8, target_modules=list(arch.default_targets), fan_in_fan_out=arch.fan_in_fan_out),
    )
    server = {m: f for m, f in split.bank.factors("s").items() if ".3." in m}  # only block 3 runs on the server
    ours = {**split.bank.factors("c"), **server}
    with torch.no_grad():
        for module_name, module in peft_model.base_model.model.named_modules():
            if module_name in ours:
                module.lora_A["default"].weight.copy_(ours[module_name][0])
                module.lora_B["default"].weight.copy_(ours[module_name][1])
    batch = _batch("causal_lm")
    split_forward_backward(split, InProcessChannel(), batch, "c", "s")
    peft_model(**batch).loss.backward()

    for module_name, module in peft_model.base_model.model.named_modules():
        if module_name in ours:
            a, b, _ = ours[module_name]
            torch.testing.assert_close(a.grad, module.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(b.grad, module.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)
    unused = [m for m in split.bank.factors("s") if m not in server]
    assert unused and all(split.bank.factors("s")[m][1].grad is None for m in unused)
    assert split.cut_of("c") == 3 and split.cut_of("s") == 1


class _Spy(InProcessChannel):
    """An in-process channel that records what the server is sent."""

    def __init__(self) -> None:
        super().__init__()
        self.metadata_keys: list[str] = []

    def send_activations(self, hidden, metadata, client_idx=0):  # type: ignore[no-untyped-def]
        self.metadata_keys += list(metadata)
        return super().send_activations(hidden, metadata, client_idx)


@pytest.mark.parametrize(("name", "task"), CASES)
def test_a_u_shaped_step_keeps_the_labels_on_the_client_and_pays_two_more_transfers(name: str, task: str) -> None:
    torch.manual_seed(0)
    split = SplitBackbone(load_model(name, task, num_labels=2, overrides=TINY).eval(), 2, LoraSpec(rank=4))
    split.add_client_adapter("c")
    split.add_server_adapter("s")
    stats = {}
    for shape in ("two_part", "u_shaped"):
        split.shape = shape  # type: ignore[assignment]
        channel = _Spy()
        split_forward_backward(split, channel, _batch(task), "c", "s")
        stats[shape] = (channel.metadata_keys, channel.stats)
    assert "labels" in stats["two_part"][0] and "labels" not in stats["u_shaped"][0]
    two, u = stats["two_part"][1], stats["u_shaped"][1]
    assert u.activations_up == two.activations_up and u.gradients_down == two.gradients_down
    assert u.metadata_up < two.metadata_up
    assert u.head_activations_down == u.head_gradients_up > 0 == two.head_activations_down
    assert u.bytes_down == two.bytes_down + u.head_activations_down
