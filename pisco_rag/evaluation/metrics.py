"""Answer metrics as Bergen computes them, and reranking metrics.

Answers are normalised (lowercase, punctuation and the articles a/an/the removed, whitespace
collapsed) before comparison. Every answer metric takes a prediction and one or more gold
labels and returns the best value over the labels.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Any

from ..errors import PiscoInputError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    """Lowercase, drop punctuation and articles, collapse whitespace."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _labels(labels: str | Iterable[str]) -> list[str]:
    out = [labels] if isinstance(labels, str) else list(labels)
    if not out:
        raise ValueError("labels must hold at least one gold answer")
    return out


def match(prediction: str, labels: str | Iterable[str]) -> float:
    """1.0 if a normalised label is contained in the normalised prediction."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(label) in pred for label in _labels(labels)))


def exact_match(prediction: str, labels: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals a normalised label."""
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(label) == pred for label in _labels(labels)))


def _overlap(prediction: str, label: str) -> tuple[int, int, int]:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(label).split()
    return sum((Counter(pred) & Counter(gold)).values()), len(pred), len(gold)


def f1(prediction: str, labels: str | Iterable[str]) -> float:
    """Token-level F1 between prediction and label (best label)."""
    best = 0.0
    for label in _labels(labels):
        common, n_pred, n_gold = _overlap(prediction, label)
        if common:
            precision, rec = common / n_pred, common / n_gold
            best = max(best, 2 * precision * rec / (precision + rec))
    return best


def recall(prediction: str, labels: str | Iterable[str]) -> float:
    """Share of the label's tokens found in the prediction (best label)."""
    best = 0.0
    for label in _labels(labels):
        common, _, n_gold = _overlap(prediction, label)
        if n_gold:
            best = max(best, common / n_gold)
    return best


def answer_metrics(
    predictions: Sequence[str], labels: Sequence[str | Iterable[str]]
) -> dict[str, float]:
    """Mean Match, EM, F1 and Recall over a set of predictions."""
    if len(predictions) != len(labels):
        raise ValueError(
            f"predictions ({len(predictions)}) and labels ({len(labels)}) differ in length"
        )
    if not predictions:
        raise ValueError("predictions is empty")
    n = len(predictions)
    metrics = {"match": match, "em": exact_match, "f1": f1, "recall": recall}
    return {
        name: sum(fn(p, g) for p, g in zip(predictions, labels, strict=True)) / n
        for name, fn in metrics.items()
    }


# function words a verbose answer starts with ("It is ...", "He was played by ...")
_FUNCTION_WORDS = frozenset(
    (
        *("is", "was", "are", "were", "be", "been", "by", "of", "in", "on", "at", "to", "for"),
        *("from", "with", "as", "and", "or", "it", "its", "he", "she", "they", "his", "her"),
        *("their", "this", "that", "which", "who", "whom", "whose", "what", "when", "where"),
        *("played", "plays", "named", "called"),
    )
)


def answer_lead(prediction: str, question: str, n_words: int = 2) -> str:
    """The answer part of a prediction: up to ``n_words`` normalised words from the first word
    that is neither in the question nor a function word ("The real name of X is Dwight Yoakam
    Jr." gives "dwight yoakam"); "" when there is none. A heuristic made for short answers
    (names, dates): a sentence that starts in its own words is counted as made up."""
    asked = set(normalize_answer(question).split())
    words = normalize_answer(prediction).split()
    for i, word in enumerate(words):
        if word not in asked and word not in _FUNCTION_WORDS:
            return " ".join(words[i : i + n_words])
    return ""


def answer_sources(
    predictions: Sequence[str],
    questions: Sequence[str],
    documents: Sequence[Sequence[str]],
    gold_indices: Sequence[int],
) -> dict[str, float]:
    """Where answers come from: the share of predictions whose :func:`answer_lead` occurs in
    the gold document, only in another of the question's documents, or in none (made up or
    mangled). Tells a reader that picks the wrong passage from one that cannot read its
    passage."""
    if not (len(predictions) == len(questions) == len(documents) == len(gold_indices)):
        raise ValueError(
            f"predictions ({len(predictions)}), questions ({len(questions)}), documents "
            f"({len(documents)}) and gold_indices ({len(gold_indices)}) differ in length"
        )
    if not predictions:
        raise ValueError("predictions is empty")
    counts: Counter[str] = Counter()
    for prediction, question, docs, gold in zip(
        predictions, questions, documents, gold_indices, strict=True
    ):
        lead = answer_lead(prediction, question)
        texts = [normalize_answer(d) for d in docs]
        if lead and lead in texts[gold]:
            counts["in_gold"] += 1
        elif lead and any(lead in t for i, t in enumerate(texts) if i != gold):
            counts["in_other_document"] += 1
        else:
            counts["in_no_document"] += 1
    n = len(predictions)
    return {k: counts[k] / n for k in ("in_gold", "in_other_document", "in_no_document")}


def recall_at_k(ranking: Sequence[int], relevant: Iterable[int], k: int) -> float:
    """Share of the relevant items found in the first ``k`` of ``ranking``."""
    relevant = set(relevant)
    if not relevant:
        raise ValueError("relevant must name at least one item")
    return len(relevant & set(ranking[:k])) / len(relevant)


def ndcg_at_k(ranking: Sequence[int], relevant: Iterable[int], k: int) -> float:
    """Normalised discounted cumulative gain at ``k`` with binary relevance."""
    relevant = set(relevant)
    if not relevant:
        raise ValueError("relevant must name at least one item")
    dcg = sum(1 / math.log2(i + 2) for i, item in enumerate(ranking[:k]) if item in relevant)
    ideal = sum(1 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal


def first_stage_ranking(record: dict[str, Any]) -> list[int]:
    """Document indices by the first-stage retriever: ``retrieval_scores`` descending (ties by
    position), or the record's document order."""
    n = len(record["documents"])
    scores = record.get("retrieval_scores")
    if scores is None:
        return list(range(n))
    if len(scores) != n:
        raise PiscoInputError(
            f"record {record.get('id')!r}: retrieval_scores has {len(scores)} entries for {n} "
            "documents"
        )
    return sorted(range(n), key=lambda i: (-scores[i], i))
