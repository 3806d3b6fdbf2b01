"""``export_peft``: one joined adapter, loaded with ``PeftModel.from_pretrained``, equals the split model."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file

from atlas_pl.export import HEADS_FILE, export_peft
from atlas_pl.federation import Federation
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model

TINY = {
    "gpt2-tiny": {"n_layer": 3, "n_embd": 32, "n_head": 2, "n_positions": 64},
    "llama-tiny": {
        "num_hidden_layers": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 64,
    },
    "bert-tiny": {
        "num_hidden_layers": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "max_position_embeddings": 64,
    },
}
TASK_FORMAT = {"gpt2-tiny": "causal_lm", "llama-tiny": "causal_lm", "bert-tiny": "classification"}


def _tasks_datamodule() -> SimpleNamespace:
    """What ``Federation.attach_data`` reads: 3 clients, a 2-class and a 3-class task."""
    tasks = [
        SimpleNamespace(name="sentiment", kind="classification", num_labels=2, group="a", label_names=["pos", "neg"]),
        SimpleNamespace(name="topic", kind="classification", num_labels=3, group="b", label_names=["x", "y", "z"]),
    ]
    return SimpleNamespace(num_clients=3, num_examples=[4, 4, 4], client_task_ids=[0, 1, 0], tasks=tasks)


def _heterogeneous_federation(name: str) -> Federation:
    """3 clients in clusters [0, 0, 1], different ranks per module and per client, a later cut for client 1, and
    random (non-zero) LoRA factors and heads everywhere."""
    fed = Federation(
        model=name,
        model_overrides=TINY[name],
        task_format=TASK_FORMAT[name],  # type: ignore[arg-type]
        num_clients=3,
        cut_layer=1,
        lora=LoraSpec(rank=4, alpha=8),
    )
    fed.attach_data(_tasks_datamodule())
    fed.assign_clusters([0, 0, 1])
    modules = fed.backbone.client_module_names()
    patterns = [{m: 2 + j for j, m in enumerate(modules)}, {m: 6 for m in modules}, {m: 3 for m in modules}]
    for client, (pattern, cut) in enumerate(zip(patterns, [1, 2, 1])):
        fed.resize(client, pattern, cut)
    server = fed.backbone.server_module_names()
    fed.roster.resize("server_c1", {m: 1 + j % 3 for j, m in enumerate(server)})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, param in fed.named_parameters():
            if "lora_" in key or key.startswith("backbone.heads."):
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    fed.backbone.model.eval()
    return fed


def _base_model(fed: Federation, name: str) -> torch.nn.Module:
    """A fresh model of the same architecture holding the federation's frozen weights (no LoRA)."""
    base = load_model(name, TASK_FORMAT[name], 2, TINY[name])  # type: ignore[arg-type]
    frozen = {k.replace(".base_layer.", "."): v for k, v in fed.backbone.model.state_dict().items() if "lora_" not in k}
    base.load_state_dict(frozen, strict=True)
    return base.eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    input_ids = torch.randint(0, 1000, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0  # one right-padded row
    return input_ids, mask


@torch.no_grad()
def _split_logits(fed: Federation, client_idx: int, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The split model's logits: LM logits at every position, or the task head's class logits (encoders)."""
    backbone, client = fed.backbone, fed.clients[client_idx]
    if backbone.task == "classification":
        task = fed.client_task_ids[client_idx]
        head = backbone.heads_of(client.server_adapter)[task]
        captured: list[torch.Tensor] = []
        handle = head.register_forward_hook(lambda _m, _i, out: captured.append(out))
        backbone(
            input_ids,
            mask,
            torch.zeros(len(input_ids), dtype=torch.long),
            client.client_adapter,
            client.server_adapter,
            task,
        )
        handle.remove()
        return captured[0]
    backbone.activate(client.client_adapter, client.server_adapter)
    cut = backbone.cut_of(client.client_adapter)
    hidden = backbone.server_hidden(backbone.client_forward(input_ids, mask, cut), mask, cut)
    return backbone.model.lm_head(hidden)


@torch.no_grad()
def _exported_logits(base: torch.nn.Module, folder, task: int, input_ids, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ``PeftModel.from_pretrained(base, folder)`` and of the bare base model."""
    plain = copy.deepcopy(base)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    if not hasattr(base, "bert"):
        return model(input_ids=input_ids, attention_mask=mask).logits, plain(
            input_ids=input_ids, attention_mask=mask
        ).logits
    with safe_open(str(folder / HEADS_FILE), "pt") as f:
        pooling = f.metadata()["pooling"]
    heads = load_file(str(folder / HEADS_FILE))
    weight, bias = heads[f"task{task}.weight"], heads[f"task{task}.bias"]
    pooled = _pool(model.base_model.model.bert(input_ids=input_ids, attention_mask=mask), mask, pooling)
    bare = _pool(plain.bert(input_ids=input_ids, attention_mask=mask), mask, pooling)
    return pooled @ weight.T + bias, bare @ weight.T + bias


def _pool(encoder_output, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """The heads' input by hand, as the README says: masked mean, first token, or the model's pooler."""
    if pooling == "pooler":
        return encoder_output.pooler_output
    hidden = encoder_output.last_hidden_state
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).float()
    return (hidden * weights).sum(1) / weights.sum(1)


@pytest.mark.parametrize("name", ["gpt2-tiny", "llama-tiny", "bert-tiny"])
def test_exported_adapter_loaded_with_peft_gives_the_split_models_logits(name: str, tmp_path) -> None:
    fed = _heterogeneous_federation(name)
    folders = export_peft(fed, tmp_path, per_client=True)
    assert [f.name for f in folders] == ["cluster_0", "cluster_1", "client_000", "client_001", "client_002"]
    base = _base_model(fed, name)
    input_ids, mask = _inputs()
    real = mask.bool()
    # cluster 0 = clients 0 and 1: client 1 has the larger client adapter (total rank), so its half is exported
    for folder, client_idx in [(tmp_path / "cluster_0", 1), (tmp_path / "cluster_1", 2)] + [
        (tmp_path / f"client_{i:03d}", i) for i in range(3)
    ]:
        expected = _split_logits(fed, client_idx, input_ids, mask)
        got, bare = _exported_logits(base, folder, fed.client_task_ids[client_idx], input_ids, mask)
        if expected.dim() == 3:  # LM logits: compare real (unpadded) positions
            expected, got, bare = expected[real], got[real], bare[real]
        diff = float((got - expected).abs().max())
        assert diff <= 1e-5, f"{name} {folder.name}: max |exported - split| = {diff}"
        assert float((bare - expected).abs().max()) > 1e-2, "the adapter must change the logits"


def test_exported_config_keeps_heterogeneous_ranks_and_scaling(tmp_path) -> None:
    fed = _heterogeneous_federation("gpt2-tiny")
    export_peft(fed, tmp_path)
    config = json.loads((tmp_path / "cluster_0" / "adapter_config.json").read_text())
    ranks = {m: config["rank_pattern"].get(m, config["r"]) for m in config["target_modules"]}
    alphas = {m: config["alpha_pattern"].get(m, config["lora_alpha"]) for m in config["target_modules"]}
    # client 1 (cut 2): rank 6 on block 0 and the default rank 4 on block 1; server_c0 (rank 4) on block 2
    assert ranks["transformer.h.0.attn.c_attn"] == 6 and ranks["transformer.h.2.attn.c_attn"] == 4
    assert all(alphas[m] / ranks[m] == pytest.approx(8 / 4) for m in ranks)  # scaling lora_alpha / lora_rank
    assert config["fan_in_fan_out"] is True and config["peft_type"] == "LORA"
    assert "PeftModel.from_pretrained" in (tmp_path / "cluster_0" / "README.md").read_text()


def test_heads_file_holds_the_heads_of_the_clusters_tasks(tmp_path) -> None:
    fed = _heterogeneous_federation("bert-tiny")
    export_peft(fed, tmp_path)
    heads = load_file(str(tmp_path / "cluster_0" / HEADS_FILE))
    assert sorted(heads) == ["task0.bias", "task0.weight", "task1.bias", "task1.weight"]
    assert heads["task1.weight"].shape == (3, 32)
    assert sorted(load_file(str(tmp_path / "cluster_1" / HEADS_FILE))) == ["task0.bias", "task0.weight"]


def test_export_replaces_an_older_folder_and_leaves_no_temporaries(tmp_path) -> None:
    fed = _heterogeneous_federation("gpt2-tiny")
    (tmp_path / "cluster_0").mkdir()
    (tmp_path / "cluster_0" / "stale.txt").write_text("old")
    export_peft(fed, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cluster_0", "cluster_1"]
    assert not (tmp_path / "cluster_0" / "stale.txt").exists()
