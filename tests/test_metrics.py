"""Evaluation metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from pisco_rag.evaluation import (
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


def test_normalisation():
    assert normalize_answer("  The Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("An apple a day") == "apple day"


def test_answer_metrics_by_hand():
    assert match("It is the city of Paris.", "paris") == 1.0
    assert match("It is Lyon.", ["Paris", "Lyon"]) == 1.0
    assert match("Rome", "Paris") == 0.0
    assert exact_match("The Paris", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    # prediction "new york city" vs gold "new york": precision 2/3, recall 1 -> F1 0.8
    assert f1("New York City", "New York") == pytest.approx(0.8)
    assert f1("Boston", "New York") == 0.0
    assert recall("New York City", "New York") == 1.0
    assert recall("York", "New York") == 0.5
    assert f1("York", ["New York", "York"]) == 1.0


def test_answer_metrics_means():
    result = answer_metrics(["Paris", "Rome is it", "no idea"], ["Paris", "Rome", "Oslo"])
    assert result["match"] == pytest.approx(2 / 3)
    assert result["em"] == pytest.approx(1 / 3)
    assert result["f1"] == pytest.approx((1 + 2 * (1 / 3) / (1 / 3 + 1) + 0) / 3)
    assert result["recall"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="differ in length"):
        answer_metrics(["a"], ["a", "b"])


def test_answer_lead_skips_the_question_and_function_words():
    question = "What is the real name of Satrupa?"
    assert answer_lead("The real name of Satrupa is Dwight Yoakam Jr.", question) == "dwight yoakam"
    assert answer_lead("El-Sisi played him", question, n_words=3) == "elsisi played him"
    assert answer_lead("It is Satrupa.", question) == ""


def test_answer_sources_by_hand():
    docs = ["The Elbe flows through Hamburg.", "Mount Fuji is in Japan."]
    question = "Which river flows through Hamburg?"
    result = answer_sources(
        # gold's words; words only in the other document; made up; empty; a sentence whose
        # answer words are the gold's
        ["the Elbe!", "Mount Fuji", "Rhine", "", "It was the Elbe."],
        [question] * 5,
        [docs] * 5,
        [0, 0, 0, 0, 0],
    )
    assert result == pytest.approx(
        {"in_gold": 2 / 5, "in_other_document": 1 / 5, "in_no_document": 2 / 5}
    )
    assert answer_sources(["Mount Fuji"], ["Which mountain?"], [docs], [1])["in_gold"] == 1.0
    with pytest.raises(ValueError, match="differ in length"):
        answer_sources(["a"], ["q"], [docs, docs], [0])


def test_ranking_metrics_by_hand():
    assert recall_at_k([3, 1, 2], [1], 1) == 0.0
    assert recall_at_k([3, 1, 2], [1], 2) == 1.0
    assert recall_at_k([3, 1, 2], [1, 2], 2) == 0.5
    assert ndcg_at_k([1, 3, 2], [1], 5) == 1.0
    assert ndcg_at_k([3, 1, 2], [1], 5) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k([3, 1, 2], [1, 2], 3) == pytest.approx(
        (1 / math.log2(3) + 1 / math.log2(4)) / (1 + 1 / math.log2(3))
    )
    with pytest.raises(ValueError, match="relevant"):
        ndcg_at_k([1], [], 1)
