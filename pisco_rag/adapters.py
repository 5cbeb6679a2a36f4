"""LoRA adapters on one backbone, through peft's public integration API (``peft.functional``).

PISCO keeps one set of base weights with two named LoRA adapters (``encoder_adapter`` and
``decoder_adapter``) and switches between them. The backbone stays a plain transformers model:
peft injects its LoRA layers in place, and everything here goes through the functions peft
publishes for integrations (``inject_adapter_in_model``, ``set_adapter``,
``get_peft_model_state_dict``, ``set_peft_model_state_dict``).

We deliberately do not use transformers' own PEFT integration (``model.add_adapter`` /
``load_adapter`` / ``set_adapter``): it checks the installed peft against a minimum that moves
with every transformers release, so a new transformers could refuse a peft that works
(transformers 5.24 asks for peft >= 0.22 before any registry had it). Going to peft directly,
the library needs only the peft versions it was tested with (see ``constraints.txt``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from peft import LoraConfig
from peft.functional import (
    get_peft_model_state_dict,
    inject_adapter_in_model,
    set_adapter,
    set_peft_model_state_dict,
)
from peft.tuners.tuners_utils import BaseTunerLayer

from .errors import CheckpointError

ENCODER, DECODER, RETRIEVER = "encoder_adapter", "decoder_adapter", "retriever_adapter"


def lora_config(r: int, alpha: int, dropout: float, target_modules: str | list[str]) -> LoraConfig:
    """The LoRA configuration of a PISCO adapter (causal LM, no bias)."""
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
    )


def add_adapters(
    model: torch.nn.Module,
    config: LoraConfig,
    names: tuple[str, ...],
    weights: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    *,
    active: str = DECODER,
) -> None:
    """Inject one LoRA adapter per name into ``model`` (in place); load ``weights[name]``
    (keys as peft saves them, without the adapter name) where given, else keep peft's
    initialisation (``B = 0``: the adapter starts as the identity). ``active`` is switched on."""
    weights = weights or {}
    with warnings.catch_warnings():
        # a second adapter on one model is what we want; peft warns about it
        warnings.filterwarnings("ignore", message=".*multiple adapters.*")
        for name in names:
            inject_adapter_in_model(config, model, adapter_name=name)
    for name in names:
        if name in weights:
            state = lora_only(weights[name])
            result = set_peft_model_state_dict(model, state, adapter_name=name)
            missing = [k for k in result.missing_keys if f".{name}." in k and "lora_" in k]
            if missing or result.unexpected_keys:
                raise CheckpointError(
                    f"adapter {name!r} does not fit this backbone: {len(missing)} LoRA weights "
                    f"missing (e.g. {missing[:1]}), {len(result.unexpected_keys)} unexpected "
                    f"(e.g. {result.unexpected_keys[:1]}); is this the right backbone?"
                )
    use_adapter(model, active)


def use_adapter(model: torch.nn.Module, name: str | None) -> None:
    """Make ``name`` the one active adapter; ``None`` disables every adapter (plain backbone)."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if name is None:
        for layer in layers:
            layer.enable_adapters(False)
        return
    for layer in layers:
        if layer.disable_adapters:  # only after use_adapter(model, None): set_adapter does the rest
            layer.enable_adapters(True)
    set_adapter(model, name)


def active_adapters(model: torch.nn.Module) -> list[str]:
    """The adapters that take part in the forward pass ([] when adapters are disabled)."""
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            return [] if m.disable_adapters else list(m.active_adapters)
    return []


def adapter_state_dict(model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The LoRA weights of adapter ``name``, keyed as peft saves them (no adapter name)."""
    return lora_only(
        get_peft_model_state_dict(model, adapter_name=name, save_embedding_layers=False)
    )


def lora_only(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA matrices of an adapter state dict (other entries, e.g. resized embedding
    layers some tools add, are not part of an adapter here)."""
    return {k: v for k, v in state_dict.items() if "lora_" in k}


__all__ = [
    "DECODER",
    "ENCODER",
    "RETRIEVER",
    "active_adapters",
    "adapter_state_dict",
    "add_adapters",
    "lora_config",
    "lora_only",
    "use_adapter",
]
