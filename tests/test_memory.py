"""The client memory model: sizes, components, and agreement with a measured peak (tiny model, CPU profiler)."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, GPT2Config, LlamaConfig

from atlas_pl.memory import (
    DEVICE_PROFILES,
    ModelShape,
    block_stages,
    estimate_client_memory,
    estimate_latency,
    parse_size,
)
from atlas_pl.profiling import cpu_peak_bytes

GPT2_SMALL = ModelShape.from_config(GPT2Config())


# --------------------------------------------------------------------------------------------------- parse_size
@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ("1GB", 10**9),
        ("512MiB", 512 * 2**20),
        ("8 GB", 8 * 10**9),
        ("1.5 GiB", int(1.5 * 2**30)),
        ("2g", 2 * 2**30),
        ("100", 100),
        (4096, 4096),
        ("64kb", 64_000),
    ],
)
def test_parse_size_reads_decimal_and_binary_units(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("bad", ["lots", "8 GBs", "GB", "-1GB", -5, True, "1e3 MB", ""])
def test_parse_size_error_names_the_value_and_the_accepted_forms(bad):
    with pytest.raises(ValueError, match=r"memory size|bytes") as err:
        parse_size(bad)
    assert repr(bad) in str(err.value)


# --------------------------------------------------------------------------------------------------- shapes
def test_model_shape_from_gpt2_config_counts_gpt2_small_parameters():
    model_params = GPT2_SMALL.embedding_params() + 12 * GPT2_SMALL.block_params() + 2 * 768  # + final norm
    assert model_params == 124_439_808  # GPT-2 small, tied LM head


def test_model_shape_reads_llama_and_bert_configs():
    llama = ModelShape.from_config(
        LlamaConfig(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            num_hidden_layers=3,
            vocab_size=100,
        )
    )
    bert = ModelShape.from_config(
        BertConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=2, intermediate_size=64, vocab_size=100)
    )
    assert (llama.arch, llama.kv_dim, llama.head_dim, llama.intermediate_size) == ("llama", 32, 16, 96)
    assert (bert.arch, bert.type_vocab_size, bert.hidden_dropout) == ("bert", 2, 0.1)


def test_model_shape_rejects_unknown_families():
    with pytest.raises(ValueError, match="model_type"):
        ModelShape.from_config(type("Cfg", (), {"model_type": "t5"})())


# --------------------------------------------------------------------------------------------------- estimate
def test_estimate_components_add_up_to_the_total():
    est = estimate_client_memory(GPT2_SMALL, cut_layer=3, batch_size=4, seq_len=128, rank=8, device="cpu")
    parts = [
        est.weights,
        est.lora_params,
        est.lora_grads,
        est.optimizer_state,
        est.activations,
        est.workspace,
        est.cut_buffers,
    ]
    assert est.total == sum(parts)
    assert est.activations == sum(est.activation_breakdown.values())
    assert est.cut_buffers == 2 * 4 * 128 * 768 * 4


def test_estimate_lora_and_adamw_state_match_the_adapter_size():
    est = estimate_client_memory(GPT2_SMALL, cut_layer=2, batch_size=1, seq_len=8, rank=4)
    lora = 2 * 4 * ((768 + 3 * 768) + (768 + 768))  # two blocks × (c_attn + c_proj)
    assert est.lora_params == est.lora_grads == lora * 4
    assert est.optimizer_state == 2 * lora * 4 + 4 * 2 * 2 * 2  # two moments + a step counter per tensor


def test_estimate_grows_with_cut_rank_batch_and_sequence():
    base = dict(cut_layer=2, batch_size=2, seq_len=64, rank=4)
    ref = estimate_client_memory(GPT2_SMALL, **base).total
    for key, value in (("cut_layer", 3), ("batch_size", 3), ("seq_len", 96), ("rank", 8)):
        assert estimate_client_memory(GPT2_SMALL, **{**base, key: value}).total > ref, key


def test_rank_pattern_overrides_the_default_rank_per_module():
    pattern = {"transformer.h.0.attn.c_attn": 16}
    low = estimate_client_memory(GPT2_SMALL, 2, 1, 8, rank=4)
    high = estimate_client_memory(GPT2_SMALL, 2, 1, 8, rank=4, rank_pattern=pattern)
    assert high.lora_params - low.lora_params == 12 * (768 + 3 * 768) * 4


def test_bf16_halves_the_frozen_weights():
    fp32 = estimate_client_memory(GPT2_SMALL, 2, 1, 8, dtype="float32")
    bf16 = estimate_client_memory(GPT2_SMALL, 2, 1, 8, dtype=torch.bfloat16)
    assert bf16.weights * 2 == fp32.weights


def test_first_block_keeps_nothing_before_its_first_lora_module():
    ranks = {"attn.c_attn": 8, "attn.c_proj": 8}
    settings = dict(training=True, device="cpu", seq_len=16, act=4, adapter=4, lora_dropout=0.0)
    full = block_stages(GPT2_SMALL, ranks, first_block=False, **settings)
    first = block_stages(GPT2_SMALL, ranks, first_block=True, **settings)
    assert full[0].component == "norms" and first[0].component == "lora_inputs"


def test_cuda_attention_keeps_no_score_matrix():
    cpu = estimate_client_memory(GPT2_SMALL, 2, 2, 512, device="cpu")
    cuda = estimate_client_memory(GPT2_SMALL, 2, 2, 512, device="cuda")
    assert cpu.activation_breakdown["attention"] > 5 * cuda.activation_breakdown["attention"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(cut_layer=0), "cut_layer"),
        (dict(cut_layer=13), r"cut_layer` must be an int in \[1, 12\]"),  # 12 = every block on the client
        (dict(batch_size=0), "batch_size"),
        (dict(rank=0), "rank"),
        (dict(optimizer="lion"), "optimizer"),
        (dict(dtype="int3"), "dtype"),
        (dict(target_modules=["mlp.fc9"]), "target_modules"),
    ],
)
def test_estimate_errors_name_the_argument(kwargs, match):
    args = {"cut_layer": 2, "batch_size": 1, "seq_len": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        estimate_client_memory(GPT2_SMALL, **args)


# --------------------------------------------------------------------------------------------------- latency
def test_latency_splits_compute_and_communication():
    phone = estimate_latency(GPT2_SMALL, 2, "phone-1gb", batch_size=4, seq_len=128, local_steps=5)
    gpu = estimate_latency(GPT2_SMALL, 2, DEVICE_PROFILES["gpu-24gb"], batch_size=4, seq_len=128, local_steps=5)
    assert phone.total_s == pytest.approx(phone.compute_s + phone.communication_s)
    assert gpu.compute_s < phone.compute_s and gpu.communication_s < phone.communication_s
    deeper = estimate_latency(GPT2_SMALL, 4, "phone-1gb", batch_size=4, seq_len=128, local_steps=5)
    assert deeper.compute_s == pytest.approx(2 * phone.compute_s)


# --------------------------------------------------------------------------------------------------- measurement
_profiler_peak = cpu_peak_bytes


def test_estimate_is_within_30_percent_of_a_profiled_client_step():
    from atlas_pl.lora.adapters import LoraSpec
    from atlas_pl.models import load_model
    from atlas_pl.split.backbone import SplitBackbone

    torch.manual_seed(0)
    model = load_model("gpt2-tiny", overrides={"n_layer": 3, "n_embd": 64, "n_head": 4, "vocab_size": 512})
    backbone = SplitBackbone(model, 2, LoraSpec(rank=8))
    backbone.add_client_adapter("client")
    backbone.activate("client", None)
    model.train()
    opt = torch.optim.AdamW(backbone.bank.parameters("client"))
    ids, mask = torch.randint(0, 512, (4, 64)), torch.ones(4, 64, dtype=torch.long)

    def step():
        hidden = backbone.client_forward(ids, mask)
        hidden.backward(torch.randn_like(hidden))
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    weights = sum(
        p.numel() * 4
        for n, p in model.named_parameters()
        if "lora_" not in n and not n.startswith(("transformer.h.2.", "transformer.ln_f", "lm_head"))
    )
    steady = weights + backbone.bank.nbytes("client") + sum(v.nbytes for s in opt.state.values() for v in s.values())
    measured = steady + _profiler_peak(step)
    est = estimate_client_memory(ModelShape.from_config(model.config), 2, 4, 64, rank=8, device="cpu")
    assert est.weights == weights
    assert est.total == pytest.approx(measured, rel=0.30)
    dynamic = est.total - est.steady
    assert dynamic == pytest.approx(measured - steady, rel=0.30)
