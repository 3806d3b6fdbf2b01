"""Server batching across clients: one server pass for the clients sharing a server adapter equals one at a time."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from atlas_pl.data import FederatedDataModule
from atlas_pl.data.formats import collate_clients
from atlas_pl.data.sampling import RoundBatchSampler
from atlas_pl.federation import Federation
from atlas_pl.lora.adapters import LoraSpec
from atlas_pl.models import load_model
from atlas_pl.split.backbone import SplitBackbone
from atlas_pl.split.channel import InProcessChannel
from atlas_pl.split.step import split_forward_backward, split_group_forward_backward
from tests.conftest import tiny_data_kwargs, tiny_federation_kwargs

TINY = {"vocab_size": 1000}
NO_DROPOUT = {
    "gpt2-tiny": {"resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama-tiny": {},
    "bert-tiny": {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0},
}


def _batch(task: str, rows: int, width: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 1000, (rows, width), generator=g)
    mask = torch.ones_like(ids)
    mask[0, width - 2 :] = 0  # each client's own right padding
    if task == "classification":
        labels = torch.randint(0, 2, (rows,), generator=g)
    else:
        labels = torch.full_like(ids, -100)
        labels[:, width - 4 : width - 2] = ids[:, width - 4 : width - 2]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "task_id": seed % 2}


def _setup(name: str, task: str) -> tuple[SplitBackbone, list[tuple[str, str, int]]]:
    torch.manual_seed(0)
    base = load_model(name, task, num_labels=2, overrides={**TINY, **NO_DROPOUT[name]}).eval()
    split = SplitBackbone(base, cut_layer=1, lora=LoraSpec(rank=4, alpha=8), pooling="mean")
    if task == "classification":
        split.configure_tasks([2, 2])  # two tasks: the members of one group use different task heads
    split.add_server_adapter("s")
    members = []
    for i, rank in enumerate((2, 4, 3)):
        split.add_client_adapter(f"c{i}", rank_pattern={m: rank for m in split.client_module_names()})
        members.append((f"c{i}", "s", i))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name_ in ["s", "c0", "c1", "c2"]:
            for a, b, _ in split.bank.factors(name_).values():
                a.copy_(torch.randn(a.shape, generator=g) * 0.1)
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
    return split, members


def _grads(split: SplitBackbone) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in split.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("max_rows", [None, 4])  # 4: passes of [2+2 rows] and [3], by length
@pytest.mark.parametrize(("name", "task"), [("gpt2-tiny", "causal_lm"), ("llama-tiny", "causal_lm"),
                                            ("bert-tiny", "classification")])  # fmt: skip
def test_one_server_pass_for_three_clients_equals_their_steps_one_at_a_time(name: str, task: str, max_rows) -> None:
    split, members = _setup(name, task)
    batches = [_batch(task, rows, width, seed) for seed, (rows, width) in enumerate([(2, 9), (3, 12), (2, 7)])]

    alone = []
    for batch, (c, s, i) in zip(batches, members):  # the plain split step of each client; server grads summed
        alone.append(split_forward_backward(split, InProcessChannel(), batch, c, s, client_idx=i))
    expected = _grads(split)
    split.zero_grad(set_to_none=True)

    channel = InProcessChannel()
    outs = split_group_forward_backward(split, channel, batches, members, batched=True, max_rows=max_rows)
    got = _grads(split)
    assert got.keys() == expected.keys()
    assert {k.split("lora_")[1].split(".")[1] for k in got if "lora_" in k} == {"s", "c0", "c1", "c2"}
    if task == "classification":  # both task heads of the server adapter, each from its own members' rows
        assert sum(k.startswith("heads.") for k in got) == 4, sorted(got)
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)
    for out, ref in zip(outs, alone):
        assert float(out.loss.detach()) == pytest.approx(float(ref.loss.detach()), abs=1e-5)
        assert out.num_targets == ref.num_targets and torch.equal(out.correct, ref.correct)
    width = split.model.config.hidden_size * 4  # fp32 bytes per position
    assert channel.stats.activations_up == sum(b["input_ids"].numel() for b in batches) * width
    assert set(channel.stats.per_client_down) == {0, 1, 2}


def test_members_with_different_server_adapters_or_cuts_form_separate_groups() -> None:
    split, members = _setup("gpt2-tiny", "causal_lm")
    split.add_server_adapter("t")
    split.add_client_adapter("deep", rank_pattern={m: 2 for m in split.client_module_names(2)}, cut_layer=2)
    members = [members[0], ("c1", "t", 1), ("deep", "s", 2), members[2]]
    batches = [_batch("causal_lm", 2, 8 + k, k) for k in range(4)]
    for batched in (False, True):
        split.zero_grad(set_to_none=True)
        split_group_forward_backward(split, InProcessChannel(), batches, members, batched=batched)
        grads = _grads(split)
        if not batched:
            expected = grads
    for key, value in expected.items():
        torch.testing.assert_close(grads[key], value, rtol=0, atol=1e-5, msg=key)
    assert any("lora_A.t" in k for k in grads) and any("lora_A.deep" in k for k in grads)


def test_a_u_shaped_split_is_refused_with_the_fix() -> None:
    split, members = _setup("gpt2-tiny", "causal_lm")
    split.shape = "u_shaped"
    with pytest.raises(ValueError, match="schedule sequential"):
        split_group_forward_backward(split, InProcessChannel(), [_batch("causal_lm", 2, 8, 0)], members[:1])


def test_a_synchronous_round_yields_each_clients_own_batches_step_by_step() -> None:
    kwargs = dict(client_offsets=[0, 10, 30], client_sizes=[10, 20, 5], batch_size=4, local_steps=3, seed=3)
    sequential, synchronous = RoundBatchSampler(**kwargs), RoundBatchSampler(**kwargs, synchronous=True)
    seq = list(sequential)
    sync = list(synchronous)
    assert len(sync) == len(synchronous) == 3 and len(seq) == 9
    for s, step in enumerate(sync):  # step s = the s-th batch of client 0, then 1, then 2
        assert step == seq[s] + seq[3 + s] + seq[6 + s]
    items = [{"input_ids": [1] * (2 + i % 3), "labels": 0, "client_idx": i // 4} for i in range(12)]
    group = collate_clients(items, pad_id=0)
    assert [b["client_idx"] for b in group["clients"]] == [0, 1, 2] and group["client_idx"] == 0
    with pytest.raises(ValueError, match="choose one"):
        RoundBatchSampler(**kwargs, synchronous=True, interleave=True)


def _fit_synchronous(batched: bool, tmp_path) -> Federation:
    L.seed_everything(0, verbose=False)
    overrides = {"n_layer": 2, "n_embd": 32, "n_head": 2, "n_positions": 64, **NO_DROPOUT["gpt2-tiny"]}
    fed = Federation(**tiny_federation_kwargs(model_overrides=overrides, server_batching=batched))
    dm = FederatedDataModule(**tiny_data_kwargs(schedule="synchronous"))
    L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, enable_checkpointing=False, default_root_dir=tmp_path).fit(fed, datamodule=dm)
    return fed


def test_a_synchronous_federation_trains_the_same_adapters_batched_or_one_at_a_time(tmp_path) -> None:
    batched, alone = _fit_synchronous(True, tmp_path), _fit_synchronous(False, tmp_path)
    a = {k: v for k, v in batched.named_parameters() if "lora_" in k}
    b = {k: v for k, v in alone.named_parameters() if "lora_" in k}
    initial = Federation(**tiny_federation_kwargs())
    assert a.keys() == b.keys()
    moved = 0
    for key, value in a.items():
        torch.testing.assert_close(value, b[key], rtol=0, atol=1e-5, msg=key)
        moved += int(not torch.equal(value.detach(), dict(initial.named_parameters())[key].detach()))
    assert moved > 0, "training moved no adapter"
    assert [h["val_loss"] for h in batched.history] == pytest.approx(
        [h["val_loss"] for h in alone.history], abs=1e-5)  # fmt: skip
    assert len(batched.history) == 2 and batched.participants() == [0, 1, 2, 3]
