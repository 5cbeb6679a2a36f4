"""Retrieval quality and stability: the PISCO model's own retriever against all-MiniLM-L6-v2
and BM25, on the passages of the evaluation split.

    python benchmarks/retrieval.py --eval eval10.jsonl [--model DIR] [--limit 400] [--tiny]

The corpus is every distinct passage of the evaluation records (gold passages and their
retrieved distractors); each question's gold passage is the relevant one. Reported per
retriever: recall@1/5/20, nDCG@10, and the retrieval variance the invariance loss targets: the
mean Jaccard overlap of the top-10 for a question and for meaning-keeping perturbations of it
(``pisco_rag.training.retriever.perturb`` with held-out seeds). ``--model`` (default: the
embedded PISCO model) is scored with its retriever adapter, or with its plain backbone when it
has none (the untrained baseline), with mean and last-token pooling.
"""

from __future__ import annotations

import argparse
import math
import random
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import RESULTS, environment, read_eval_records, tiny_backbone, write

KS = (1, 5, 20)
PERTURBATION_SEEDS = (1001, 1002, 1003)  # held out: training uses its own seed


def ranking_metrics(rankings: list[list[int]], gold: list[int]) -> dict[str, float]:
    out = {f"recall@{k}": sum(g in r[:k] for r, g in zip(rankings, gold)) / len(gold) for k in KS}
    dcg = [1 / math.log2(r.index(g) + 2) if g in r[:10] else 0.0 for r, g in zip(rankings, gold)]
    out["ndcg@10"] = sum(dcg) / len(gold)
    return {k: round(v, 4) for k, v in out.items()}


def jaccard(a: list[int], b: list[int]) -> float:
    return len(set(a) & set(b)) / len(set(a) | set(b))


def dense_search(embed_queries, doc_matrix: torch.Tensor, questions: list[str], k: int):
    scores = embed_queries(questions) @ doc_matrix.T
    return scores.topk(min(k, doc_matrix.shape[0]), dim=-1).indices.tolist()


def evaluate(search, questions: list[str], gold: list[int]) -> dict:
    rankings = search(questions, max(KS))
    result = {"metrics": ranking_metrics(rankings, gold)}
    from pisco_rag.training.retriever import perturb

    overlaps = []
    for seed in PERTURBATION_SEEDS:
        rng = random.Random(seed)
        perturbed = search([perturb(q, rng) for q in questions], 10)
        overlaps += [jaccard(a[:10], b) for a, b in zip(rankings, perturbed)]
    result["top10_jaccard_under_perturbation"] = round(sum(overlaps) / len(overlaps), 4)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eval", required=True, help="evaluation records (pisco-rag build-data)")
    parser.add_argument(
        "--model",
        nargs="+",
        default=["embedded"],
        help="PISCO checkpoints (or 'embedded'), each as DIR or LABEL=DIR; side by side",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N questions")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--poolings", nargs="+", choices=("mean", "last"), default=["mean", "last"])
    parser.add_argument("--tiny", action="store_true", help="2-layer random model (smoke test)")
    parser.add_argument("--out", default=str(RESULTS / "retrieval.json"))
    args = parser.parse_args()

    import bm25s

    from pisco_rag import PiscoModel
    from pisco_rag.documents import SentenceEmbedder

    records = read_eval_records(args.eval, args.limit)
    corpus: list[str] = []
    index: dict[str, int] = {}
    for r in records:
        for doc in r["documents"]:
            index.setdefault(doc, len(corpus))
            if index[doc] == len(corpus):
                corpus.append(doc)
    questions = [r["question"] for r in records]
    gold = [index[r["documents"][r["gold_index"]]] for r in records]
    results = {}

    tokenized = bm25s.tokenize(corpus, stopwords="en", show_progress=False)
    bm25 = bm25s.BM25()
    bm25.index(tokenized, show_progress=False)

    def bm25_search(qs: list[str], k: int) -> list[list[int]]:
        found, _ = bm25.retrieve(
            bm25s.tokenize(qs, stopwords="en", show_progress=False),
            k=min(k, len(corpus)),
            show_progress=False,
        )
        return found.tolist()

    results["bm25"] = evaluate(bm25_search, questions, gold)

    minilm = SentenceEmbedder(batch_size=args.batch_size)
    minilm_docs = torch.as_tensor(minilm(corpus))
    results["minilm"] = evaluate(
        lambda qs, k: dense_search(lambda x: torch.as_tensor(minilm(x)), minilm_docs, qs, k),
        questions,
        gold,
    )

    names = []
    for spec in args.model:
        label, _, path = spec.rpartition("=")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if args.tiny:
                backbone, tok = tiny_backbone()
                model = PiscoModel.from_backbone(backbone, tok)
            else:
                model = PiscoModel.from_pretrained(path, dtype=torch.float32)
        names.append(model.config.name or path)
        trained = model.config.retriever
        label = label or ("pisco_retriever" if trained else "pisco_backbone_untrained")
        # a trained retriever is read with the pooling it was trained with
        for pooling in [model.config.retriever_pooling] if trained else args.poolings:
            model.config.retriever_pooling = pooling
            docs = model.embed_documents(corpus, batch_size=args.batch_size)
            results[f"{label}_{pooling}"] = evaluate(
                lambda qs, k, docs=docs, model=model: dense_search(
                    lambda x: model.embed_queries(x, batch_size=args.batch_size), docs, qs, k
                ),
                questions,
                gold,
            )
    write(
        {
            "questions": len(questions),
            "corpus_passages": len(corpus),
            "models": names,
            "retrievers": results,
            "environment": environment(),
        },
        Path(args.out),
    )
    for name, r in results.items():
        print(name, r["metrics"], "top-10 overlap", r["top10_jaccard_under_perturbation"])
    plot(results, Path(args.out).with_suffix(".png"), len(questions), len(corpus))


def plot(results: dict, path: Path, n_questions: int, n_passages: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    names = list(results)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.2
    for i, metric in enumerate(("recall@1", "recall@5", "recall@20", "ndcg@10")):
        left.bar(
            [x + i * width for x in range(len(names))],
            [results[n]["metrics"][metric] for n in names],
            width,
            label=metric,
        )
    left.set_xticks([x + 1.5 * width for x in range(len(names))], names, rotation=20, ha="right")
    left.set_ylim(0, 1)
    left.legend()
    left.set_title(f"retrieval, {n_questions} questions, {n_passages} passages")
    right.bar(names, [results[n]["top10_jaccard_under_perturbation"] for n in names])
    right.set_ylim(0, 1)
    right.set_title("top-10 overlap under meaning-keeping perturbations")
    right.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
