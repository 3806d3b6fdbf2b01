"""The client memory model: what one split-learning client holds at its peak, and the memory-size helpers.

Peak client memory (DESIGN.md, "Memory model") is the sum of

* the frozen client-half weights in their dtype: embeddings + blocks ``[0, cut_layer)``;
* the LoRA parameters of those blocks, their gradients and the AdamW state (two moments and a step counter each);
* the activations autograd keeps for backward in blocks ``[0, cut_layer)`` (counted per block from the op sequence of
  the Hugging Face implementation, see :func:`block_stages`);
* the backward workspace: the largest set of temporaries alive while the last client block backpropagates, minus what
  that block has already released;
* the buffers sent and received over the cut: ``h`` and ``∂L/∂h`` (``batch × seq_len × hidden`` each).

Everything is derived from a :class:`ModelShape` (read off a Hugging Face config), so no weights are loaded.
``benchmarks/memory_model.py`` checks the estimate against measured peaks.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = [
    "Arch",
    "DTYPE_BYTES",
    "Device",
    "MemoryEstimate",
    "ModelShape",
    "Stage",
    "block_stages",
    "client_ranks",
    "dtype_bytes",
    "estimate_client_memory",
    "format_size",
    "parse_size",
    "peak_backward_extra",
]

Arch = Literal["gpt2", "llama", "bert"]
Device = Literal["cpu", "cuda"]
DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30})
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(size: int | float | str) -> int:
    """Bytes of a memory size: an int of bytes, or a string such as ``"1GB"``, ``"512MiB"``, ``"8 GB"``.

    Decimal units (``KB``, ``MB``, ``GB``, ``TB``) are powers of 1000, binary units (``KiB``, ``MiB``, ``GiB``,
    ``TiB``, and the short ``K``, ``M``, ``G``) powers of 1024; case is ignored.

    Raises:
        ValueError: The value is negative, not a number, or has an unknown unit.
    """
    if isinstance(size, bool):
        raise ValueError(f"memory size must be bytes (int) or a string like '8GB' or '512MiB', got {size!r}")
    if isinstance(size, int | float):
        if size < 0 or not math.isfinite(size):
            raise ValueError(f"memory size must be a finite number of bytes >= 0, got {size!r}")
        return int(size)
    match = _SIZE.match(str(size))
    unit = match.group(2).upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"cannot parse memory size {size!r}: use bytes (an int) or a number with a unit in "
            "B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024), e.g. '8GB' or '512MiB'"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(num_bytes: float) -> str:
    """``1536 -> '1.50 KiB'`` (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(num_bytes) < 1024 or unit == "GiB":
            return f"{num_bytes:.0f} B" if unit == "B" else f"{num_bytes:.2f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.2f} GiB"  # pragma: no cover


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype given as a name (``"bfloat16"``) or a ``torch.dtype``."""
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPE_BYTES)} (or the torch dtype), got {dtype!r}")
    return DTYPE_BYTES[name]


# ------------------------------------------------------------------------------------------------- shapes
@dataclass(frozen=True)
class ModelShape:
    """The sizes of a transformer the memory model needs (no weights).

    Attributes:
        arch: Registry family (``"gpt2"``, ``"llama"``, ``"bert"``).
        vocab_size, hidden_size, num_layers, num_heads, intermediate_size, max_positions: Config sizes.
        num_kv_heads: Key/value heads (grouped-query attention; ``num_heads`` otherwise).
        head_dim: Size of one head.
        tie_word_embeddings: Input embedding shared with the LM head (the client holds it either way).
        type_vocab_size: BERT token-type embeddings.
        attention_dropout: Dropout on attention probabilities while training.
        hidden_dropout: Dropout on residual branches while training.
        bias: Linear layers have biases.
    """

    arch: Arch
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 0
    num_kv_heads: int = 0
    head_dim: int = 0
    tie_word_embeddings: bool = True
    type_vocab_size: int = 0
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    bias: bool = True

    def __post_init__(self) -> None:
        if not self.num_kv_heads:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """Read the shape off a Hugging Face ``GPT2Config``, ``LlamaConfig`` (Qwen2, Mistral) or ``BertConfig``.

        Raises:
            ValueError: The config's ``model_type`` is not one of these families.
        """
        kind = getattr(config, "model_type", None)
        if kind == "gpt2":
            return cls._from_gpt2(config)
        if kind in ("llama", "qwen2", "mistral"):
            return cls._from_llama(config)
        if kind == "bert":
            return cls._from_bert(config)
        raise ValueError(f"`config.model_type` must be gpt2, llama, qwen2, mistral or bert, got {kind!r}")

    @classmethod
    def _from_gpt2(cls, c: Any) -> ModelShape:
        return cls(
            arch="gpt2", vocab_size=c.vocab_size, hidden_size=c.n_embd, num_layers=c.n_layer, num_heads=c.n_head,
            intermediate_size=c.n_inner or 4 * c.n_embd, max_positions=c.n_positions,
            tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", True)),
            attention_dropout=c.attn_pdrop, hidden_dropout=c.resid_pdrop,
        )  # fmt: skip

    @classmethod
    def _from_llama(cls, c: Any) -> ModelShape:
        return cls(
            arch="llama", vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
            max_positions=c.max_position_embeddings, num_kv_heads=c.num_key_value_heads or c.num_attention_heads,
            head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
            tie_word_embeddings=bool(c.tie_word_embeddings), attention_dropout=float(c.attention_dropout or 0.0),
            bias=bool(getattr(c, "attention_bias", False)),
        )  # fmt: skip

    @classmethod
    def _from_bert(cls, c: Any) -> ModelShape:
        return cls(
            arch="bert", vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_layers=c.num_hidden_layers,
            num_heads=c.num_attention_heads, intermediate_size=c.intermediate_size,
            max_positions=c.max_position_embeddings, tie_word_embeddings=False, type_vocab_size=c.type_vocab_size,
            attention_dropout=c.attention_probs_dropout_prob, hidden_dropout=c.hidden_dropout_prob,
        )  # fmt: skip

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def target_shapes(self) -> dict[str, tuple[int, int]]:
        """LoRA target suffix → ``(d_in, d_out)`` of the linear layer inside one block."""
        h, i, q, kv = self.hidden_size, self.intermediate_size, self.q_dim, self.kv_dim
        if self.arch == "gpt2":
            return {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.c_fc": (h, i), "mlp.c_proj": (i, h)}
        if self.arch == "llama":
            return {
                "self_attn.q_proj": (h, q), "self_attn.k_proj": (h, kv), "self_attn.v_proj": (h, kv),
                "self_attn.o_proj": (q, h), "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h),
            }  # fmt: skip
        return {
            "attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
            "attention.output.dense": (h, h), "intermediate.dense": (h, i), "output.dense": (i, h),
        }  # fmt: skip

    def embedding_params(self) -> int:
        """Parameter count of the embeddings (plus their small buffers, counted as parameters of 4-8 bytes)."""
        h = self.hidden_size
        if self.arch == "gpt2":
            return (self.vocab_size + self.max_positions) * h
        if self.arch == "llama":
            return self.vocab_size * h + self.head_dim  # + rotary inverse frequencies (two copies of head_dim / 2)
        return (self.vocab_size + self.max_positions + self.type_vocab_size) * h + 2 * h + 4 * self.max_positions

    def block_params(self) -> int:
        """Parameter count of one transformer block (linear weights and biases, norms)."""
        linear = sum(d_in * d_out + (d_out if self.bias else 0) for d_in, d_out in self.target_shapes().values())
        norms = {"gpt2": 4, "llama": 2, "bert": 4}[self.arch] * self.hidden_size
        return linear + norms


# ------------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Stage:
    """One step of a block's forward, per token: bytes autograd keeps for backward and bytes its backward needs.

    Attributes:
        component: Which part of :attr:`MemoryEstimate.activation_breakdown` the saved bytes belong to.
        saved_bytes: Bytes per token kept alive until this stage's backward runs.
        workspace_bytes: Bytes per token of temporaries alive during this stage's backward.
        trainable: The stage contains a LoRA module (in block 0, nothing before the first such stage is recorded:
            autograd only starts where the first trainable tensor enters).
    """

    component: str
    saved_bytes: float
    workspace_bytes: float = 0.0
    trainable: bool = False


@dataclass(frozen=True)
class _Ctx:
    shape: ModelShape
    ranks: dict[str, int]
    first_block: bool
    training: bool
    device: str
    seq_len: int
    act: int
    adapter: int
    lora_dropout: float

    @property
    def mask(self) -> int:
        return 1 if self.device == "cuda" else self.act  # CPU dropout keeps a mask in the input dtype

    def dropout(self, p: float) -> list[Stage]:
        h = self.shape.hidden_size
        return [Stage("dropout_masks", h * self.mask, h * self.act)] if self.training and p > 0 else []

    def lora(self, targets: tuple[str, ...], d_in: int, new_input: bool = True) -> list[Stage]:
        hit = [t for t in targets if t in self.ranks]
        if not hit:
            return []
        dropped = self.training and self.lora_dropout > 0
        x = d_in * (self.adapter + (self.mask if dropped else 0)) if (new_input or dropped) else 0
        d_out = sum(self.shape.target_shapes()[t][1] for t in hit)
        inner = sum(self.ranks[t] for t in hit) * self.adapter
        return [
            Stage("lora_inputs", x, (d_in + d_out) * self.act, trainable=True),
            Stage("lora_intermediates", inner),
        ]

    def norm(self, rms: bool = False) -> list[Stage]:
        h = self.shape.hidden_size
        saved = h * 4 + 4 if rms else h * self.act + 8  # HF RMSNorm computes in float32; LayerNorm keeps mean, rstd
        return [Stage("norms", saved, 2 * h * self.act)]

    def attention(self, q_name: str, k_name: str) -> list[Stage]:
        s, a = self.shape, self.act
        fused = self.device == "cuda" or not (self.training and s.attention_dropout > 0)
        if fused:  # flash / memory-efficient kernels keep q, k, v, the output and a log-sum-exp per head
            saved = (2 * s.q_dim + 2 * s.kv_dim) * a + 4 * s.num_heads
            return [Stage("attention", saved, (2 * s.q_dim + 2 * s.kv_dim) * a)]
        scores = s.num_heads * self.seq_len  # math path: softmax output, dropout mask, dropped probabilities
        a = 4 if self.device == "cpu" else a  # the CPU math path upcasts bf16/fp16 inputs to float32
        mask = 4 if self.device == "cpu" else self.mask
        qk = 2 * s.q_dim
        if self.first_block:
            qk = s.q_dim * ((k_name in self.ranks) + (q_name in self.ranks))
        saved = (qk + s.q_dim) * a + scores * (2 * a + mask)
        return [Stage("attention", saved, (3 * scores + 2 * s.q_dim) * a)]

    def attention_out(self, name: str) -> list[Stage]:
        fused = self.device == "cuda" or not (self.training and self.shape.attention_dropout > 0)
        return self.lora((name,), self.shape.q_dim, new_input=not fused)


def _gpt2_stages(c: _Ctx) -> list[Stage]:
    h, i, a, p = c.shape.hidden_size, c.shape.intermediate_size, c.act, c.shape.hidden_dropout
    gelu = [Stage("mlp", 4 * i * a, (2 * i + 4 * h) * a)]  # gelu_new: input, tanh, 1 + tanh, 0.5 x
    return [
        *c.norm(), *c.lora(("attn.c_attn",), h), *c.attention("attn.c_attn", "attn.c_attn"),
        *c.attention_out("attn.c_proj"), *c.dropout(p), *c.norm(), *c.lora(("mlp.c_fc",), h), *gelu,
        *c.lora(("mlp.c_proj",), i), *c.dropout(p),
    ]  # fmt: skip


def _llama_stages(c: _Ctx) -> list[Stage]:
    h, i, a = c.shape.hidden_size, c.shape.intermediate_size, c.act
    qkv = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    swiglu = [Stage("mlp", 3 * i * a, 3 * i * a)]  # gate output, up output, silu(gate)
    return [
        *c.norm(rms=True), *c.lora(qkv, h), *c.attention(qkv[0], qkv[1]), *c.attention_out("self_attn.o_proj"),
        *c.norm(rms=True), *c.lora(("mlp.gate_proj", "mlp.up_proj"), h), *swiglu, *c.lora(("mlp.down_proj",), i),
    ]  # fmt: skip


def _bert_stages(c: _Ctx) -> list[Stage]:
    h, i, a, p = c.shape.hidden_size, c.shape.intermediate_size, c.act, c.shape.hidden_dropout
    qkv = ("attention.self.query", "attention.self.key", "attention.self.value")
    gelu = [Stage("mlp", i * a, (2 * i + h) * a)]  # erf gelu keeps its input
    return [
        *c.lora(qkv, h), *c.attention(qkv[0], qkv[1]), *c.attention_out("attention.output.dense"), *c.dropout(p),
        *c.norm(), *c.lora(("intermediate.dense",), h), *gelu, *c.lora(("output.dense",), i), *c.dropout(p),
        *c.norm(),
    ]  # fmt: skip


_STAGES = {"gpt2": _gpt2_stages, "llama": _llama_stages, "bert": _bert_stages}
_FORWARD_TAIL = {"gpt2": lambda s: 0, "llama": lambda s: 0, "bert": lambda s: s.intermediate_size + s.hidden_size}
"""Temporaries alive at the end of the client forward beyond ``h`` (elements per token; BERT's ``BertLayer`` still
holds the intermediate output while its last LayerNorm runs)."""


def block_stages(shape: ModelShape, ranks: dict[str, int], first_block: bool = False, **settings: Any) -> list[Stage]:
    """The stages of one block's forward in order, with what each keeps for backward (per token).

    ``ranks`` maps the block's LoRA target suffixes to their ranks; ``settings`` are ``training``, ``device``,
    ``seq_len``, ``act`` (activation bytes), ``adapter`` (LoRA bytes) and ``lora_dropout``. In the first block the
    stages before the first LoRA module keep nothing (no tensor there requires grad).
    """
    stages = _STAGES[shape.arch](_Ctx(shape=shape, ranks=ranks, first_block=first_block, **settings))
    if first_block:
        first = next((k for k, st in enumerate(stages) if st.trainable), len(stages))
        stages = stages[first:]
    return stages


def peak_backward_extra(stages: list[Stage], forward_tail: float = 0.0) -> float:
    """Bytes per token above ``saved + h + ∂L/∂h`` at the step's peak.

    Backward of the last block runs its stages in reverse; when stage ``s`` runs, the stages after it have released
    what they kept, so the extra is ``max_s(workspace(s) - Σ_{t>s} saved(t))``; the end of the forward (``forward_tail``
    minus the not yet received ``∂L/∂h``) competes with it.
    """
    extra, released = forward_tail, 0.0
    for stage in reversed(stages):
        extra = max(extra, stage.workspace_bytes - released)
        released += stage.saved_bytes
    return max(extra, 0.0)


# ------------------------------------------------------------------------------------------------- estimates
@dataclass
class MemoryEstimate:
    """Estimated peak memory of one client's training step, by component (bytes).

    ``total`` is the sum of the component fields; ``activation_breakdown`` splits ``activations`` further.
    """

    weights: int
    lora_params: int
    lora_grads: int
    optimizer_state: int
    activations: int
    workspace: int
    cut_buffers: int
    activation_breakdown: dict[str, int] = field(default_factory=dict)

    @property
    def steady(self) -> int:
        """What stays allocated between steps: weights, adapter and optimizer state."""
        return self.weights + self.lora_params + self.optimizer_state

    @property
    def total(self) -> int:
        return self.steady + self.lora_grads + self.activations + self.workspace + self.cut_buffers

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "steady": self.steady, "total": self.total}


def client_ranks(
    shape: ModelShape, cut_layer: int, targets: tuple[str, ...], rank: int, rank_pattern: dict[str, int] | None
) -> list[dict[str, int]]:
    """Per client block ``[0, cut_layer)``: target suffix → LoRA rank (``rank_pattern`` keys are full names)."""
    pattern = rank_pattern or {}
    out = []
    for i in range(cut_layer):
        ranks = {}
        for t in targets:
            hits = [r for name, r in pattern.items() if name.endswith(f".{i}.{t}") or name == f"{i}.{t}"]
            ranks[t] = hits[0] if hits else rank
        out.append(ranks)
    return out


def estimate_client_memory(
    shape: ModelShape,
    cut_layer: int,
    batch_size: int,
    seq_len: int,
    rank: int = 8,
    rank_pattern: dict[str, int] | None = None,
    target_modules: tuple[str, ...] | list[str] | None = None,
    dtype: Any = "float32",
    adapter_dtype: Any = "float32",
    optimizer: Literal["adamw", "sgd"] = "adamw",
    training: bool = True,
    device: Device = "cuda",
    lora_dropout: float = 0.0,
) -> MemoryEstimate:
    """Peak memory of one client step: client forward, backward of ``∂L/∂h``, optimizer step.

    Args:
        shape: Model sizes (:meth:`ModelShape.from_config`).
        cut_layer: The client runs embeddings + blocks ``[0, cut_layer)``; in ``[1, num_layers]`` (``num_layers``: a
            client that runs every block, as under ``PeftClientMixin``; its final norm, head and loss are not counted).
        batch_size: Sequences per step.
        seq_len: Tokens per sequence.
        rank: LoRA rank of modules not in ``rank_pattern``.
        rank_pattern: Full module name (``transformer.h.0.attn.c_attn``) → rank, as in peft.
        target_modules: LoRA target suffixes inside a block (default: the registry's defaults for the family).
        dtype: Dtype of the frozen weights and the activations.
        adapter_dtype: Dtype of the LoRA factors (peft keeps them in float32 by default).
        optimizer: ``"adamw"`` (two moments + a step counter per tensor) or ``"sgd"`` (no state).
        training: Dropout active (train mode); eval mode saves no dropout masks.
        device: ``"cuda"`` (fused attention, 1-byte dropout masks) or ``"cpu"`` (attention with dropout falls back to
            the math path that keeps ``heads × T × T`` scores; dropout masks in the activation dtype).
        lora_dropout: Dropout on the LoRA input (keeps a mask and the dropped input).

    Raises:
        ValueError: Bad ``cut_layer``, sizes, ranks, dtype or optimizer.
    """
    _check_estimate_args(shape, cut_layer, batch_size, seq_len, rank, optimizer)
    from atlas_pl.split.registry import ARCHITECTURES

    targets = tuple(target_modules or ARCHITECTURES[shape.arch].default_targets)
    unknown = sorted(set(targets) - set(shape.target_shapes()))
    if unknown:
        raise ValueError(
            f"`target_modules` {unknown} are not {shape.arch} targets; choose in {list(shape.target_shapes())}"
        )
    ranks = client_ranks(shape, cut_layer, targets, rank, rank_pattern)
    act_b, ad_b = dtype_bytes(dtype), dtype_bytes(adapter_dtype)
    lora_numel = sum(r * sum(shape.target_shapes()[t]) for block in ranks for t, r in block.items())
    num_tensors = 2 * len(targets) * cut_layer
    opt_state = (2 * lora_numel * ad_b + 4 * num_tensors) if optimizer == "adamw" else 0
    tokens = batch_size * seq_len
    settings = dict(
        training=training, device=device, seq_len=seq_len, act=act_b, adapter=ad_b, lora_dropout=lora_dropout
    )
    breakdown: dict[str, float] = {}
    for i, block in enumerate(ranks):
        for stage in block_stages(shape, block, first_block=i == 0, **settings):  # type: ignore[arg-type]
            breakdown[stage.component] = breakdown.get(stage.component, 0.0) + stage.saved_bytes * tokens
    last = block_stages(shape, ranks[-1], first_block=cut_layer == 1, **settings)  # type: ignore[arg-type]
    return MemoryEstimate(
        weights=(shape.embedding_params() + cut_layer * shape.block_params()) * act_b,
        lora_params=lora_numel * ad_b,
        lora_grads=lora_numel * ad_b,
        optimizer_state=opt_state,
        activations=int(sum(breakdown.values())),
        workspace=int(
            peak_backward_extra(last, (_FORWARD_TAIL[shape.arch](shape) - shape.hidden_size) * act_b) * tokens
        ),
        cut_buffers=2 * tokens * shape.hidden_size * act_b,
        activation_breakdown={k: int(v) for k, v in breakdown.items()},
    )


def _check_estimate_args(shape: ModelShape, cut_layer: int, batch_size: int, seq_len: int, rank: int, opt: str) -> None:
    if isinstance(cut_layer, bool) or not isinstance(cut_layer, int) or not 1 <= cut_layer <= shape.num_layers:
        raise ValueError(f"`cut_layer` must be an int in [1, {shape.num_layers}], got {cut_layer!r}")
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    if opt not in ("adamw", "sgd"):
        raise ValueError(f"`optimizer` must be 'adamw' or 'sgd', got {opt!r}")
