"""Evaluation: answer metrics (Bergen-compatible) and reranking metrics."""

from .metrics import (
    answer_lead,
    answer_metrics,
    answer_sources,
    exact_match,
    f1,
    match,
    ndcg_at_k,
    normalize_answer,
    recall,
    recall_at_k,
)

__all__ = [
    "answer_lead",
    "answer_metrics",
    "answer_sources",
    "exact_match",
    "f1",
    "match",
    "ndcg_at_k",
    "normalize_answer",
    "recall",
    "recall_at_k",
]
