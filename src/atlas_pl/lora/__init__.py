"""LoRA adapters on one shared backbone: many named peft adapters, per-module ranks."""

from atlas_pl.lora.adapters import AdapterBank, LoraSpec, validate_rank

__all__ = ["AdapterBank", "LoraSpec", "validate_rank"]
