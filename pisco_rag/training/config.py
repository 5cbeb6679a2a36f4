"""Hyper-parameters of a distillation run (:class:`TrainConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import PiscoInputError
from . import RERANK_LOSSES


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of a distillation run (defaults follow the papers)."""

    output_dir: str
    target_field: str | None = None  # "label" (teacher) or "answer"; None: label if present
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    batch_size: int = 8
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    decoder_lr: float = 1e-4
    compressor_lr: float = 1e-4  # encoder adapter / OSCAR compressor, memory-token embeddings
    # the OSCAR reranking head (a dense layer on a hidden state of norm ~100 whose spread over
    # documents is a few %): None = compressor_lr, which moves its scores apart too slowly
    head_lr: float | None = None
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    rerank_weight: float = 0.05
    rerank_loss: Literal["l2", "listwise"] = "l2"
    compressor_tuning: Literal["full", "lora"] = "full"  # OSCAR compressors
    max_answer_tokens: int = 64
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate only at the end (if there is eval data)
    eval_generate: int = 0  # also generate answers for this many eval records (Match)
    save_steps: int = 500
    save_total_limit: int | None = 3
    bf16: bool | None = None  # None: on CUDA with bf16 support
    seed: int = 0
    dataloader_num_workers: int = 0
    gradient_checkpointing: bool = False
    # standardise memories before training (PiscoModel.calibrate_memories) on the first
    # training documents, unless the model already is
    calibrate_memories: bool = False
    # context distillation from the same backbone reading the documents as text (adapters off):
    # KL on the next-token distributions of every position after the context (question, answer)
    context_distillation: float = 0.0
    # ... and the relative squared distance of the hidden states there, every 4th layer
    hidden_distillation: float = 0.0
    # this share of QA records is read as text by the decoder adapter, so it keeps reading text
    text_context_ratio: float = 0.0
    # batches of records whose decoder rows have about the same length (transformers'
    # LengthGroupedSampler): text rows and memory rows, or auto-encoding and QA rows, do not
    # pad each other
    group_by_length: bool = True
    show_progress: bool = True
    # more TrainingArguments, or other values of those set here (lr_scheduler_type...)
    extra_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_lr is not None and not self.head_lr > 0:
            raise PiscoInputError(f"head_lr must be positive, got {self.head_lr}")
        if self.rerank_loss not in RERANK_LOSSES:
            raise PiscoInputError(
                f"rerank_loss must be one of {RERANK_LOSSES}, got {self.rerank_loss!r}"
            )
        if self.compressor_tuning not in ("full", "lora"):
            raise PiscoInputError(
                f"compressor_tuning must be 'full' or 'lora', got {self.compressor_tuning!r}"
            )
        for name in ("batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise PiscoInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("context_distillation", "hidden_distillation"):
            if getattr(self, name) < 0:
                raise PiscoInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.text_context_ratio < 1:
            raise PiscoInputError(
                f"text_context_ratio must be in [0, 1) (the share of records read as text), "
                f"got {self.text_context_ratio}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise PiscoInputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


__all__ = ["TrainConfig"]
