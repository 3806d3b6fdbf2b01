"""All three phase callbacks in a foreign Lightning project: 2-process CPU DDP (gloo), one client per process.

The project below uses no atlas-pl class except what the README advertises for reuse (the callbacks,
``PeftClientMixin``, ``ClientParallelStrategy``): a tiny GPT-2 with a peft LoRA adapter, its own data and training
step. The two clients have different amounts of data (4 and 6 batches per epoch) and get different LoRA ranks from
their memory budgets. The test runs the script in a subprocess with a timeout, so a hang fails instead of waiting for
the process-group timeout, and checks the merge by value against a dense hand computation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(out: Path) -> None:
    import lightning as L
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import DataLoader, TensorDataset
    from transformers import GPT2Config, GPT2LMHeadModel

    # recipe:begin
    from atlas_pl import ClientParallelStrategy, PeftClientMixin
    from atlas_pl.algorithms import Exact
    from atlas_pl.callbacks import ClusterAggregation, RankAllocation, TaskClustering

    class MyClient(PeftClientMixin, L.LightningModule):  # one DDP process = one client
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)  # the same frozen base model in every process
            config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, eos_token_id=0)
            base = GPT2LMHeadModel(config)
            self.model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"]))

        def setup(self, stage: str) -> None:
            generator = torch.Generator().manual_seed(self.global_rank)  # this client's own data
            self.data = TensorDataset(torch.randint(0, 64, (8 + 4 * self.global_rank, 12), generator=generator))
            self.num_examples = len(self.data)  # the aggregation weight

        def train_dataloader(self) -> DataLoader:
            return DataLoader(self.data, batch_size=2)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch[0], labels=batch[0]).loss

        def configure_optimizers(self):
            return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-2)

    trainer = L.Trainer(
        strategy=ClientParallelStrategy(),  # no gradient all-reduce, no DistributedSampler, equal batches per round
        accelerator="cpu",
        devices=2,
        max_epochs=2,  # one epoch = one round
        callbacks=[
            TaskClustering(num_clusters=1, sides="client"),  # phase 1: clusters from 64-D fingerprints
            RankAllocation(budgets=["320KB", "1GB"], r_min=1, r_max=8),  # phase 2: ranks that fit each budget
            ClusterAggregation(Exact()),  # phase 4: exact merge per cluster, back at each client's ranks
        ],
    )
    # recipe:end
    trainer.callbacks.insert(0, Snapshot(out))  # the test's probe: adapters before aggregation
    trainer.fit(MyClient())
    module = trainer.lightning_module
    layers = module._lora_layers()
    rank = trainer.global_rank
    torch.save({m: module.pull(rank, "client").delta(m) for m in layers}, out / f"after_{rank}.pt")
    (out / f"facts_{rank}.json").write_text(
        json.dumps(
            {
                "ranks": {m: int(layer.r["default"]) for m, layer in layers.items()},
                "num_training_batches": trainer.num_training_batches,
                "batches_run": Snapshot.batches_run,
                "num_examples": module.num_examples,
                "cluster_id": module.cluster_id,
            }
        )
    )


class Snapshot:
    """A callback saving the adapters at the last batch of the last round, before ClusterAggregation (later in the
    list) merges them (built lazily, so that importing this file for the test does not import Lightning)."""

    batches_run = 0

    def __new__(cls, out: Path):  # type: ignore[misc]
        from lightning.pytorch.callbacks import Callback

        class _Snapshot(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
                Snapshot.batches_run += 1
                last_round = trainer.current_epoch == trainer.max_epochs - 1
                if last_round and batch_idx + 1 == trainer.num_training_batches:
                    update = pl_module.pull(trainer.global_rank, "client")
                    deltas = {m: update.delta(m) for m in update.factors}
                    torch.save(deltas, out / f"before_{trainer.global_rank}.pt")

        return _Snapshot()


@pytest.mark.slow
def test_readme_shows_the_recipe_of_this_test_verbatim() -> None:
    source = Path(__file__).read_text()
    recipe = source.split("# recipe:begin\n")[1].split("    # recipe:end")[0]
    lines = [line[4:] for line in recipe.splitlines()]  # dedented out of `run`
    assert "\n".join(lines) in (ROOT / "README.md").read_text()


def test_three_callbacks_in_a_foreign_project_under_two_process_ddp_with_uneven_batches(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    try:
        proc = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the 2-process run hung (killed after {err.timeout} s)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    facts = [json.loads((tmp_path / f"facts_{r}.json").read_text()) for r in (0, 1)]
    before = [torch.load(tmp_path / f"before_{r}.pt") for r in (0, 1)]
    after = [torch.load(tmp_path / f"after_{r}.pt") for r in (0, 1)]

    assert [f["num_training_batches"] for f in facts] == [4, 4]  # 4 and 6 batches: both train the smaller count
    assert [f["batches_run"] for f in facts] == [8, 8]  # 2 rounds, no DistributedSampler halving the data
    assert "the clients' train dataloaders have [4, 6] batches" in proc.stderr + proc.stdout
    assert [f["cluster_id"] for f in facts] == [0, 0]
    weak, strong = (set(f["ranks"].values()) for f in facts)
    assert max(weak) < min(strong) == 8, facts  # different LoRA ranks from the budgets
    p = np.array([f["num_examples"] for f in facts], dtype=np.float64)
    p /= p.sum()
    for module in before[0]:
        hand = p[0] * before[0][module].numpy() + p[1] * before[1][module].numpy()  # Σ p_i s_i B_i A_i, dense
        u, s, vh = np.linalg.svd(hand)
        for r, merged in enumerate(after):
            k = facts[r]["ranks"][module]
            best = (u[:, :k] * s[:k]) @ vh[:k]  # the best rank-k approximation of the merge
            np.testing.assert_allclose(merged[module].numpy(), best, rtol=1e-4, atol=1e-6)


if __name__ == "__main__":
    run(Path(sys.argv[1]))
