"""One frozen model, cut in two, carrying every client's and server's LoRA adapters.

``SplitBackbone`` is the shared object of a federation: the client half (embeddings + blocks ``[0, cut_layer)``) and
the server half (blocks ``[cut_layer, L)`` + final norm + head) are views of the same modules, so no weight is copied.
Client adapters live only on client-half modules and server adapters only on server-half modules.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from atlas_pl.lora.adapters import AdapterBank, LoraSpec, validate_rank
from atlas_pl.split.bottleneck import BottleneckSpec, InformationBottleneck
from atlas_pl.split.pooling import Pooling, ResolvedPooling, pool, resolve_pooling, validate_pooling
from atlas_pl.split.registry import (
    ArchSpec,
    block_module_names,
    get_arch,
    get_submodule,
    num_blocks,
    validate_cut_layer,
)

Objective = Literal["cross_entropy", "contrast"]
SplitShape = Literal["two_part", "u_shaped"]
SHAPES = ("two_part", "u_shaped")


def contrast_loss(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """The class-balanced contrast ``Σ_i w_i (mean_c z_ic − z_i,gold)`` of logits ``z`` and gold classes.

    It is cross-entropy minus cross-entropy against uniform targets, with every gold class (or answer token) in
    the batch given the same total weight.

    Its gradient in the logits, ``w_i (1/C − e_gold)``, does not depend on the model's current predictions, and
    the equal class weights cancel a batch's label frequencies: what is left of a task's gradient is the difference
    of its class-conditional features, i.e. which inputs it maps to which answer. Cross-entropy's own gradient
    ``p_i − e_gold`` carries ``mean feature × (mean prediction − label frequency)`` too, the same for any two tasks
    on similar text whatever their labels, and on real data that term can outweigh the label-dependent one (two
    tasks with opposite answers for the same texts then get similar fingerprints). Used for task signals, not for
    training: it is linear in the logits and unbounded below.
    """
    classes, inverse, counts = torch.unique(gold, return_inverse=True, return_counts=True)
    weights = 1.0 / (len(classes) * counts[inverse].to(logits.dtype))
    return (weights * (logits.mean(-1) - logits.gather(-1, gold[:, None]).squeeze(-1))).sum()


@dataclass
class ServerOutput:
    """What the server half returns for one batch.

    Attributes:
        loss: Mean loss over targets (answer tokens for causal LMs, examples for classification).
        correct: Per-example bool: the first answer token (the label word) is the argmax over the whole vocabulary
            (causal LM, a quick training signal; evaluation scores label words, see ``split.scoring``), or the class
            is predicted (classification).
        num_targets: Number of target tokens/examples the loss averages over.
        pred: Predicted class per example (classification), else ``None``.
        first_logits: Causal LM: ``[B, vocab]`` logits at each example's first answer position (``-inf`` rows for
            examples without an answer); lets evaluation compare label words' first tokens at no extra cost.
    """

    loss: torch.Tensor
    correct: torch.Tensor
    num_targets: int
    pred: torch.Tensor | None = None
    first_logits: torch.Tensor | None = None


def split_model(model: nn.Module, cut_layer: int) -> tuple[nn.ModuleList, nn.ModuleList]:
    """Client and server block lists of ``model`` cut before block ``cut_layer``; the modules are shared, not copied.

    Raises:
        ValueError: Unknown architecture or ``cut_layer`` outside ``[1, num_blocks - 1]``.
    """
    arch = get_arch(model)
    blocks: Any = model.get_submodule(arch.blocks_path)
    validate_cut_layer(cut_layer, len(blocks))
    return nn.ModuleList(blocks[:cut_layer]), nn.ModuleList(blocks[cut_layer:])


class SplitBackbone(nn.Module):
    """A frozen Hugging Face model split at ``cut_layer``, hosting named LoRA adapters for both halves.

    Args:
        model: A Hugging Face model of a registered architecture (``atlas_pl.split.registry``).
        cut_layer: Blocks ``[0, cut_layer)`` run on the client; must be in ``[1, num_blocks - 1]``.
        lora: LoRA hyper-parameters (rank, alpha, dropout, target modules).
        pooling: How a classifier pools the last hidden states: ``mean`` (attention-mask-weighted mean), ``cls``
            (first token), ``pooler`` (the model's pooler), or ``auto``: the checkpoint's own pooling when it is a
            sentence-transformers folder, else ``pooler`` only if the pooler is trained (non-zero bias), else ``mean``
            (see ``atlas_pl.split.pooling``). The resolved mode is ``self.pooling``; causal LMs ignore it.

    Raises:
        ValueError: Unknown architecture, bad ``cut_layer``, a target module missing from the blocks, or a bad
            ``pooling``.
    """

    def __init__(
        self, model: nn.Module, cut_layer: int, lora: LoraSpec | None = None, pooling: Pooling = "auto"
    ) -> None:
        super().__init__()
        self.arch: ArchSpec = get_arch(model)
        self.num_layers = num_blocks(model, self.arch)
        validate_cut_layer(cut_layer, self.num_layers)
        self.cut_layer = cut_layer
        self.lora = lora or LoraSpec()
        self.targets = tuple(self.lora.target_modules or self.arch.default_targets)
        self._check_targets(model)
        validate_pooling(pooling)
        self.pooling: ResolvedPooling = (
            resolve_pooling(pooling, model, self._pooler(model)) if self.arch.task == "classification" else "mean"
        )
        model.requires_grad_(False)
        self.model: Any = model
        self.bank = AdapterBank(model, fan_in_fan_out=self.arch.fan_in_fan_out)
        self.heads = nn.ModuleDict()
        self.task_num_labels: list[int] | None = None
        self.task_heads: list[int] | None = None  # task id -> head id (None: each task its own head)
        self.objective: Objective = "cross_entropy"
        self.shape: SplitShape = "two_part"  # where the head and the loss run (see ``atlas_pl.split.step``)
        self.client_cuts: dict[str, int] = {}  # client adapters whose client half ends after `cut_layer`
        self.server_adapters: list[str] = []
        self.client_adapters: list[str] = []
        self.bottleneck: InformationBottleneck | None = None  # learned noise at the cut (``enable_bottleneck``)

    def enable_bottleneck(self, spec: BottleneckSpec) -> None:
        """Give every client adapter (present and future) learned noise scales at the cut (``split.bottleneck``)."""
        self.bottleneck = InformationBottleneck(spec, int(self.model.get_input_embeddings().embedding_dim))
        for name in self.client_adapters:
            self.bottleneck.add(name)

    def client_parameters(self, name: str) -> list[Any]:
        """What a client's optimizer trains: its LoRA factors, and its bottleneck scales if it has a bottleneck.

        With a bottleneck the result is two parameter groups: the factors, and the log-scales at the bottleneck's
        learning rate without weight decay.
        """
        params: list[Any] = list(self.bank.parameters(name))
        if self.bottleneck is not None and name in self.bottleneck:
            params = [{"params": params}, {"params": [self.bottleneck.log_scale[name]], "weight_decay": 0.0,
                                           "lr": self.bottleneck.spec.learning_rate}]  # fmt: skip
        return params

    def _check_targets(self, model: nn.Module) -> None:
        block0 = model.get_submodule(f"{self.arch.blocks_path}.0")
        names = {n for n, _ in block0.named_modules()}
        missing = [t for t in self.targets if t not in names]
        if missing:
            raise ValueError(
                f"`target_modules` {missing} not found in a {self.arch.name} block; "
                f"choose among {list(self.arch.all_targets)}"
            )

    def _pooler(self, model: nn.Module) -> nn.Module | None:
        path = self.arch.extra.get("pooler")
        try:
            return None if path is None else model.get_submodule(path)
        except AttributeError:  # e.g. a BERT built with `add_pooling_layer=False`
            return None

    @property
    def task(self) -> str:
        return self.arch.task

    def client_module_names(self, cut_layer: int | None = None) -> list[str]:
        """LoRA target modules of a client half that ends before block ``cut_layer`` (default: the backbone's)."""
        return block_module_names(self.arch, self.targets, range(0, cut_layer or self.cut_layer))

    def cut_of(self, client_adapter: str | None) -> int:
        """Cut layer of the client that owns ``client_adapter`` (clients may cut later than the backbone's cut)."""
        return self.client_cuts.get(client_adapter or "", self.cut_layer)

    def validate_client_cut(self, cut_layer: int) -> None:
        """A client's cut must lie in ``[cut_layer, num_layers - 1]``: server adapters start at the backbone's cut.

        Raises:
            ValueError: The cut is outside that range.
        """
        if (
            isinstance(cut_layer, bool)
            or not isinstance(cut_layer, int)
            or not (self.cut_layer <= cut_layer <= self.num_layers - 1)
        ):
            raise ValueError(
                f"a client's `cut_layer` must be an int in [{self.cut_layer}, {self.num_layers - 1}] (the server "
                f"adapters start at block {self.cut_layer}), got {cut_layer!r}; lower `model.cut_layer` to allow "
                "earlier client cuts"
            )

    def server_module_names(self) -> list[str]:
        return block_module_names(self.arch, self.targets, range(self.cut_layer, self.num_layers))

    # ----------------------------------------------------------------------------------------- adapters
    def add_client_adapter(
        self,
        name: str,
        rank: int | None = None,
        rank_pattern: dict[str, int] | None = None,
        cut_layer: int | None = None,
    ) -> None:
        """Add a LoRA adapter named ``name`` on a client half (blocks ``[0, cut_layer)``; default the backbone's cut).

        Every module gets the update scaling ``lora.alpha / lora.rank`` whatever its rank.
        """
        rank = self.lora.rank if rank is None else rank
        validate_rank(rank)
        cut = self.cut_layer if cut_layer is None else cut_layer
        self.validate_client_cut(cut)
        scaling = self.lora.alpha / self.lora.rank
        self.bank.add(name, self.client_module_names(cut), rank, scaling * rank, self.lora.dropout, rank_pattern)
        if name not in self.client_adapters:
            self.client_adapters.append(name)
        if self.bottleneck is not None:
            self.bottleneck.add(name)
        if cut == self.cut_layer:
            self.client_cuts.pop(name, None)
        else:
            self.client_cuts[name] = cut

    def add_server_adapter(
        self, name: str, rank: int | None = None, rank_pattern: dict[str, int] | None = None
    ) -> None:
        """Add a LoRA adapter named ``name`` on the server half (plus trainable task heads for classifiers)."""
        rank = self.lora.rank if rank is None else rank
        validate_rank(rank)
        self.bank.add(name, self.server_module_names(), rank, self.lora.alpha, self.lora.dropout, rank_pattern)
        self.server_adapters.append(name)
        if self.task == "classification":
            self._add_heads(name)

    # ----------------------------------------------------------------------------------------- task heads
    @staticmethod
    def head_name(server_adapter: str, task_id: int) -> str:
        """Key of the classification head of task ``task_id`` owned by ``server_adapter``."""
        return f"{server_adapter}__task{task_id}"

    def configure_tasks(self, num_labels: list[int], heads: list[int] | None = None) -> None:
        """Give every server adapter one classification head per task (``num_labels[t]`` classes for task ``t``).

        With ``heads``, one per head id instead: task ``t`` uses the head of task ``heads[t]`` (e.g. tasks with the
        same label words).

        Heads whose size already matches are kept (a resume reloads them); classifiers only.

        Raises:
            ValueError: A task with fewer than 2 labels, or ``heads`` that do not point at a task of the same size.
        """
        bad = [(t, n) for t, n in enumerate(num_labels) if n < 2]
        if bad:
            raise ValueError(f"task {bad[0][0]} has {bad[0][1]} label(s); a classification task needs >= 2 labels")
        if heads is not None:
            wrong = [t for t, h in enumerate(heads) if not 0 <= h <= t or num_labels[h] != num_labels[t]]
            if len(heads) != len(num_labels) or wrong:
                raise ValueError(
                    f"`heads` {heads} must give each of the {len(num_labels)} tasks the id of an earlier (or the "
                    f"same) task with as many labels {num_labels}; tasks {wrong} do not"
                )
        self.task_heads = None if heads is None else list(heads)
        self.task_num_labels = list(num_labels)
        if self.task == "classification":
            for name in self.server_adapters:
                self._add_heads(name)

    def _add_heads(self, server_adapter: str) -> None:
        template: Any = get_submodule(self.model, self.arch.head_path)
        for t, n in enumerate(self.task_num_labels or [int(template.out_features)]):
            if self.head_of(t) != t:  # shares the head of an earlier task
                continue
            key = self.head_name(server_adapter, t)
            if key in self.heads and self.heads[key].out_features == n:
                continue
            head = nn.Linear(template.in_features, n, device=template.weight.device, dtype=template.weight.dtype)
            if n == template.out_features:
                head.load_state_dict(template.state_dict())
            else:
                nn.init.normal_(head.weight, std=float(getattr(self.model.config, "initializer_range", 0.02)))
                nn.init.zeros_(head.bias)
            self.heads[key] = head.requires_grad_(True)

    def head_of(self, task_id: int) -> int:
        """The head id of task ``task_id``: itself, or the first task sharing its head (``configure_tasks(heads=)``)."""
        return task_id if self.task_heads is None or task_id >= len(self.task_heads) else self.task_heads[task_id]

    def heads_of(self, server_adapter: str) -> dict[int, nn.Module]:
        """Head id → head owned by ``server_adapter`` (the head id is a task id; see :meth:`head_of`)."""
        prefix = f"{server_adapter}__task"
        return {int(k[len(prefix) :]): m for k, m in self.heads.items() if k.startswith(prefix)}

    def server_parameters(self, name: str) -> list[nn.Parameter]:
        params = self.bank.parameters(name)
        for head in self.heads_of(name).values():
            params += list(head.parameters())
        return params

    def adapter_state(self, name: str, heads: bool = True) -> dict[str, torch.Tensor]:
        """Copy of adapter ``name``: LoRA factors plus, unless ``heads=False``, its task heads (``head.task<t>.*``)."""
        state = self.bank.state(name)
        if heads:
            for t, head in self.heads_of(name).items():
                state.update({f"head.task{t}.{k}": v.detach().clone() for k, v in head.state_dict().items()})
        return state

    def head_state(self, name: str, task_id: int) -> dict[str, torch.Tensor]:
        """Copy of the task head ``task_id`` of server adapter ``name`` (empty for causal LMs)."""
        head = self.heads_of(name).get(self.head_of(task_id))
        return {} if head is None else {k: v.detach().clone() for k, v in head.state_dict().items()}

    @torch.no_grad()
    def load_adapter_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`adapter_state` returned into adapter ``name`` (in place; heads only where present)."""
        lora = {k: v for k, v in state.items() if not k.startswith("head.")}
        if lora or not state:
            self.bank.load_state(name, lora)
        for t, head in self.heads_of(name).items():
            prefix = f"head.task{t}."
            part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if part:
                head.load_state_dict(part)

    def activate(self, client_adapter: str | None, server_adapter: str | None) -> None:
        """Make the client's and the server's adapters active; the server adapter only from the client's cut on."""
        names = [n for n in (client_adapter, server_adapter) if n is not None]
        cut = self.cut_of(client_adapter)
        if cut == self.cut_layer or server_adapter is None:
            self.bank.activate(names)
            return
        prefix = f"{self.arch.blocks_path}."
        before = {m for m in self.bank.ranks.get(server_adapter, {}) if int(m[len(prefix) :].split(".")[0]) < cut}
        self.bank.activate(names, skip={server_adapter: before})

    # ----------------------------------------------------------------------------------------- forward halves
    def client_forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cut_layer: int | None = None
    ) -> torch.Tensor:
        """Embeddings + blocks ``[0, cut_layer)``: the activations ``h`` sent over the cut."""
        hidden = self.arch.embed(self.model, input_ids)
        ctx = self.arch.context(self.model, hidden, attention_mask)
        blocks: Any = self.model.get_submodule(self.arch.blocks_path)
        for block in blocks[: cut_layer or self.cut_layer]:
            hidden = self.arch.run_block(block, hidden, ctx)
        return hidden

    def server_hidden(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, cut_layer: int | None = None
    ) -> torch.Tensor:
        """Blocks ``[cut_layer, L)`` + final norm."""
        ctx = self.arch.context(self.model, hidden, attention_mask)
        blocks: Any = self.model.get_submodule(self.arch.blocks_path)
        for block in blocks[cut_layer or self.cut_layer :]:
            hidden = self.arch.run_block(block, hidden, ctx)
        norm = get_submodule(self.model, self.arch.final_norm_path)
        return hidden if norm is None else norm(hidden)

    @contextmanager
    def objective_of(self, objective: Objective) -> Iterator[None]:
        """Compute the server loss with ``objective`` inside the block (``contrast`` for task signals)."""
        previous, self.objective = self.objective, objective
        try:
            yield
        finally:
            self.objective = previous

    def _loss(self, logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, gold) if self.objective == "cross_entropy" else contrast_loss(logits, gold)

    def server_forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        server_adapter: str | None = None,
        task_id: int = 0,
        cut_layer: int | None = None,
    ) -> ServerOutput:
        """Server half (from block ``cut_layer``), head and loss.

        Causal LMs: ``labels`` are aligned with the input (``-100`` = ignore); logits are computed only at the shifted
        answer positions, never over the vocabulary at every position. Classifiers: ``labels`` is ``[batch]`` and the
        head of task ``task_id`` owned by ``server_adapter`` scores it.
        """
        hidden = self.server_hidden(hidden, attention_mask, cut_layer)
        return self.head_forward(hidden, attention_mask, labels, server_adapter, task_id)

    def head_forward(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        server_adapter: str | None = None,
        task_id: int = 0,
    ) -> ServerOutput:
        """Head and loss on the last hidden states: the server's in a two-part split, the client's in a U-shaped one."""
        if self.task == "classification":
            return self._classify(hidden, attention_mask, labels, server_adapter, task_id)
        return self._lm_loss(hidden, labels)

    def _lm_loss(self, hidden: torch.Tensor, labels: torch.Tensor) -> ServerOutput:
        targets = labels[:, 1:]
        selected = targets != -100
        if not bool(selected.any()):
            raise ValueError(
                "batch has no answer tokens (all labels are -100); check the prompt template and "
                "max_length so the answer is not truncated"
            )
        head = get_submodule(self.model, self.arch.head_path)
        logits = head(hidden[:, :-1][selected]).float()
        gold = targets[selected]
        loss = self._loss(logits, gold)
        hits = logits.argmax(-1) == gold
        rows = selected.nonzero()[:, 0]
        first = torch.ones_like(rows, dtype=torch.bool)
        first[1:] = rows[1:] != rows[:-1]  # the first answer token of each example (the label word)
        correct = torch.zeros(labels.shape[0], dtype=torch.bool, device=labels.device)
        correct[rows[first]] = hits[first]
        first_logits = logits.new_full((labels.shape[0], logits.shape[-1]), float("-inf"))
        first_logits[rows[first]] = logits[first].detach()
        return ServerOutput(loss=loss, correct=correct, num_targets=int(gold.numel()), first_logits=first_logits)

    def _classify(
        self,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        server_adapter: str | None,
        task_id: int,
    ) -> ServerOutput:
        pooled = pool(hidden, attention_mask, self.pooling, self._pooler(self.model))
        pooled = get_submodule(self.model, self.arch.extra["dropout"])(pooled)
        head = get_submodule(self.model, self.arch.head_path)
        if server_adapter is not None:
            heads = self.heads_of(server_adapter)
            key = self.head_of(task_id)
            if heads and key not in heads:
                raise ValueError(
                    f"server adapter {server_adapter!r} has no head for task {task_id} (it has {sorted(heads)}); "
                    "call `configure_tasks` with every task's number of labels"
                )
            head = heads.get(key, head)
        logits = head(pooled).float()
        loss = self._loss(logits, labels)
        pred = logits.argmax(-1)
        return ServerOutput(loss=loss, correct=pred == labels, num_targets=int(labels.numel()), pred=pred)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        client_adapter: str | None = None,
        server_adapter: str | None = None,
        task_id: int = 0,
    ) -> ServerOutput:
        """Both halves in one call (evaluation, and the monolithic reference of a split step)."""
        self.activate(client_adapter, server_adapter)
        cut = self.cut_of(client_adapter)
        hidden = self.client_forward(input_ids, attention_mask, cut)
        return self.server_forward(hidden, attention_mask, labels, server_adapter, task_id, cut)
