"""The federation protocol is all the phase callbacks need: a toy federation (no ``Federation``) runs all three.

``ToyFederation`` is a peft GPT-2 with one named LoRA adapter per client and about 40 lines of protocol; clients 0 and
2 model sequences of tokens 1 and 2, clients 1 and 3 of tokens 41 and 42.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from atlas_pl.algorithms import Exact
from atlas_pl.callbacks import ClusterAggregation, RankAllocation, TaskClustering
from atlas_pl.protocol import AdapterUpdate, ClientSizing

N = 4
CONFIG = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, eos_token_id=0)


class ToyFederation(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"])
        self.model = get_peft_model(GPT2LMHeadModel(GPT2Config(**CONFIG)), lora, adapter_name="c0")
        self.clusters, self.sizes = [0] * N, [10, 20, 30, 40]
        for c in range(1, N):
            self.model.add_adapter(f"c{c}", lora)
            self.push(c, "client", self.pull(0, "client"))  # every client starts from the same global adapter

    def batch(self, c: int, seed: int = 0) -> torch.Tensor:
        low = 1 + 40 * (c % 2)  # the client's task: the two tokens it models
        return torch.randint(low, low + 2, (2, 12), generator=torch.Generator().manual_seed(100 * c + seed))

    def layers(self, c: int) -> dict:
        return {n: m for n, m in self.model.base_model.model.named_modules() if f"c{c}" in getattr(m, "lora_A", {})}

    def training_step(self, batch, batch_idx):
        c = batch_idx % N
        self.model.set_adapter(f"c{c}")
        return self.model(input_ids=self.batch(c, batch_idx), labels=self.batch(c, batch_idx)).loss

    def train_dataloader(self):
        return range(N)  # one step per client per round

    def configure_optimizers(self):
        return torch.optim.SGD([p for n, p in self.named_parameters() if "lora_" in n], lr=0.1)

    # the federation protocol ---------------------------------------------------------------------------
    def local_clients(self):
        return list(range(N))

    participants = local_clients

    def cluster_of(self, c):
        return self.clusters[c]

    def assign_clusters(self, ids):
        self.clusters = list(ids)

    def client_batches(self, c, num_batches, seed):
        return [self.batch(c, seed + b) for b in range(num_batches)]

    def task_signal(self, c, batches, kind="grad_B"):
        self.model.set_adapter(f"c{c}")
        for ids in batches:
            self.model(input_ids=ids, labels=ids).loss.backward()
        signal = {f"client.{n}.lora_B": m.lora_B[f"c{c}"].weight.grad.flatten() for n, m in self.layers(c).items()}
        self.model.zero_grad(set_to_none=True)
        return signal

    def client_modules(self, c, cut_layer=None):
        return list(self.layers(c))

    def client_sizing(self):
        return ClientSizing(GPT2Config(**CONFIG), 2, 12, ("attn.c_attn",), cut_layer=2)

    def resize(self, c, rank_pattern, cut_layer=None):
        config = self.model.peft_config[f"c{c}"]
        config.rank_pattern, config.alpha_pattern = dict(rank_pattern), {m: 2 * r for m, r in rank_pattern.items()}
        self.model.delete_adapter(f"c{c}")
        self.model.add_adapter(f"c{c}", config)

    def adapter_sides(self):
        return ("client",)

    def adapter_layout(self, c, side):
        return {n: (m.r[f"c{c}"], m.scaling[f"c{c}"]) for n, m in self.layers(c).items()}

    def pull(self, c, side):
        layers = self.layers(c).items()
        factors = {n: (m.lora_A[f"c{c}"].weight.detach().clone(), m.lora_B[f"c{c}"].weight.detach().clone())
                   for n, m in layers}  # fmt: skip
        return AdapterUpdate(factors, {n: m.scaling[f"c{c}"] for n, m in layers}, self.sizes[c])

    @torch.no_grad()
    def push(self, c, side, update):
        for n, m in self.layers(c).items():
            m.lora_A[f"c{c}"].weight.copy_(update.factors[n][0])
            m.lora_B[f"c{c}"].weight.copy_(update.factors[n][1])


class BeforeAggregation(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == trainer.num_training_batches:
            self.updates = [pl_module.pull(c, "client") for c in range(N)]


def test_all_three_phase_callbacks_run_on_a_toy_federation_through_the_protocol_alone(tmp_path) -> None:
    toy, probe = ToyFederation(), BeforeAggregation()
    callbacks = [
        TaskClustering(num_clusters=2, sides="client", num_batches=2),
        RankAllocation(budgets=["320KB", "1GB"], r_min=1, r_max=8),  # clients 0 and 2 small, 1 and 3 large
        probe,
        ClusterAggregation(Exact()),
    ]
    L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
              enable_model_summary=False, callbacks=callbacks, default_root_dir=tmp_path).fit(toy)  # fmt: skip

    assert toy.clusters[0] == toy.clusters[2] != toy.clusters[1] == toy.clusters[3]  # the two token ranges
    ranks = [{r for r, _ in toy.adapter_layout(c, "client").values()} for c in range(N)]
    assert max(ranks[0] | ranks[2]) < min(ranks[1] | ranks[3]) == 8, ranks
    for members in ([0, 2], [1, 3]):
        p = np.array([toy.sizes[c] for c in members], dtype=np.float64) / sum(toy.sizes[c] for c in members)
        for module in probe.updates[0].factors:
            hand = sum(p[k] * probe.updates[c].delta(module).numpy() for k, c in enumerate(members))
            u, s, vh = np.linalg.svd(hand)
            for c in members:
                got = toy.pull(c, "client")
                r = got.factors[module][0].shape[0]
                np.testing.assert_allclose(got.delta(module).numpy(), (u[:, :r] * s[:r]) @ vh[:r], rtol=1e-4, atol=1e-6)
