"""What a distillation run trains: parameter groups, gradient masks, resumable state."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..adapters import DECODER, ENCODER
from ..errors import PiscoInputError
from ..model import PiscoModel
from .config import TrainConfig
from .student import StudentModule

TRAINABLE_FILE = "trainable.safetensors"


@dataclass
class TrainableSetup:
    """Parameter groups and the hooks/flags to undo after training."""

    groups: list[dict[str, Any]]
    named: dict[str, nn.Parameter]
    hooks: list[Any]
    saved_flags: list[tuple[nn.Parameter, bool]]

    def restore(self) -> None:
        for h in self.hooks:
            h.remove()
        for p, flag in self.saved_flags:
            p.requires_grad_(flag)
        self.hooks.clear()


def _row_mask_hook(param: nn.Parameter, rows: Sequence[int]):
    mask = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=param.device)
    mask[list(rows)] = 1
    return param.register_hook(lambda grad: grad * mask.to(grad.dtype))


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or "norm" in name.lower() or "bias" in name


def add_compressor_lora(pisco: PiscoModel) -> None:
    """Wrap an OSCAR compressor body with a LoRA adapter (peft) for LoRA tuning."""
    from peft import LoraConfig, PeftModel, get_peft_model

    body = pisco.compressor.body
    if isinstance(body, PeftModel):
        return
    cfg = pisco.config
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
    )
    pisco.compressor.body = get_peft_model(body, lora)


def setup_trainable(student: StudentModule, config: TrainConfig) -> TrainableSetup:
    """Freeze everything, then enable and group what trains (see the module docstring)."""
    pisco = student.pisco
    params = list(student.named_parameters())
    saved = [(p, p.requires_grad) for _, p in params]
    for _, p in params:
        p.requires_grad_(False)
    decoder, compressor, embeddings = [], [], []
    for name, p in pisco.model.named_parameters():
        if f"lora_A.{DECODER}" in name or f"lora_B.{DECODER}" in name:
            decoder.append((f"backbone.{name}", p))
        elif f".{ENCODER}." in name and "lora_" in name:
            compressor.append((f"backbone.{name}", p))
    emb = pisco.model.get_input_embeddings().weight
    embeddings.append(("backbone.embeddings", emb))
    masked = [(emb, pisco._added_token_ids())]
    if pisco.compressor is not None:
        comp = pisco.compressor
        if config.compressor_tuning == "lora":
            add_compressor_lora(pisco)
            student.compressor = comp  # re-register (the body changed)
            for name, p in comp.named_parameters():
                if name.startswith("body.") and "lora_" not in name:
                    continue
                compressor.append((f"compressor.{name}", p))
            cemb = comp.body.get_input_embeddings().weight
            rows = [*comp.mem_token_ids]
            if comp.rerank_token_id is not None:
                rows.append(comp.rerank_token_id)
            embeddings.append(("compressor.embeddings", cemb))
            masked.append((cemb, rows))
        else:
            compressor += [(f"compressor.{n}", p) for n, p in comp.named_parameters()]
    seen: set[int] = set()
    named: dict[str, nn.Parameter] = {}

    def unique(items):
        out = []
        for name, p in items:
            if id(p) not in seen:
                seen.add(id(p))
                named[name] = p
                out.append((name, p))
        return out

    embeddings, decoder, compressor = unique(embeddings), unique(decoder), unique(compressor)
    scoring = ("compressor.head.", "compressor.interaction_scale")
    head = [(n, p) for n, p in compressor if n.startswith(scoring)]
    compressor = [(n, p) for n, p in compressor if not n.startswith(scoring)]
    head_lr = config.compressor_lr if config.head_lr is None else config.head_lr
    groups = [
        {"params": [p for _, p in embeddings], "lr": config.compressor_lr, "weight_decay": 0.0}
    ]
    for part, lr in (
        (decoder, config.decoder_lr),
        (compressor, config.compressor_lr),
        (head, head_lr),
    ):
        for decay in (True, False):  # weight decay, except on biases, norms and scalars
            groups.append(
                {
                    "params": [p for n, p in part if _no_decay(n, p) != decay],
                    "lr": lr,
                    "weight_decay": config.weight_decay if decay else 0.0,
                }
            )
    groups = [g for g in groups if g["params"]]
    for p in named.values():
        p.requires_grad_(True)
    hooks = [_row_mask_hook(param, rows) for param, rows in masked]
    student.trainable = list(named.values())
    return TrainableSetup(groups, named, hooks, saved)


def save_trainable(setup: TrainableSetup, directory: str | os.PathLike[str]) -> None:
    """Write the live trainable parameters to ``directory/trainable.safetensors`` (what
    :func:`load_trainable` reads back on resume)."""
    from safetensors.torch import save_file

    save_file(
        {n: p.detach().contiguous().cpu() for n, p in setup.named.items()},
        os.path.join(directory, TRAINABLE_FILE),
        metadata={"format": "pt"},
    )


def load_trainable(setup: TrainableSetup, checkpoint: str | os.PathLike[str]) -> None:
    """Copy a checkpoint's ``trainable.safetensors`` into the live parameters."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / TRAINABLE_FILE
    if not path.is_file():
        raise PiscoInputError(
            f"resume_from_checkpoint {str(checkpoint)!r} has no {TRAINABLE_FILE}: it is not a "
            "checkpoint of `pisco-rag train`"
        )
    saved = load_file(path)
    missing = sorted(set(setup.named) - set(saved))
    unexpected = sorted(set(saved) - set(setup.named))
    if missing or unexpected:
        raise PiscoInputError(
            f"resume_from_checkpoint {str(checkpoint)!r} does not fit this model and setup "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same model "
            "and compressor_tuning"
        )
    with torch.no_grad():
        for name, p in setup.named.items():
            if saved[name].shape != p.shape:
                raise PiscoInputError(f"{path}: {name} has shape {tuple(saved[name].shape)}")
            p.copy_(saved[name].to(p.dtype))


__all__ = [
    "TRAINABLE_FILE",
    "TrainableSetup",
    "add_compressor_lora",
    "load_trainable",
    "save_trainable",
    "setup_trainable",
]
