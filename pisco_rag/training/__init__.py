"""Distillation training for PISCO / OSCAR models: data, teachers, trainer, command line.

Install the extra first: ``pip install 'pisco-rag[train]'`` (``datasets``, ``accelerate``).
The trainer is imported lazily, so reading data needs neither.
"""

from __future__ import annotations

from typing import Any

from .data import (
    DOCUMENT_ORDERS,
    EVAL_START,
    build_bigbench_records,
    in_retrieval_order,
    load_records,
    read_bigbench_task,
    read_jsonl,
    write_jsonl,
)

# learning-rate schedules both training stages take (transformers.get_scheduler names)
LR_SCHEDULES = ("constant", "linear", "cosine")
# how the OSCAR head learns teacher_scores (TrainConfig.rerank_loss)
RERANK_LOSSES = ("l2", "listwise")

# torch-heavy modules load on first use (the command line's help stays instant)
_LAZY = {
    "DistillationCollator": "collator",
    "StudentModule": "student",
    "TrainConfig": "config",
    **dict.fromkeys(("PiscoTrainer", "train"), "trainer"),
    **dict.fromkeys(
        (
            "CrossEncoderScorer",
            "EmbeddingScorer",
            "GoldRelevanceScorer",
            "TextTeacher",
            "label_records",
            "make_scorer",
            "score_records",
        ),
        "teacher",
    ),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DOCUMENT_ORDERS",
    "EVAL_START",
    "LR_SCHEDULES",
    "CrossEncoderScorer",
    "DistillationCollator",
    "EmbeddingScorer",
    "GoldRelevanceScorer",
    "PiscoTrainer",
    "StudentModule",
    "TextTeacher",
    "TrainConfig",
    "build_bigbench_records",
    "in_retrieval_order",
    "label_records",
    "load_records",
    "make_scorer",
    "read_bigbench_task",
    "read_jsonl",
    "score_records",
    "train",
    "write_jsonl",
]
