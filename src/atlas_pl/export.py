"""Export trained split adapters to the standard PEFT folder format, one folder per cluster (or per client).

A client of a federation runs the model with two LoRA adapters: its client adapter on blocks ``[0, cut)`` and a
server adapter on blocks ``[cut, L)``. Export joins the two halves into **one** LoRA adapter over the whole model and
writes it with peft's own API (``LoraConfig`` + ``get_peft_model`` + ``set_peft_model_state_dict`` +
``save_pretrained``): ``adapter_config.json`` and ``adapter_model.safetensors``, loadable with
``PeftModel.from_pretrained(base_model, folder)``. Heterogeneous ranks are kept exactly through ``rank_pattern`` and the
update scaling of every module through ``alpha_pattern`` (``alpha_m = scaling_m * r_m``). Encoders also get their task
heads in ``heads.safetensors`` (``task<t>.weight`` / ``task<t>.bias``). Each folder holds a short ``README.md``.

A cluster's folder holds the client half of the member with the largest client adapter (total rank over modules; the
lowest client index on a tie): after exact aggregation every member holds the cluster's merged update truncated to
its own ranks, so the largest one is the most faithful. With ``aggregation: none`` members differ; export per client.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from atlas_pl.io import FILE_MODE
from atlas_pl.split.backbone import SplitBackbone

if TYPE_CHECKING:
    from atlas_pl.federation import Federation

HEADS_FILE = "heads.safetensors"
POOLING_CODE = {
    "mean": "mask = attention_mask.unsqueeze(-1).float()\n"
    "pooled = (encoder.last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1.0)",
    "cls": "pooled = encoder.last_hidden_state[:, 0]",
    "pooler": "pooled = encoder.pooler_output",
}
"""How a README computes the heads' input for each pooling mode of ``SplitBackbone.pooling``."""


@dataclass
class JoinedAdapter:
    """One LoRA adapter over the whole model, joined from a client half and a server half.

    Attributes:
        config: The peft config (per-module ranks in ``rank_pattern``, scalings in ``alpha_pattern``).
        state: peft state dict without adapter name (``base_model.model.<module>.lora_A.weight``, ...).
        cut_layer: Blocks ``[0, cut_layer)`` carry the client half, the rest the server half.
    """

    config: LoraConfig
    state: dict[str, torch.Tensor]
    cut_layer: int


def _block_index(backbone: SplitBackbone, module: str) -> int:
    return int(module[len(backbone.arch.blocks_path) + 1 :].split(".")[0])


def join_adapters(backbone: SplitBackbone, client_adapter: str, server_adapter: str) -> JoinedAdapter:
    """The client adapter on its client's blocks plus the server adapter from that client's cut on, as one adapter.

    The server adapter's modules below a later client cut are left out, exactly as the split model skips them.

    Raises:
        KeyError: An adapter name the backbone does not hold.
    """
    bank = backbone.bank
    for name in (client_adapter, server_adapter):
        if name not in bank.ranks:
            raise KeyError(f"unknown adapter {name!r}; the backbone holds {bank.names[:8]}...")
    cut = backbone.cut_of(client_adapter)
    factors = dict(bank.factors(client_adapter))
    factors.update({m: f for m, f in bank.factors(server_adapter).items() if _block_index(backbone, m) >= cut})
    ranks = {m: int(a.shape[0]) for m, (a, _, _) in factors.items()}
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    scaling = Counter(s for _, _, s in factors.values()).most_common(1)[0][0]
    config = LoraConfig(
        r=default_rank,
        lora_alpha=scaling * default_rank,  # type: ignore[arg-type]  # peft annotates int, accepts float
        lora_dropout=backbone.lora.dropout,
        target_modules=sorted(factors),
        fan_in_fan_out=backbone.arch.fan_in_fan_out,
        rank_pattern={m: r for m, r in ranks.items() if r != default_rank},
        alpha_pattern={m: s * ranks[m] for m, (_, _, s) in factors.items() if (s, ranks[m]) != (scaling, default_rank)},
        task_type="CAUSAL_LM" if backbone.task == "causal_lm" else None,
    )
    state: dict[str, torch.Tensor] = {}
    for module, (a, b, _) in factors.items():
        state[f"base_model.model.{module}.lora_A.weight"] = a.detach().clone()
        state[f"base_model.model.{module}.lora_B.weight"] = b.detach().clone()
    return JoinedAdapter(config, state, cut)


def save_peft_adapter(model: nn.Module, adapter: JoinedAdapter, folder: str | os.PathLike) -> None:
    """Write ``adapter`` with peft's ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``).

    The adapter is put on a copy of ``model``'s architecture built on the meta device, where only the adapted modules
    get (uninitialized) memory, so no second copy of the base weights is allocated or initialized.

    Raises:
        ValueError: peft did not take every tensor of the adapter (a module name or shape mismatch).
    """
    config = copy.deepcopy(model.config)
    with torch.device("meta"):
        skeleton = type(model)(config)
    for name in adapter.config.target_modules or []:
        skeleton.get_submodule(name).to_empty(device="cpu")  # LoRA layers are created on their base layer's device
    peft_model = get_peft_model(skeleton, copy.deepcopy(adapter.config))
    result: Any = set_peft_model_state_dict(peft_model, adapter.state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"exported adapter does not fit the model: missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]}; the checkpoint and the model config disagree"
        )
    peft_model.save_pretrained(str(folder))


def save_heads(
    heads: dict[int, nn.Module], task_names: dict[int, str], folder: str | os.PathLike, pooling: str = "mean"
) -> None:
    """Write task heads as ``task<t>.weight`` / ``task<t>.bias`` in ``heads.safetensors``.

    The metadata holds ``task_names`` (JSON: task id → name) and ``pooling`` (how the heads' input is pooled from the
    last hidden states: ``mean``, ``cls`` or ``pooler``).
    """
    tensors = {
        f"task{t}.{k}": v.detach().contiguous().clone() for t, h in heads.items() for k, v in h.named_parameters()
    }
    names = {str(t): task_names.get(t, f"task{t}") for t in heads}
    metadata = {"task_names": json.dumps(names), "pooling": pooling}
    save_file(tensors, str(Path(folder) / HEADS_FILE), metadata=metadata)


def representative(federation: Federation, members: Sequence[int]) -> int:
    """Member whose client adapter has the largest total rank (the lowest index on a tie)."""
    ranks = federation.backbone.bank.ranks
    return max(members, key=lambda i: (sum(ranks[federation.clients[i].client_adapter].values()), -i))


def export_peft(federation: Federation, output_dir: str | os.PathLike, per_client: bool = False) -> list[Path]:
    """Write one PEFT folder per cluster (``cluster_<k>``) and, with ``per_client``, per client (``client_<i>``).

    Each folder is written to a temporary folder beside it and renamed into place, so an interrupted export never
    leaves a half-written adapter.

    Args:
        federation: A federation with trained (or checkpoint-loaded) adapters.
        output_dir: Parent folder of the exported folders (created if missing).
        per_client: Also export every client's own adapter pair.

    Returns:
        The written folders.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = list(federation.cluster_ids)
    written = []
    for k in sorted(set(ids)):
        members = [i for i, c in enumerate(ids) if c == k]
        written.append(_export_one(federation, representative(federation, members), members, out / f"cluster_{k}"))
    if per_client:
        for i in range(federation.num_clients):
            written.append(_export_one(federation, i, [i], out / f"client_{i:03d}"))
    return written


def _export_one(federation: Federation, rep: int, members: list[int], folder: Path) -> Path:
    backbone = federation.backbone
    client = federation.clients[rep]
    adapter = join_adapters(backbone, client.client_adapter, client.server_adapter)
    task_ids = sorted({federation.client_task_ids[i] for i in members})
    names = list(getattr(federation, "task_names", []) or [])
    task_names = {t: names[t] if t < len(names) else f"task{t}" for t in task_ids}
    owned = backbone.heads_of(client.server_adapter)  # by head id; tasks sharing a head export it under each name
    heads = {t: owned[backbone.head_of(t)] for t in task_ids if backbone.head_of(t) in owned}
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    try:
        save_peft_adapter(backbone.model, adapter, tmp)
        if heads:
            save_heads(heads, task_names, tmp, backbone.pooling)
        (tmp / "README.md").write_text(_readme(federation, rep, members, adapter, task_names, bool(heads)))
        os.chmod(tmp, FILE_MODE | 0o111)  # mkdtemp and safetensors create owner-only entries; use the umask instead
        for path in tmp.iterdir():
            os.chmod(path, FILE_MODE)
        _replace_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, replacing an existing ``dst`` (the old folder is removed only after the rename)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _readme(
    federation: Federation,
    rep: int,
    members: list[int],
    adapter: JoinedAdapter,
    task_names: dict[int, str],
    has_heads: bool,
) -> str:
    hp: Any = federation.hparams
    backbone = federation.backbone
    client = federation.clients[rep]
    pattern = adapter.config.rank_pattern or {}
    ranks = [pattern.get(m, adapter.config.r) for m in adapter.config.target_modules or []]
    loader = "AutoModelForCausalLM" if backbone.task == "causal_lm" else "AutoModelForSequenceClassification"
    title = f"cluster {federation.cluster_ids[rep]}" if len(members) > 1 else f"client {rep}"
    lines = [
        f"# atlas-pl adapter: {title}",
        "",
        f"One LoRA adapter (PEFT format) over the whole `{hp.get('model')}` model: the client half (blocks "
        f"0-{adapter.cut_layer - 1}, adapter `{client.client_adapter}` of client {rep}) and the server half (blocks "
        f"{adapter.cut_layer}-{backbone.num_layers - 1}, adapter `{client.server_adapter}`) joined. Ranks per module "
        f"range {min(ranks)}-{max(ranks)} (`rank_pattern` in `adapter_config.json`; `alpha_pattern` keeps each "
        "module's scaling).",
        "",
        f"Clients: {members}. Tasks: {', '.join(task_names.values())}.",
        "",
        "The base model must hold exactly the weights the federation was trained on (config-built models such as "
        "`gpt2-tiny` have random weights: save them with the federation to reuse this adapter).",
        "",
        "```python",
        f"from transformers import {loader}",
        "from peft import PeftModel",
        "",
        f"base = {loader}.from_pretrained(BASE_MODEL)",
        "model = PeftModel.from_pretrained(base, FOLDER).eval()",
        "```",
    ]
    if has_heads:
        lines += [
            "",
            f"Task heads are in `{HEADS_FILE}` (`task<t>.weight`, `task<t>.bias`; task names and the pooling in its "
            f"metadata). The federation scores a task with its head on the `{backbone.pooling}`-pooled last hidden "
            "states (dropout is off in evaluation):",
            "",
            "```python",
            "from safetensors.torch import load_file",
            "",
            f"heads = load_file(FOLDER + '/{HEADS_FILE}')",
            "encoder = model.base_model.model.bert(input_ids, attention_mask=attention_mask)",
            POOLING_CODE[backbone.pooling],
            "logits = pooled @ heads['task0.weight'].T + heads['task0.bias']",
            "```",
        ]
    return "\n".join(lines) + "\n"
