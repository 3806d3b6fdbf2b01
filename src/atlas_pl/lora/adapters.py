"""Many named peft LoRA adapters on one frozen backbone.

Every client owns a named adapter (and the server one per client or per cluster); all of them live as peft LoRA
layers on the single shared base model, so memory grows by adapter weights only, never by a model copy. Activating a
client switches the active adapter names of every LoRA layer in O(number of layers).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import cast_adapter_dtype
from torch import nn


@dataclass
class LoraSpec:
    """LoRA hyper-parameters shared by the adapters of a federation.

    Args:
        rank: Default LoRA rank ``r`` (>= 1).
        alpha: LoRA ``alpha``; the update is scaled by ``alpha / r``.
        dropout: Dropout on the LoRA input.
        target_modules: Module suffixes inside a block to adapt (``None``: the architecture's default).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | None = None

    def __post_init__(self) -> None:
        validate_rank(self.rank, "rank")
        if self.alpha <= 0:
            raise ValueError(f"`alpha` must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout!r}")


def _keep_active(adapter_names: Any, inference_mode: bool = False) -> None:
    """Stand-in for a LoRA layer's ``set_adapter`` while ``AdapterBank`` adds an adapter (see there)."""


def _move_new_adapter(layer: Any, adapter_name: str, device: torch.device | None = None) -> None:
    """Move a just-created adapter to its base layer's device and dtype, without scanning the other adapters.

    The rules of peft's ``_move_adapter_to_device_of_base_layer`` for an adapter that is not on the meta device.
    """
    base_layer = layer.get_base_layer()
    if isinstance(base_layer, nn.MultiheadAttention):
        base_layer = base_layer.out_proj
    base_device, base_dtype = layer._get_base_layer_device_and_dtype(base_layer)
    target_device = device if device is not None else base_device
    if target_device is None:
        return
    target_dtype = (
        base_dtype if base_dtype is not None and (base_dtype.is_floating_point or base_dtype.is_complex) else None
    )
    for attribute in layer.adapter_layer_names + layer.other_param_names:
        holder = getattr(layer, attribute, None)
        if not isinstance(holder, (nn.ModuleDict, nn.ParameterDict, BufferDict)) or adapter_name not in holder:
            continue
        item = holder[adapter_name]
        item_dtype = getattr(item, "dtype", None)
        if target_dtype is not None and (item_dtype is None or item_dtype.is_floating_point or item_dtype.is_complex):
            holder[adapter_name] = item.to(target_device, dtype=target_dtype)
        else:
            holder[adapter_name] = item.to(target_device)


def _adapter_parameters(layer: Any, name: str) -> list[torch.nn.Parameter]:
    """The parameters of adapter ``name`` in one peft LoRA layer."""
    out: list[torch.nn.Parameter] = []
    for attribute in layer.adapter_layer_names:
        holder = getattr(layer, attribute)
        if name in holder:
            value = holder[name]
            out.extend([value] if isinstance(value, torch.nn.Parameter) else value.parameters())
    return out


def validate_rank(rank: object, name: str = "rank") -> None:
    """Raise a clear error unless ``rank`` is an int >= 1."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {rank!r}")


class AdapterBank:
    """Named LoRA adapters (peft) on one base model, with cheap activation and factor access.

    Args:
        model: The base Hugging Face model (weights are frozen in place).
        fan_in_fan_out: ``True`` when the targets are HF ``Conv1D`` (GPT-2).
    """

    def __init__(self, model: nn.Module, fan_in_fan_out: bool = False) -> None:
        self.base = model
        self.fan_in_fan_out = fan_in_fan_out
        self.peft_model: PeftModel | None = None
        self._layers: list[tuple[str, Any]] = []
        self.ranks: dict[str, dict[str, int]] = {}

    @property
    def names(self) -> list[str]:
        return list(self.ranks)

    def add(
        self,
        name: str,
        module_names: list[str],
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rank_pattern: dict[str, int] | None = None,
    ) -> None:
        """Add adapter ``name`` on ``module_names`` (full names) with default ``rank`` and optional per-module ranks.

        Raises:
            ValueError: ``name`` exists already, a rank is < 1, or no module matches.
        """
        if name in self.ranks:
            raise ValueError(f"adapter {name!r} exists already; pick another name or delete it first")
        validate_rank(rank)
        for module, r in (rank_pattern or {}).items():
            validate_rank(r, f"rank_pattern[{module!r}]")
        config = LoraConfig(
            r=rank,
            lora_alpha=alpha,  # type: ignore[arg-type]  # peft annotates int, accepts float
            lora_dropout=dropout,
            target_modules=list(module_names),
            fan_in_fan_out=self.fan_in_fan_out,
            rank_pattern=dict(rank_pattern or {}),
            alpha_pattern={m: alpha * r / rank for m, r in (rank_pattern or {}).items()},
        )
        # peft's whole-model path may create LoRA layers and freezes inactive adapters; the layer-wise one does neither
        whole_model = True
        if self.peft_model is None:
            self.peft_model = get_peft_model(self.base, config, adapter_name=name)
        elif self._add_on_existing_layers(name, config, module_names):
            whole_model = False
        else:
            self.peft_model.add_adapter(name, config)
        if whole_model:
            self._layers = [(n, m) for n, m in self.base.named_modules() if isinstance(m, LoraLayer)]
        self.ranks[name] = {n: int(m.r[name]) for n, m in self._layers if name in m.lora_A}
        unexpected = set(self.ranks[name]) ^ set(module_names)
        if unexpected:
            raise ValueError(
                f"adapter {name!r} should cover exactly {len(module_names)} modules, but differs on "
                f"{sorted(unexpected)[:3]}; check `target_modules`"
            )
        if whole_model:
            self._keep_trainable(set(module_names))

    def _add_on_existing_layers(self, name: str, config: LoraConfig, module_names: list[str]) -> bool:
        """Add ``name`` where every target is a LoRA layer already: peft's own per-module step, in model order.

        ``PeftModel.add_adapter`` walks every module of the model several times (matching targets, marking
        trainable parameters, casting dtypes, checking tied weights), and each LoRA layer holds one module per
        adapter, so the ``N``-th adapter costs ``O(N)`` walks and ``N`` clients ``O(N²)`` (500 GPT-2-small clients:
        154 s). Here only the target layers are touched: ``LoraModel._create_and_replace`` (which calls the layer's
        ``update_layer``, the same initialization, in the same module order, so the same random draws as
        ``add_adapter``) and ``cast_adapter_dtype`` per layer; the config is registered as ``add_adapter`` does. Returns
        False (nothing changed) where a target is not yet a LoRA layer; peft's full path handles those.
        """
        wanted = set(module_names)
        layers = [(module, layer) for module, layer in self._layers if module in wanted]
        if self.peft_model is None or len(layers) != len(wanted):
            return False
        tuner: Any = self.peft_model.base_model  # peft.LoraModel
        self.peft_model.peft_config[name] = config
        try:
            for module, layer in layers:
                parent, _, target_name = module.rpartition(".")
                # ``update_layer`` ends with ``set_adapter(active)``, which visits every adapter of the layer to
                # freeze the inactive ones (O(N) again); here every adapter stays trainable (``_keep_trainable``)
                # and the active set does not change, so that call is skipped for this layer while it is built.
                # Likewise its ``_move_adapter_to_device_of_base_layer`` scans every adapter's parameters for a
                # meta tensor before moving the new one; ``_move_new_adapter`` moves the new one the same way.
                layer.set_adapter = _keep_active  # instance attributes: shadow the methods, removed below
                layer._move_adapter_to_device_of_base_layer = functools.partial(_move_new_adapter, layer)
                try:
                    tuner._create_and_replace(config, name, layer, target_name, self.base.get_submodule(parent), module)
                finally:
                    del layer.set_adapter, layer._move_adapter_to_device_of_base_layer
                if any(p.dtype in (torch.float16, torch.bfloat16) for p in _adapter_parameters(layer, name)):
                    cast_adapter_dtype(layer, name)  # peft's upcast of half-precision adapter weights (O(N) walk)
        except Exception:  # roll back, as add_adapter does
            self.peft_model.peft_config.pop(name, None)
            for _, layer in layers:
                if name in layer.lora_A:
                    layer.delete_adapter(name)
            raise
        return True

    def _keep_trainable(self, module_names: set[str]) -> None:
        """Re-enable training of every adapter on these modules (adding an adapter makes peft freeze inactive ones)."""
        for module, layer in self._layers:
            if module in module_names:
                for key in layer.lora_A:
                    layer.lora_A[key].weight.requires_grad_(True)
                    layer.lora_B[key].weight.requires_grad_(True)

    def delete(self, name: str) -> None:
        """Remove adapter ``name`` from every layer.

        Raises:
            KeyError: Unknown adapter.
        """
        if name not in self.ranks:
            raise KeyError(f"unknown adapter {name!r}; known adapters: {self.names[:8]}...")
        touched = set(self.ranks[name])
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            for _, layer in self._layers:
                if name in layer.lora_A:
                    layer.delete_adapter(name)
        assert self.peft_model is not None
        self.peft_model.peft_config.pop(name, None)
        del self.ranks[name]
        # deleting an active adapter makes peft activate another and freeze every other adapter of the layer
        self._keep_trainable(touched)

    def resize(self, name: str, rank_pattern: dict[str, int], scaling: float, dropout: float = 0.0) -> None:
        """Re-create adapter ``name`` on the same modules with per-module ranks (fresh LoRA init: ``B = 0``).

        Every module gets the update scaling ``scaling`` (``alpha_m / r_m``), whatever its rank; modules missing from
        ``rank_pattern`` keep their rank.

        Raises:
            KeyError: Unknown adapter, or ``rank_pattern`` names a module the adapter does not cover.
        """
        modules = list(self.ranks.get(name, {}))
        unknown = sorted(set(rank_pattern) - set(modules))
        if name not in self.ranks or unknown:
            raise KeyError(f"cannot resize {name!r}: unknown adapter, or modules {unknown[:3]} it does not cover")
        full = {m: int(rank_pattern.get(m, self.ranks[name][m])) for m in modules}
        reference = max(full.values())
        self.delete(name)
        self.add(name, modules, reference, scaling * reference, dropout, full)

    def activate(self, names: Iterable[str], skip: dict[str, set[str]] | None = None) -> None:
        """Make exactly ``names`` the active adapters of every LoRA layer (layers lacking one skip it).

        ``skip`` maps an adapter to module names where it stays inactive (a server adapter below a client's cut).
        """
        active = [n for n in names if n is not None]
        for missing in set(active) - set(self.ranks):
            raise KeyError(f"unknown adapter {missing!r}; known adapters: {self.names[:8]}...")
        for module, layer in self._layers:
            # peft's own storage of the active adapter names
            layer._active_adapter = [n for n in active if not skip or module not in skip.get(n, ())]

    def modules(self, name: str) -> list[tuple[str, Any]]:
        """``(module_name, layer)`` pairs holding adapter ``name``."""
        return [(n, m) for n, m in self._layers if name in m.lora_A]

    def parameters(self, name: str) -> list[nn.Parameter]:
        """Trainable tensors (``lora_A``, ``lora_B``) of adapter ``name``."""
        params: list[nn.Parameter] = []
        for _, m in self.modules(name):
            params += [m.lora_A[name].weight, m.lora_B[name].weight]
        return params

    def factors(self, name: str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
        """Per module: ``(A [r×d_in], B [d_out×r], scaling)`` of adapter ``name`` (live tensors, not copies)."""
        return {
            n: (m.lora_A[name].weight, m.lora_B[name].weight, float(m.scaling[name])) for n, m in self.modules(name)
        }

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """A detached copy of adapter ``name``: ``{"<module>.lora_A": A, "<module>.lora_B": B}``."""
        out: dict[str, torch.Tensor] = {}
        for module, (a, b, _) in self.factors(name).items():
            out[f"{module}.lora_A"] = a.detach().clone()
            out[f"{module}.lora_B"] = b.detach().clone()
        return out

    @torch.no_grad()
    def load_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (as returned by :meth:`state`) into adapter ``name`` in place.

        Raises:
            KeyError: ``state`` lacks a module of the adapter.
            ValueError: a tensor's shape differs from the adapter's (different rank).
        """
        for module, (a, b, _) in self.factors(name).items():
            for key, param in ((f"{module}.lora_A", a), (f"{module}.lora_B", b)):
                value = state[key]
                if value.shape != param.shape:
                    raise ValueError(
                        f"adapter {name!r}: {key} has shape {tuple(value.shape)}, expected "
                        f"{tuple(param.shape)}; ranks differ, re-decompose before loading"
                    )
                param.copy_(value)

    @torch.no_grad()
    def load_factors(self, name: str, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy ``(A, B)`` of some modules into adapter ``name`` in place; modules not given keep theirs.

        Raises:
            KeyError: A module the adapter does not cover.
            ValueError: A shape differs from the adapter's (different rank).
        """
        live = self.factors(name)
        for module, (a, b) in factors.items():
            if module not in live:
                raise KeyError(f"adapter {name!r} does not cover module {module!r}")
            param_a, param_b, _ = live[module]
            if a.shape != param_a.shape or b.shape != param_b.shape:
                raise ValueError(
                    f"adapter {name!r}: {module} gets A {tuple(a.shape)} and B {tuple(b.shape)}, expected "
                    f"{tuple(param_a.shape)} and {tuple(param_b.shape)}; ranks differ, re-decompose before loading"
                )
            param_a.copy_(a)
            param_b.copy_(b)

    def nbytes(self, name: str) -> int:
        """Bytes of adapter ``name``'s tensors."""
        return sum(p.numel() * p.element_size() for p in self.parameters(name))
