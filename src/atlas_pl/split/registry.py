"""Architecture registry: where each model family keeps its embeddings, blocks, final norm, head and LoRA targets.

Split learning needs to run a model in two pieces. Instead of wrapping each family's ``forward``, the registry names the
pieces and knows how to call one block, so ``client half = embed + blocks[:cut]`` and
``server half = blocks[cut:] + norm + head`` compute exactly what the monolithic model computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.masking_utils import create_bidirectional_mask, create_causal_mask

TaskKind = Literal["causal_lm", "classification"]


class EmbedFn(Protocol):
    """``(model, input_ids, position_ids=None) -> hidden``: token (and, for GPT-2, position) embeddings.

    ``position_ids`` (``[B, T]``) default to ``0 .. T-1``; generation passes the real positions of left-padded rows
    and of tokens decoded after a cached prefix.
    """

    def __call__(
        self, model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None
    ) -> torch.Tensor: ...


class ContextFn(Protocol):
    """``(model, hidden, attention_mask, ...) -> kwargs`` passed to every block of one half (masks, positions).

    Without the keyword arguments this is the training context: positions ``0 .. T-1``, no cache. Incremental decoding
    passes ``position_ids`` (``[B, T]``), a ``cache`` holding the keys/values of the tokens seen so far, an
    ``attention_mask`` over those tokens plus the ``T`` new ones, and ``first_block``: the index of the first block the
    context is used with (the cache layer the mask is sized against; the server half's blocks start at the cut).
    """

    def __call__(
        self,
        model: Any,
        hidden: torch.Tensor,
        attention_mask: torch.Tensor,
        *,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        first_block: int = 0,
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ArchSpec:
    """How to take one model family apart.

    Attributes:
        name: Family name (``"gpt2"``, ``"llama"``, ``"bert"``).
        model_types: ``config.model_type`` values handled by this spec.
        task: ``"causal_lm"`` (LM head over answer tokens) or ``"classification"`` (pooled head).
        blocks_path: Dotted path of the ``nn.ModuleList`` of transformer blocks.
        default_targets: LoRA target module suffixes inside one block.
        all_targets: Every linear suffix in a block that LoRA may target.
        fan_in_fan_out: ``True`` for HF ``Conv1D`` (GPT-2).
        embed: ``(model, input_ids, position_ids=None) -> hidden`` (see :class:`EmbedFn`).
        context: ``(model, hidden, attention_mask, *, position_ids=None, cache=None, first_block=0) -> kwargs``
            passed to every block (masks, positions, and the KV cache when decoding; see :class:`ContextFn`).
        run_block: ``(block, hidden, kwargs) -> hidden``; a ``"cache"`` entry in the kwargs makes the block read and
            append its keys/values there.
        final_norm_path: Dotted path of the final norm, or ``None``.
        head_path: Dotted path of the output head (LM head or classifier).
    """

    name: str
    model_types: tuple[str, ...]
    task: TaskKind
    blocks_path: str
    default_targets: tuple[str, ...]
    all_targets: tuple[str, ...]
    fan_in_fan_out: bool
    embed: EmbedFn
    context: ContextFn
    run_block: Callable[[Any, torch.Tensor, dict[str, Any]], torch.Tensor]
    final_norm_path: str | None
    head_path: str
    extra: dict[str, str] = field(default_factory=dict)


def get_submodule(model: nn.Module, path: str | None) -> Any:
    """Return ``model.<path>`` or ``None`` when ``path`` is ``None``."""
    return None if path is None else model.get_submodule(path)


def _positions(hidden: torch.Tensor) -> torch.Tensor:
    return torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)


# --- GPT-2 -------------------------------------------------------------------------------------------------------
def _gpt2_embed(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    t = model.transformer
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    return t.drop(t.wte(input_ids) + t.wpe(position_ids))


def _causal_context(
    model: Any,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    cache: Cache | None = None,
    first_block: int = 0,
) -> dict[str, Any]:
    positions = _positions(hidden) if position_ids is None else position_ids
    # `create_causal_mask` sizes the mask against one cache layer (by default layer 0). A half's blocks have not yet
    # appended this step's keys/values when its context is built, but the server half's context is built after the
    # client's blocks ran: size it against the half's own first block.
    at_layer = {} if cache is None else {"layer_idx": first_block}
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=cache,
                              position_ids=positions, **at_layer)  # fmt: skip
    ctx = {"attention_mask": mask, "position_ids": positions}
    return ctx if cache is None else {**ctx, "cache": cache}


def _cache_kwargs(ctx: dict[str, Any]) -> dict[str, Any]:
    """The block arguments that make it read and append its keys/values in the context's cache (none without one)."""
    return {} if ctx.get("cache") is None else {"cache": ctx["cache"], "use_cache": True}


def _gpt2_block(block: Any, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
    cache = ctx.get("cache")
    extra = {} if cache is None else {"use_cache": True}
    return block(hidden, cache, ctx["attention_mask"], position_ids=ctx["position_ids"], **extra)


# --- LLaMA family ---------------------------------------------------------------------------------------------
def _llama_embed(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    return model.model.embed_tokens(input_ids)  # positions enter through the rotary embeddings (the context)


def _llama_context(model: Any, hidden: torch.Tensor, attention_mask: torch.Tensor, **cached: Any) -> dict[str, Any]:
    ctx = _causal_context(model, hidden, attention_mask, **cached)
    ctx["position_embeddings"] = model.model.rotary_emb(hidden, position_ids=ctx["position_ids"])
    return ctx


def _llama_block(block: Any, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
    return block(
        hidden,
        attention_mask=ctx["attention_mask"],
        position_embeddings=ctx["position_embeddings"],
        position_ids=ctx["position_ids"],
        **_cache_kwargs(ctx),
    )


# --- BERT family ----------------------------------------------------------------------------------------------
def _bert_embed(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    return model.bert.embeddings(input_ids=input_ids, position_ids=position_ids)


def _bert_context(
    model: Any,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    cache: Cache | None = None,
    first_block: int = 0,
) -> dict[str, Any]:
    if cache is not None:
        raise ValueError("BERT is an encoder: it has no KV cache and does not generate; use a causal LM (GPT-2, LLaMA)")
    mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden, attention_mask=attention_mask)
    return {"attention_mask": mask}


def _bert_block(block: Any, hidden: torch.Tensor, ctx: dict[str, Any]) -> torch.Tensor:
    return block(hidden, attention_mask=ctx["attention_mask"])


_LLAMA_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec(
        name="gpt2",
        model_types=("gpt2",),
        task="causal_lm",
        blocks_path="transformer.h",
        default_targets=("attn.c_attn", "attn.c_proj"),
        all_targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
        fan_in_fan_out=True,
        embed=_gpt2_embed,
        context=_causal_context,
        run_block=_gpt2_block,
        final_norm_path="transformer.ln_f",
        head_path="lm_head",
    ),
    "llama": ArchSpec(
        name="llama",
        model_types=("llama", "qwen2", "mistral"),
        task="causal_lm",
        blocks_path="model.layers",
        default_targets=("self_attn.q_proj", "self_attn.v_proj"),
        all_targets=_LLAMA_TARGETS,
        fan_in_fan_out=False,
        embed=_llama_embed,
        context=_llama_context,
        run_block=_llama_block,
        final_norm_path="model.norm",
        head_path="lm_head",
    ),
    "bert": ArchSpec(
        name="bert",
        model_types=("bert",),
        task="classification",
        blocks_path="bert.encoder.layer",
        default_targets=("attention.self.query", "attention.self.value"),
        all_targets=(
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ),
        fan_in_fan_out=False,
        embed=_bert_embed,
        context=_bert_context,
        run_block=_bert_block,
        final_norm_path=None,
        head_path="classifier",
        extra={"pooler": "bert.pooler", "dropout": "dropout"},
    ),
}


def get_arch(model: nn.Module) -> ArchSpec:
    """Find the registry entry for a Hugging Face model.

    Raises:
        ValueError: The model's ``config.model_type`` is not in the registry, or the model lacks the expected head.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for spec in ARCHITECTURES.values():
        if model_type in spec.model_types:
            try:
                model.get_submodule(spec.blocks_path)
                model.get_submodule(spec.head_path)
            except AttributeError as err:
                loader = "AutoModelForCausalLM" if spec.task == "causal_lm" else "AutoModelForSequenceClassification"
                raise ValueError(
                    f"model of type {model_type!r} ({type(model).__name__}) lacks `{spec.blocks_path}` or "
                    f"`{spec.head_path}`: load it with its head ({loader})"
                ) from err
            return spec
    supported = sorted(t for s in ARCHITECTURES.values() for t in s.model_types)
    raise ValueError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}); supported model types: {supported}. "
        "Add an `ArchSpec` to `atlas_pl.split.registry.ARCHITECTURES` to support it."
    )


def num_blocks(model: Any, arch: ArchSpec) -> int:
    """Number of transformer blocks of ``model``."""
    return len(model.get_submodule(arch.blocks_path))


def validate_cut_layer(cut_layer: int, n_blocks: int) -> None:
    """Check ``1 <= cut_layer <= n_blocks - 1``.

    Raises:
        ValueError: The cut leaves one side without a block.
    """
    if isinstance(cut_layer, bool) or not isinstance(cut_layer, int) or not 1 <= cut_layer <= n_blocks - 1:
        raise ValueError(
            f"`cut_layer` must be an int in [1, {n_blocks - 1}] for a model with {n_blocks} blocks "
            f"(the client keeps blocks [0, cut_layer)), got {cut_layer!r}"
        )


def block_module_names(arch: ArchSpec, targets: tuple[str, ...] | list[str], layers: range) -> list[str]:
    """Full module names of ``targets`` inside the given block indices (peft ``target_modules`` entries)."""
    return [f"{arch.blocks_path}.{i}.{t}" for i in layers for t in targets]
