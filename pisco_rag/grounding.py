"""Grounded answers: a short answer decoded from memories, aligned to the passage span it names.

A decoder reading memories picks the right name more often than it spells it right: a chunk of
16 tokens folded into one vector keeps what a name is about better than its exact subwords
("Michael Volgio" for "Michael Voltaggio"). The passages' text is still at hand after retrieval
(:attr:`Memory.text`, a framework node's text), so a short answer can be replaced by the most
similar span of the passages it was read from. No model reads the text: this is string
alignment, fuzzy matching from rapidfuzz over the passages' word spans. Long answers (sentences)
and answers with no span close enough are returned as they are.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

from rapidfuzz import fuzz, process

from .errors import PiscoInputError
from .evaluation.metrics import normalize_answer

MIN_SIMILARITY = 0.75  # rapidfuzz ratio / 100 below which an answer is left as decoded
MAX_ANSWER_WORDS = 6  # longer answers are sentences, not names: never replaced

_EDGE = string.punctuation + "`'\u2018\u2019\u201c\u201d"


def _spans(passage: str, lengths: range) -> list[str]:
    words = passage.split()
    out = []
    for n in lengths:
        for i in range(len(words) - n + 1):
            span = " ".join(words[i : i + n]).strip(_EDGE + " ")
            if span:
                out.append(span)
    return out


def ground_answer(
    answer: str,
    passages: Sequence[str],
    *,
    min_similarity: float = MIN_SIMILARITY,
    max_answer_words: int = MAX_ANSWER_WORDS,
) -> str:
    """The span of ``passages`` most similar to ``answer`` (character-level ratio of the
    normalised strings, spans of one word fewer to two words more than the answer), if it
    reaches ``min_similarity``; else ``answer`` unchanged. Answers of more than
    ``max_answer_words`` words are returned unchanged."""
    if not isinstance(answer, str):
        raise PiscoInputError(f"answer must be a str, got {type(answer).__name__}")
    if not 0.0 <= min_similarity <= 1.0:
        raise PiscoInputError(f"min_similarity must be in [0, 1], got {min_similarity!r}")
    target = normalize_answer(answer)
    n = len(target.split())
    if not target or n > max_answer_words:
        return answer
    lengths = range(max(1, n - 1), n + 3)
    candidates = [s for p in passages if isinstance(p, str) for s in _spans(p, lengths)]
    if not candidates:
        return answer
    best = process.extractOne(target, candidates, scorer=fuzz.ratio, processor=normalize_answer)
    if best is None or best[1] < 100 * min_similarity:
        return answer
    return best[0]


__all__ = ["MAX_ANSWER_WORDS", "MIN_SIMILARITY", "ground_answer"]
