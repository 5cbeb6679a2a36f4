"""The evaluation runner: text vs compressed RAG and OSCAR reranking in one report."""

from __future__ import annotations

import json
import math

import pytest
from conftest import randomize_lora, tiny_backbone

from pisco_rag import PiscoInputError, PiscoModel
from pisco_rag.evaluation.metrics import answer_metrics, answer_sources
from pisco_rag.evaluation.runner import (
    evaluate_rag,
    first_stage_ranking,
    summary,
    write_report,
)
from pisco_rag.grounding import ground_answer

RECORDS = [
    {
        "id": "a",
        "question": "Which river flows through Hamburg?",
        "documents": ["The Elbe flows through Hamburg.", "Mount Fuji is in Japan.", "Rye."],
        "answer": "Elbe",
        "gold_index": 0,
        "retrieval_scores": [0.2, 0.9, 0.1],  # first stage puts the gold second
    },
    {
        "id": "b",
        "question": "What is the highest peak in Japan?",
        "documents": ["Bread is baked daily.", "Mount Fuji is the highest peak in Japan."],
        "answer": ["Mount Fuji", "Fuji"],
        "gold_index": 1,
        "retrieval_scores": [0.3, 0.8],
    },
    {
        "id": "c",
        "question": "What does the bakery sell?",
        "documents": ["The bakery sells rye bread.", "The Elbe is long."],
        "answer": "rye bread",
        "gold_index": 0,
    },
]


@pytest.fixture(scope="module")
def oscar() -> PiscoModel:
    backbone, tok = tiny_backbone("llama", 0)
    model = PiscoModel.from_backbone(
        backbone, tok, compressor="first-layers:1", rerank_head=True, device="cpu"
    )
    randomize_lora(model, 1)
    return model


def test_first_stage_ranking():
    assert first_stage_ranking(RECORDS[0]) == [1, 0, 2]
    assert first_stage_ranking(RECORDS[2]) == [0, 1]  # no scores: the record's order
    with pytest.raises(PiscoInputError, match="retrieval_scores"):
        first_stage_ranking({"documents": ["x"], "retrieval_scores": [1, 2]})


def test_text_and_compressed_in_one_report(tiny_model, tmp_path):
    report = evaluate_rag(tiny_model, RECORDS, max_new_tokens=4, show_progress=False)
    preds = report["predictions"]
    assert [p["id"] for p in preds] == ["a", "b", "c"]
    labels = [r["answer"] for r in RECORDS]
    for mode in ("text", "compressed"):
        expected = answer_metrics([p[mode] for p in preds], labels)
        assert report[mode]["metrics"] == pytest.approx(expected)
        grounded = [
            ground_answer(p[mode], r["documents"]) for p, r in zip(preds, RECORDS, strict=True)
        ]
        assert report[mode]["grounded_metrics"] == pytest.approx(answer_metrics(grounded, labels))
        assert report[mode]["seconds"] >= 0
        sources = answer_sources(
            [p[mode] for p in preds],
            [r["question"] for r in RECORDS],
            [r["documents"] for r in RECORDS],
            [0, 1, 0],
        )
        assert report[mode]["answer_source"] == pytest.approx(sources)
        assert sum(sources.values()) == pytest.approx(1.0)
    # each document costs its tokens as text, n_mem + 1 tokens (a memory slot) compressed
    n_docs = sum(len(r["documents"]) for r in RECORDS) / 3
    diff = report["text"]["prompt_tokens_mean"] - report["compressed"]["prompt_tokens_mean"]
    doc_tokens = (
        sum(
            len(tiny_model.tokenizer(d + "\n", add_special_tokens=False)["input_ids"])
            for r in RECORDS
            for d in r["documents"]
        )
        / 3
    )
    assert diff == pytest.approx(doc_tokens - n_docs * (tiny_model.n_mem + 1), abs=2)
    assert report["model"]["fingerprint"] == tiny_model.fingerprint
    assert "reranking" not in report  # PISCO: no head
    path = write_report(report, tmp_path / "out" / "r.json")
    assert json.loads(path.read_text())["data"]["n"] == 3
    assert "text" in summary(report) and "compressed" in summary(report)
    assert "grounded answers: match=" in summary(report)


def test_predictions_match_direct_calls(tiny_model):
    report = evaluate_rag(
        tiny_model, RECORDS[:2], modes=["compressed"], max_new_tokens=4, show_progress=False
    )
    assert "text" not in report
    direct = tiny_model.generate(
        [r["question"] for r in RECORDS[:2]],
        [tiny_model.compress(r["documents"]) for r in RECORDS[:2]],
        max_new_tokens=4,
    )
    assert [p["compressed"] for p in report["predictions"]] == direct


def test_oscar_reranking_against_the_first_stage(oscar):
    recs = RECORDS[:2]
    report = evaluate_rag(
        oscar, recs, modes=["compressed"], max_new_tokens=3, top_n=1, ks=(1, 2), show_progress=False
    )
    section = report["reranking"]
    # first stage by hand: gold at rank 2 (record a) and rank 1 (record b)
    assert section["first_stage"]["recall@1"] == pytest.approx(0.5)
    assert section["first_stage"]["mrr"] == pytest.approx((1 / 2 + 1) / 2)
    assert section["first_stage"]["ndcg@2"] == pytest.approx((1 / math.log2(3) + 1) / 2)
    # OSCAR: the order the head gives through model.rerank
    ranks = []
    for r in recs:
        order = [x.index for x in oscar.rerank(r["question"], r["documents"])]
        ranks.append(order.index(r["gold_index"]) + 1)
    assert section["oscar"]["mrr"] == pytest.approx(sum(1 / k for k in ranks) / 2)
    assert section["oscar"]["recall@1"] == pytest.approx(sum(k == 1 for k in ranks) / 2)
    assert set(section) >= {"answers_first_stage_top1", "answers_oscar_top1"}
    assert "compressed_oscar_top1" in report["predictions"][0]


def test_training_records_are_refused(tiny_model):
    recs = [dict(RECORDS[0], split="train")]
    with pytest.raises(PiscoInputError, match="training split"):
        evaluate_rag(tiny_model, recs, show_progress=False)
    report = evaluate_rag(
        tiny_model,
        recs,
        modes=["compressed"],
        max_new_tokens=2,
        allow_train_split=True,
        keep_predictions=False,
        show_progress=False,
    )
    assert "predictions" not in report
    with pytest.raises(PiscoInputError, match="answer"):
        evaluate_rag(tiny_model, [{"question": "q", "documents": ["d"]}], show_progress=False)
    with pytest.raises(PiscoInputError, match="modes"):
        evaluate_rag(tiny_model, RECORDS, modes=["fast"], show_progress=False)
