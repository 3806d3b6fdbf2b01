import pytest
import torch

from atlas_pl.algorithms.merge import fedavg
from atlas_pl.lora.adapters import AdapterBank, LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone, split_model

TINY = {"n_layer": 3, "n_embd": 16, "n_head": 2, "vocab_size": 100}


@pytest.fixture
def backbone() -> SplitBackbone:
    return SplitBackbone(load_model("gpt2-tiny", overrides=TINY), cut_layer=1, lora=LoraSpec(rank=2, alpha=4))


def test_split_model_shares_blocks_without_copies() -> None:
    model = load_model("gpt2-tiny", overrides=TINY)
    client, server = split_model(model, 2)
    assert len(client) == 2 and len(server) == 1
    assert client[0] is model.transformer.h[0] and server[0] is model.transformer.h[2]


def test_client_adapters_live_only_on_client_blocks(backbone) -> None:
    backbone.add_client_adapter("c0")
    backbone.add_server_adapter("s0", rank=3)
    assert all(name.startswith("transformer.h.0.") for name in backbone.bank.ranks["c0"])
    assert all(not name.startswith("transformer.h.0.") for name in backbone.bank.ranks["s0"])
    assert set(backbone.bank.ranks["s0"].values()) == {3}


def test_rank_pattern_sets_per_module_ranks(backbone) -> None:
    backbone.add_client_adapter("c0", rank_pattern={"transformer.h.0.attn.c_attn": 5})
    assert backbone.bank.ranks["c0"] == {"transformer.h.0.attn.c_attn": 5, "transformer.h.0.attn.c_proj": 2}


def test_state_roundtrip_and_shape_mismatch(backbone) -> None:
    backbone.add_client_adapter("x")
    backbone.add_client_adapter("y", rank=3)
    state = backbone.bank.state("x")
    state = {k: torch.randn_like(v) for k, v in state.items()}
    backbone.bank.load_state("x", state)
    for key, value in backbone.bank.state("x").items():
        torch.testing.assert_close(value, state[key])
    with pytest.raises(ValueError, match="ranks differ"):
        backbone.bank.load_state("y", state)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_bad_rank_is_rejected(backbone, rank) -> None:
    with pytest.raises(ValueError, match="`rank` must be an int >= 1"):
        backbone.add_client_adapter("c", rank=rank)


def test_unknown_target_module_names_the_choices() -> None:
    with pytest.raises(ValueError, match="not found in a gpt2 block"):
        SplitBackbone(load_model("gpt2-tiny", overrides=TINY), 1, LoraSpec(target_modules=["q_proj"]))


def test_fedavg_matches_hand_computed_weighted_mean() -> None:
    s1 = {"m.lora_A": torch.tensor([[1.0, 2.0]]), "m.lora_B": torch.tensor([[4.0]])}
    s2 = {"m.lora_A": torch.tensor([[3.0, 6.0]]), "m.lora_B": torch.tensor([[0.0]])}
    merged = fedavg([s1, s2], num_examples=[1, 3])  # weights 0.25, 0.75
    torch.testing.assert_close(merged["m.lora_A"], torch.tensor([[2.5, 5.0]]))
    torch.testing.assert_close(merged["m.lora_B"], torch.tensor([[1.0]]))


def test_fedavg_rejects_unequal_ranks_and_empty_weights() -> None:
    s1 = {"m.lora_A": torch.zeros(1, 2)}
    s2 = {"m.lora_A": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="equal adapter shapes"):
        fedavg([s1, s2], [1, 1])
    with pytest.raises(ValueError, match="sum to 0"):
        fedavg([s1], [0])


def test_adding_and_resizing_adapters_keeps_every_adapter_trainable() -> None:
    from atlas_pl.models import load_model
    from atlas_pl.split.backbone import SplitBackbone

    split = SplitBackbone(load_model("gpt2-tiny", overrides={"n_layer": 3, "n_embd": 32, "n_head": 2}), 1)
    for name in ("a", "b", "c"):
        split.add_client_adapter(name)
    split.activate("a", None)
    split.bank.resize("b", dict.fromkeys(split.bank.ranks["b"], 3), 2.0)
    split.bank.delete("c")
    split.add_client_adapter("c", cut_layer=2)
    assert all(p.requires_grad for n in ("a", "b", "c") for p in split.bank.parameters(n))


def _bank_of(fast: bool, monkeypatch, dtype: torch.dtype = torch.float32) -> SplitBackbone:
    """Clients and servers with mixed ranks and cuts, added through the fast path or through peft's add_adapter."""
    if not fast:
        monkeypatch.setattr(AdapterBank, "_add_on_existing_layers", lambda self, *args: False)
    torch.manual_seed(0)
    backbone = SplitBackbone(load_model("gpt2-tiny", overrides=TINY).to(dtype), 1, LoraSpec(rank=2, alpha=4))
    backbone.add_server_adapter("s0")
    for i in range(5):
        backbone.add_client_adapter(f"c{i}", rank=1 + i % 3, rank_pattern={"transformer.h.0.attn.c_attn": 4})
    backbone.add_client_adapter("c_cut2", cut_layer=2)  # a deeper cut: modules that carry server adapters too
    backbone.add_server_adapter("s1", rank=3)
    # phase 2 re-creates adapters at new ranks, the active one too (peft then freezes the layer's other adapters)
    backbone.bank.activate(["c4", "s0"])
    for name in ("c4", "c1", "s0"):
        pattern = {m: 3 for m in backbone.bank.ranks[name]}
        backbone.bank.resize(name, pattern, scaling=2.0)
    monkeypatch.undo()
    return backbone


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adding_to_existing_lora_layers_equals_peft_add_adapter(monkeypatch, dtype) -> None:
    """The O(1)-per-adapter path makes bit-for-bit what PeftModel.add_adapter makes (weights, dtypes, trainable
    flags, ranks, peft configs), so build cost no longer grows with the number of adapters already there."""
    fast, slow = _bank_of(True, monkeypatch, dtype), _bank_of(False, monkeypatch, dtype)

    fast_state, slow_state = fast.state_dict(), slow.state_dict()
    assert fast_state.keys() == slow_state.keys()
    for key, value in fast_state.items():
        assert value.dtype == slow_state[key].dtype, key
        torch.testing.assert_close(value, slow_state[key], rtol=0, atol=0)
    trainable = {n: p.requires_grad for n, p in fast.named_parameters()}
    assert trainable == {n: p.requires_grad for n, p in slow.named_parameters()}
    assert all(trainable[n] for n in trainable if "lora_" in n)  # every adapter of every client still trains
    assert fast.bank.ranks == slow.bank.ranks
    assert fast.bank.peft_model.peft_config == slow.bank.peft_model.peft_config
    # the adapters of half-precision models are upcast to float32, as peft does
    assert all(p.dtype == torch.float32 for n, p in fast.named_parameters() if "lora_" in n)


def test_adding_an_adapter_never_walks_the_whole_model(monkeypatch) -> None:
    """With the targets already LoRA layers, adding one more adapter walks neither the model nor a block."""
    backbone = SplitBackbone(load_model("gpt2-tiny", overrides=TINY), 2, LoraSpec(rank=2, alpha=4))
    backbone.add_client_adapter("c0")
    containers = {id(m) for m in backbone.bank.base.modules() if any(True for _ in m.children())}
    containers -= {id(m) for _, m in backbone.bank._layers}  # a LoRA layer's own few modules may be visited
    calls = []
    original = torch.nn.Module.named_modules

    def counting(self, *args, **kwargs):
        if id(self) in containers:
            calls.append(type(self).__name__)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "named_modules", counting)
    backbone.add_client_adapter("c1")
    monkeypatch.undo()
    assert calls == [] and "c1" in backbone.bank.ranks
