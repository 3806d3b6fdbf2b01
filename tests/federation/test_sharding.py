"""A ``Federation`` sharded over processes (``--trainer.strategy client_parallel --trainer.devices P``).

Pure parts first (which process hosts which client, padded rounds, idle batches, summed traffic), then two real gloo
process groups: one that averages a shared adapter's copies by hand-checked weights, and ``atlas-pl fit`` subprocesses
where two processes give the adapters, optimizer moments and metrics of one process bit for bit, and where a run
checkpointed on two processes resumes on one.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from atlas_pl.data.formats import collate
from atlas_pl.data.sampling import IDLE_EXAMPLE, ClientChunkBatchSampler, RoundBatchSampler, RoundExamples
from atlas_pl.distributed import owner_of
from atlas_pl.federation import Federation
from atlas_pl.split.channel import ChannelStats
from atlas_pl.strategies import ClientParallelStrategy
from tests.conftest import TINY_GPT2

ROOT = Path(__file__).parents[2]
SIZES = [10, 3, 7, 12, 5]
OFFSETS = [sum(SIZES[:i]) for i in range(len(SIZES))]


def _client_of(index: int) -> int:
    return max(c for c, o in enumerate(OFFSETS) if o <= index)


# ---------------------------------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("fraction", [1.0, 0.6])
def test_sharded_rounds_host_each_client_on_one_process_and_pad_every_process_to_one_length(fraction) -> None:
    one = RoundBatchSampler(OFFSETS, SIZES, batch_size=4, local_steps=2, fraction=fraction, seed=3)
    shards = [RoundBatchSampler(OFFSETS, SIZES, 4, 2, fraction, 3, rank=r, world_size=2) for r in range(2)]
    for round_idx in range(4):
        for s in (one, *shards):
            s.set_epoch(round_idx)
        batches = [list(s) for s in shards]
        assert len(batches[0]) == len(batches[1]) == len(shards[0]) == len(shards[1])  # same steps everywhere
        real = [[b for b in bs if b != [s.idle_index]] for bs, s in zip(batches, shards)]
        for rank, bs in enumerate(real):
            assert {owner_of(_client_of(b[0]), 2) for b in bs} <= {rank}  # a client never changes process
        assert sorted(b for bs in real for b in bs) == sorted(list(one))  # together: the one-process round
        padding = sum(len(bs) for bs in batches) - len(list(one))
        assert padding == abs(len(real[0]) - len(real[1]))


def test_an_idle_index_yields_the_idle_example_and_collates_to_an_idle_batch() -> None:
    examples = RoundExamples([{"input_ids": [1, 2], "labels": [1, 2], "client_idx": 0}])
    assert examples[0]["client_idx"] == 0 and examples[1] is IDLE_EXAMPLE
    with pytest.raises(IndexError):
        examples[2]
    assert collate([examples[1]], pad_id=0) == {"idle": True, "client_idx": -1}


def test_evaluation_chunks_of_a_process_cover_only_its_clients() -> None:
    hosted = [c for c in range(len(SIZES)) if owner_of(c, 2) == 1]
    chunks = list(ClientChunkBatchSampler(OFFSETS, SIZES, 4, hosted))
    assert sorted({_client_of(b[0]) for b in chunks}) == hosted == [1, 3]
    assert sum(len(b) for b in chunks) == SIZES[1] + SIZES[3]


def test_channel_totals_of_two_processes_add_up_per_kind_and_per_client() -> None:
    a, b = ChannelStats(activations_up=5, messages=2), ChannelStats(activations_up=7, adapters_down=3, messages=1)
    a.per_client_up, b.per_client_up = {0: 5}, {0: 1, 1: 6}
    total = a.merged(b.state_dict())
    assert (total.activations_up, total.adapters_down, total.messages) == (12, 3, 3)
    assert total.per_client_up == {0: 6, 1: 6} and total.bytes_up == 12


def test_a_federation_refuses_several_processes_without_client_parallel_or_with_too_few_clients() -> None:
    fed = Federation(model="gpt2-tiny", model_overrides=TINY_GPT2, num_clients=3)
    with pytest.raises(ValueError, match="client_parallel"):
        fed.shard(0, 2, strategy=object())
    with pytest.raises(ValueError, match="--trainer.devices <= 3"):
        fed.shard(0, 4, strategy=ClientParallelStrategy())
    fed.shard(1, 2, strategy=ClientParallelStrategy())
    assert fed.local_clients() == [1]


# ---------------------------------------------------------------------------------- a real process group
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _average_worker(rank: int, port: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        fed = Federation(model="gpt2-tiny", model_overrides=TINY_GPT2, num_clients=4, share="server")
        fed.shard(rank, 2, ClientParallelStrategy())
        fed.num_examples = [10, 20, 30, 40]
        params = fed.adapter_parameters("server_c0")
        with torch.no_grad():
            for p in params:
                p.fill_(float(rank + 1))  # copy of process 0: all ones, of process 1: all twos
        fed._participants = set(fed.local_clients()) - ({2} if rank == 0 else set())  # client 2 did not train
        own = {n: p.detach().clone() for n, p in zip(("a", "b"), fed.adapter_parameters("client_1"))}
        fed.sync_shared_adapters()
        after = dict(zip(("a", "b"), fed.adapter_parameters("client_1")))
        torch.save({"shared": [p.detach().clone() for p in params], "own": own, "own_after": after}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_copies_of_a_shared_adapter_are_averaged_by_the_examples_of_the_clients_that_trained_them(tmp_path) -> None:
    mp.spawn(_average_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    # process 0 hosts clients 0 and 2 (only client 0 trained: weight 10), process 1 clients 1 and 3 (20 + 40)
    expected = (10 * 1.0 + 60 * 2.0) / 70
    for rank in (0, 1):
        for p in got[rank]["shared"]:
            torch.testing.assert_close(p, torch.full_like(p, expected))
        for key in ("a", "b"):  # a client's own adapter is never averaged
            assert torch.equal(got[rank]["own"][key], got[rank]["own_after"][key])


# ------------------------------------------------------------------------------------ atlas-pl fit runs
TINY = ["--model.model_overrides", '{"n_layer": 3, "n_embd": 32, "n_head": 2, "resid_pdrop": 0, "embd_pdrop": 0, '
        '"attn_pdrop": 0}', "--model.lora.target_modules", "null", "--data.num_clients", "5", "--data.num_groups",
        "2", "--data.tasks_per_group", "1", "--data.examples_per_client", "16", "--data.local_steps", "2",
        "--data.batch_size", "8", "--model.share", "none", "--trainer.strategy", "client_parallel"]  # fmt: skip


def _fit(save_dir: Path, devices: int, rounds: int, *extra: str) -> tuple[dict, list[dict], dict]:
    args = [sys.executable, "-m", "atlas_pl", "fit", "--config", "configs/demo.yaml",
            "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.enable_progress_bar", "false",
            "--trainer.max_epochs", str(rounds), "--trainer.devices", str(devices), *TINY, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    try:
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the {devices}-process run hung (killed after {err.timeout} s)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(save_dir / "demo" / "checkpoints" / "last.ckpt", weights_only=False)
    results = sorted((save_dir / "demo").glob("version_*/results.json"))[-1]
    return ckpt, json.loads(results.read_text())["history"], json.loads(results.read_text())


def _assert_same(a: tuple, b: tuple) -> None:
    (ckpt_a, history_a, res_a), (ckpt_b, history_b, res_b) = a, b
    assert ckpt_a["state_dict"].keys() == ckpt_b["state_dict"].keys()
    for key, value in ckpt_a["state_dict"].items():
        torch.testing.assert_close(ckpt_b["state_dict"][key], value, rtol=0, atol=1e-5)
    moments = 0
    for opt_a, opt_b in zip(ckpt_a["optimizer_states"], ckpt_b["optimizer_states"], strict=True):
        assert opt_a["state"].keys() == opt_b["state"].keys()
        for p, state in opt_a["state"].items():
            for m in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt_b["state"][p][m], state[m], rtol=0, atol=1e-5)
                moments += 1
    assert moments > 0
    assert ckpt_a["federation"]["adapter_ranks"] == ckpt_b["federation"]["adapter_ranks"]
    assert len(history_a) == len(history_b)
    for row_a, row_b in zip(history_a, history_b):
        assert row_a.keys() == row_b.keys()
        for key, value in row_a.items():
            assert row_b[key] == pytest.approx(value, abs=1e-5), key
    assert res_a["traffic"] == res_b["traffic"] and res_a["cluster_ids"] == res_b["cluster_ids"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple:
    return _fit(tmp_path_factory.mktemp("p2") / "logs", 2, 2)


@pytest.mark.slow
def test_two_processes_train_the_adapters_moments_and_metrics_of_one(tmp_path, two_processes) -> None:
    one = _fit(tmp_path / "logs", 1, 2)
    _assert_same(one, two_processes)
    assert two_processes[0]["federation"]["client_cuts"]  # phase 2 re-created clients' adapters at a deeper cut


@pytest.mark.slow
def test_a_run_checkpointed_on_two_processes_resumes_on_one(tmp_path, two_processes) -> None:
    save_dir = tmp_path / "logs"
    _fit(save_dir, 2, 1)
    resumed = _fit(save_dir, 1, 2, "--ckpt_path", "last")
    _assert_same(two_processes, resumed)
