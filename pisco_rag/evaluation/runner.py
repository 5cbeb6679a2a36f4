"""One evaluation run on one backbone: text RAG against compressed RAG (and, for OSCAR models
with a reranking head, the head's ranking against the first-stage order), as a JSON report.

- ``text``: the documents read as text with the same PISCO prompt
  (:meth:`PiscoModel.generate_from_text`; ``text_adapter="none"`` reads with the plain
  backbone, the usual text-RAG baseline; ``"decoder"`` with the decoder adapter);
- ``text_decoder``: the same with the decoder adapter on (how well the trained decoder still
  reads text);
- ``compressed``: the documents compressed into memories (OSCAR: conditioned on the question)
  and read by the decoder.
- ``diagnostics`` (with ``diagnostics=True``): the mean NLL per token of the gold answer
  (a) with the documents as text (the text-RAG reader), (b) from their memories, (c) with no
  context (decoder adapter), and the share of the text's gain that memories recover,
  ``(c - b) / (c - a)``: it moves long before Match does.
- ``answer_source`` per mode (records with ``gold_index``): the share of answers whose answer
  words (:func:`~pisco_rag.evaluation.metrics.answer_lead`) occur in the gold document, only
  in another document, or in none: a reader that picks the wrong passage versus one that
  cannot read its passage.
- ``grounded_metrics`` per mode: the same metrics once each short answer is aligned to the
  closest span of its record's documents (:mod:`pisco_rag.grounding`): the answers that name
  the right passage span but spell it wrong.
- ``reranking`` (OSCAR with a head, records with ``gold_index``): recall@k, nDCG@k and MRR of
  the head's scores and of the first-stage order (``retrieval_scores`` when the records have
  them, else their document order); with ``top_n``, also the answers from the top-n documents
  of each order.

Answer metrics are Bergen's (Match, EM, F1, Recall) against the records' ``answer``.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import torch
from tqdm.auto import tqdm

from ..errors import PiscoInputError
from ..grounding import ground_answer
from ..memory import Memory
from .metrics import answer_metrics, answer_sources, first_stage_ranking, ndcg_at_k, recall_at_k

Mode = Literal["text", "text_decoder", "compressed"]
MODES = ("text", "text_decoder", "compressed")
_PLACEHOLDER = Memory(torch.zeros(1, 1), "", "0" * 32)


def _as_records(records: Any) -> list[dict[str, Any]]:
    if hasattr(records, "to_list"):  # datasets.Dataset
        records = records.to_list()
    records = [dict(r) for r in records]
    if not records:
        raise PiscoInputError("records is empty: nothing to evaluate")
    for i, r in enumerate(records):
        if not isinstance(r.get("question"), str) or not r["question"].strip():
            raise PiscoInputError(f"records[{i}] has no 'question'")
        docs = r.get("documents")
        if not isinstance(docs, list) or not all(isinstance(d, str) and d.strip() for d in docs):
            raise PiscoInputError(f"records[{i}]: 'documents' must be a list of non-empty strings")
        if r.get("answer") in (None, "", []):
            raise PiscoInputError(f"records[{i}] has no 'answer' to score against")
    return records


def check_eval_split(records: Sequence[dict[str, Any]], allow_train_split: bool = False) -> None:
    """Refuse records marked ``split: train`` (they may have been trained on)."""
    bad = [r.get("id", i) for i, r in enumerate(records) if r.get("split") == "train"]
    if bad and not allow_train_split:
        raise PiscoInputError(
            f"{len(bad)} records belong to the training split (e.g. {bad[0]!r}); evaluate on "
            "the eval split (`pisco-rag build-data --split eval`), or pass "
            "allow_train_split=True (--allow-train-split) knowingly"
        )


def _prompt_tokens(model, question: str, contexts: Sequence[Memory | str]) -> int:
    r = model.renderer
    return len(r.render(r.pisco_turns(question, contexts, model.config.system_prompt)).input_ids)


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def ranking_metrics(rankings: list[list[int]], golds: list[int], ks: Sequence[int]) -> dict:
    """recall@k and nDCG@k for each k, and MRR, of rankings (document indices, best first)
    against one relevant document each."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"recall@{k}"] = _mean([recall_at_k(r, [g], k) for r, g in zip(rankings, golds)])
        out[f"ndcg@{k}"] = _mean([ndcg_at_k(r, [g], k) for r, g in zip(rankings, golds)])
    out["mrr"] = _mean([1 / (r.index(g) + 1) for r, g in zip(rankings, golds)])
    return out


def evaluate_rag(
    model,
    records: Any,
    *,
    modes: Sequence[Mode] = MODES,
    text_adapter: Literal["none", "decoder"] = "none",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    compress_batch_size: int = 32,
    top_n: int | None = None,
    ks: Sequence[int] = (1, 3, 5),
    allow_train_split: bool = False,
    keep_predictions: bool = True,
    show_progress: bool = True,
    diagnostics: bool = True,
) -> dict[str, Any]:
    """Run the comparison on ``records`` (list of dicts or a ``datasets.Dataset``) and return
    the report (see the module docstring). Compression bypasses the memory store, so timings
    are honest."""
    records = _as_records(records)
    check_eval_split(records, allow_train_split)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise PiscoInputError(f"modes must be drawn from {MODES}, got {modes!r}")
    if top_n is not None and top_n < 1:
        raise PiscoInputError(f"top_n must be at least 1, got {top_n}")
    questions = [r["question"] for r in records]
    documents = [r["documents"] for r in records]
    labels = [r["answer"] for r in records]
    gold = [r.get("gold_index") for r in records]
    has_gold = all(isinstance(g, int) and 0 <= g < len(d) for g, d in zip(gold, documents))
    model.refresh_fingerprint()  # weights may have changed since the fingerprint was cached
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": model.info(),
        "host": {"platform": platform.platform(), "torch": torch.__version__},
        "settings": {
            "modes": list(modes),
            "text_adapter": text_adapter,
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "top_n": top_n,
            "ks": list(ks),
        },
        "data": {
            "n": len(records),
            "documents_per_question": _mean([len(d) for d in documents]),
        },
    }
    predictions: dict[str, list[str]] = {}

    def answer_section(preds: list[str]) -> dict[str, Any]:
        """Answer metrics of one mode, and where its answers come from (with gold indices)."""
        section: dict[str, Any] = {"metrics": answer_metrics(preds, labels)}
        # the same answers aligned to the closest span of the documents they were read from
        grounded = [ground_answer(p, docs) for p, docs in zip(preds, documents)]
        section["grounded_metrics"] = answer_metrics(grounded, labels)
        if has_gold:
            section["answer_source"] = answer_sources(preds, questions, documents, gold)
        return section

    for mode, adapter in (("text", text_adapter), ("text_decoder", "decoder")):
        if mode not in modes:
            continue
        start = time.perf_counter()
        preds: list[str] = []
        for b in tqdm(
            range(0, len(records), batch_size), desc=f"{mode} RAG", disable=not show_progress
        ):
            preds += model.generate_from_text(
                questions[b : b + batch_size],
                documents[b : b + batch_size],
                adapter=adapter,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
        seconds = time.perf_counter() - start
        predictions[mode] = preds
        report[mode] = {
            **answer_section(preds),
            "seconds": round(seconds, 3),
            "prompt_tokens_mean": _mean(
                [_prompt_tokens(model, q, d) for q, d in zip(questions, documents)]
            ),
        }

    contexts: list[list[Memory]] = []
    if "compressed" in modes or top_n is not None or diagnostics:
        flat = [(i, d) for i, docs in enumerate(documents) for d in docs]
        queries = [questions[i] for i, _ in flat] if model.config.is_oscar else None
        start = time.perf_counter()
        memories = model.compress(
            [d for _, d in flat],
            queries=queries,
            batch_size=compress_batch_size,
            show_progress=show_progress,
            use_store=False,
        )
        compress_seconds = time.perf_counter() - start
        doc_owner = [i for i, _ in flat]
        doc_local = [j for docs in documents for j in range(len(docs))]
        contexts = [[] for _ in records]
        per_doc: list[list[list[Memory]]] = [[[] for _ in docs] for docs in documents]
        for m in memories:
            contexts[doc_owner[m.source_index]].append(m)
            per_doc[doc_owner[m.source_index]][doc_local[m.source_index]].append(m)

    if "compressed" in modes:
        start = time.perf_counter()
        preds = model.generate(
            questions,
            contexts,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            show_progress=show_progress,
        )
        gen_seconds = time.perf_counter() - start
        predictions["compressed"] = preds
        report["compressed"] = {
            **answer_section(preds),
            "seconds": round(compress_seconds + gen_seconds, 3),
            "compress_seconds": round(compress_seconds, 3),
            "generate_seconds": round(gen_seconds, 3),
            "prompt_tokens_mean": _mean(
                [_prompt_tokens(model, q, c) for q, c in zip(questions, contexts)]
            ),
        }

    if diagnostics:
        report["diagnostics"] = answer_diagnostics(
            model, questions, documents, contexts, labels, text_adapter, batch_size
        )

    head = model.compressor is not None and model.compressor.head is not None
    if head and contexts:
        first = [first_stage_ranking(r) for r in records]
        reranked = []
        for docs in per_doc:
            scores = [max(m.score for m in ms) for ms in docs]
            reranked.append(sorted(range(len(docs)), key=lambda i, s=scores: (-s[i], i)))
        section: dict[str, Any] = {}
        if has_gold:
            section["first_stage"] = ranking_metrics(first, gold, ks)
            section["oscar"] = ranking_metrics(reranked, gold, ks)
        else:
            section["note"] = "records lack gold_index: no ranking metrics"
        if top_n is not None:
            for name, order in (("first_stage", first), ("oscar", reranked)):
                ctx = [[m for d in o[:top_n] for m in per_doc[i][d]] for i, o in enumerate(order)]
                preds = model.generate(
                    questions, ctx, max_new_tokens=max_new_tokens, batch_size=batch_size
                )
                predictions[f"compressed_{name}_top{top_n}"] = preds
                section[f"answers_{name}_top{top_n}"] = answer_metrics(preds, labels)
        report["reranking"] = section

    if keep_predictions:
        report["predictions"] = [
            {
                "id": r.get("id", i),
                "question": r["question"],
                "answer": r["answer"],
                **{mode: p[i] for mode, p in predictions.items()},
            }
            for i, r in enumerate(records)
        ]
    return report


def answer_diagnostics(
    model,
    questions: Sequence[str],
    documents: Sequence[Sequence[str]],
    contexts: Sequence[Sequence[Memory]],
    answers: Sequence[Any],
    text_adapter: Literal["none", "decoder"] = "none",
    batch_size: int = 8,
) -> dict[str, float]:
    """Mean gold-answer NLL per token with the documents as text, from their memories, from
    another question's memories (shuffled: what the memories carry beyond answer style) and
    with no context, and the share of the text's gain the memories recover."""
    gold = [a[0] if isinstance(a, list) else a for a in answers]
    text = model.answer_nll(questions, documents, gold, adapter=text_adapter, batch_size=batch_size)
    memories = model.answer_nll(questions, contexts, gold, batch_size=batch_size)
    shuffled = [contexts[(i + 1) % len(contexts)] for i in range(len(contexts))]
    other = model.answer_nll(questions, shuffled, gold, batch_size=batch_size)
    none = model.answer_nll(questions, [[] for _ in questions], gold, batch_size=batch_size)
    a, b, c = _mean(text), _mean(memories), _mean(none)
    return {
        "nll_text": a,
        "nll_memories": b,
        "nll_shuffled_memories": _mean(other),
        "nll_no_context": c,
        "gap_recovered": (c - b) / (c - a) if c != a else float("nan"),
    }


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the report as indented JSON (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def summary(report: dict[str, Any]) -> str:
    """A few lines for a terminal: Match/F1 per mode, ranking metrics."""
    lines = [f"{report['data']['n']} questions, model {report['model'].get('name')}"]
    for mode in MODES:
        if mode in report:
            m = report[mode]["metrics"]
            lines.append(
                f"  {mode:<11} match={m['match']:.3f} em={m['em']:.3f} f1={m['f1']:.3f} "
                f"({report[mode]['seconds']:.1f}s, {report[mode]['prompt_tokens_mean']:.0f} "
                "prompt tokens)"
            )
            g = report[mode].get("grounded_metrics")
            if g:
                lines.append(
                    f"  {'':<11} grounded answers: match={g['match']:.3f} f1={g['f1']:.3f}"
                )
            source = report[mode].get("answer_source")
            if source:
                lines.append(
                    f"  {'':<11} answer words in the gold document {source['in_gold']:.0%}"
                    f", only in another {source['in_other_document']:.0%}, in none "
                    f"{source['in_no_document']:.0%}"
                )
    d = report.get("diagnostics")
    if d:
        lines.append(
            f"  answer NLL: text {d['nll_text']:.3f}, memories {d['nll_memories']:.3f}, "
            f"another question's memories {d.get('nll_shuffled_memories', float('nan')):.3f}, "
            f"no context {d['nll_no_context']:.3f}; memories recover "
            f"{d['gap_recovered']:.1%} of the text's gain"
        )
    for name, value in report.get("reranking", {}).items():
        if isinstance(value, dict):
            shown = " ".join(f"{k}={v:.3f}" for k, v in value.items())
            lines.append(f"  {name:<11} {shown}")
    return "\n".join(lines)


__all__ = [
    "answer_diagnostics",
    "check_eval_split",
    "evaluate_rag",
    "first_stage_ranking",
    "summary",
    "write_report",
]
