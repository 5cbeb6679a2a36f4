"""Reranking quality on the evaluation split: the OSCAR head's order against the first-stage
(all-MiniLM-L6-v2) order and, where one is available, a cross-encoder teacher's.

    python benchmarks/reranking.py --eval eval10.jsonl [--limit 200] \
        [--oscar pisco_rag/weights/oscar-smollm2-135m] [--cross-encoder DIR_OR_NAME] \
        [--teacher lm-likelihood]
    python benchmarks/reranking.py --tiny --eval tiny.jsonl --out /tmp/r.json  # smoke test

Each record holds its gold passage among MiniLM-retrieved distractors (``pisco-rag
build-data --n-documents 10``); the metrics are recall@1, recall@5, nDCG@5 and MRR of the gold
passage. The head's scores come from the compression pass itself (query-aware memories and
scores at once), timed here. ``--teacher lm-likelihood`` ranks with the offline rerank teacher of
``pisco-rag score --scorer lm-likelihood`` too (log p(question | passage) under the plain
SmolLM2), so that the teachers a head can be trained on are compared with it in one run.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, environment, load_model, read_eval_records, write
from quality import SHIPPED_OSCAR

from pisco_rag.evaluation.runner import first_stage_ranking, ranking_metrics

KS = (1, 5)


def order(scores: list[float]) -> list[int]:
    return sorted(range(len(scores)), key=lambda i: (-scores[i], i))


def oscar_rankings(model, records) -> tuple[list[list[int]], float]:
    """The head's ranking of each record's documents, and the seconds it took."""
    start = time.perf_counter()
    rankings = []
    for r in records:
        ranked = model.rerank(r["question"], r["documents"])
        rankings.append([x.index for x in ranked])
    return rankings, time.perf_counter() - start


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["recall@1", "recall@5", "ndcg@5", "mrr"]
    systems = [s for s, v in result["rankers"].items() if "metrics" in v]
    width = 0.8 / len(systems)
    fig, ax = plt.subplots(figsize=(8, 4))
    for j, s in enumerate(systems):
        values = [result["rankers"][s]["metrics"][m] for m in metrics]
        ax.bar([i + j * width for i in range(len(metrics))], values, width, label=s)
    ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(metrics))], metrics)
    ax.set_ylim(0, 1)
    ax.set_title(result["title"], fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval", required=True, help="evaluation records (JSONL, split eval)")
    p.add_argument("--limit", type=int, default=200, help="first N records")
    p.add_argument(
        "--oscar",
        default=str(SHIPPED_OSCAR) if (SHIPPED_OSCAR / "config.json").is_file() else None,
        help="OSCAR checkpoint with a reranking head (default: the shipped one)",
    )
    p.add_argument("--cross-encoder", default=None, help="a local sentence-transformers model")
    p.add_argument(
        "--teacher",
        action="append",
        default=[],
        choices=["lm-likelihood"],
        help="also rank with this offline rerank teacher (repeatable; MiniLM's order is always in)",
    )
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS / "reranking.json")
    args = p.parse_args()

    from pisco_rag import PiscoModel

    records = read_eval_records(args.eval, args.limit)
    missing = [r.get("id") for r in records if r.get("gold_index") is None]
    if missing:
        raise SystemExit(f"records without gold_index (e.g. {missing[0]!r}): nothing to measure")
    if args.tiny:
        model = load_model(True, "cpu", compressor="first-layers:1", rerank_head=True)
    elif args.oscar:
        model = PiscoModel.from_pretrained(args.oscar, device=args.device)
    else:
        raise SystemExit("--oscar: no OSCAR checkpoint given and none shipped")
    if not model.config.rerank_head:
        raise SystemExit(f"--oscar {args.oscar}: this model has no reranking head")
    gold = [r["gold_index"] for r in records]

    rankers: dict[str, dict] = {}
    first = [first_stage_ranking(r) for r in records]
    rankers["minilm_first_stage"] = {"metrics": ranking_metrics(first, gold, KS)}
    rng = random.Random(0)
    shuffled = [rng.sample(range(len(r["documents"])), len(r["documents"])) for r in records]
    rankers["random"] = {"metrics": ranking_metrics(shuffled, gold, KS)}
    oscar, seconds = oscar_rankings(model, records)
    rankers["oscar_head"] = {
        "metrics": ranking_metrics(oscar, gold, KS),
        "seconds": round(seconds, 3),
        "note": "scores from the compression pass (memories included)",
    }
    if args.cross_encoder:
        from pisco_rag.training.teacher import CrossEncoderScorer

        start = time.perf_counter()
        scores = CrossEncoderScorer(args.cross_encoder, device=args.device)(records)
        rankers["cross_encoder"] = {
            "name": args.cross_encoder,
            "metrics": ranking_metrics([order(s) for s in scores], gold, KS),
            "seconds": round(time.perf_counter() - start, 3),
        }
    else:
        rankers["cross_encoder"] = {
            "note": "not measured: no cross-encoder given (--cross-encoder); none is reachable "
            "on a machine without a model hub"
        }
    for spec in args.teacher:
        from pisco_rag.training.teacher import QuestionLikelihoodScorer, make_scorer

        start = time.perf_counter()
        # --tiny: the tiny model's own backbone reads the passages (no download, no SmolLM2)
        scorer = QuestionLikelihoodScorer(model) if args.tiny else make_scorer(spec)
        scores = scorer(records)
        rankers[f"teacher_{spec.replace('-', '_')}"] = {
            "metrics": ranking_metrics([order(s) for s in scores], gold, KS),
            "seconds": round(time.perf_counter() - start, 3),
            "note": f"the rerank teacher of `pisco-rag score --scorer {spec}`",
        }
    result = {
        "benchmark": "reranking",
        "title": (
            f"{model.config.name}: gold passage among "
            f"{sum(len(r['documents']) for r in records) / len(records):.0f} MiniLM-retrieved, "
            f"{len(records)} eval questions"
        ),
        "model": model.info(),
        "data": {"file": str(args.eval), "n": len(records)},
        "rankers": rankers,
        "environment": environment(),
    }
    write(result, args.out)
    plot(result, args.out.with_suffix(".png"))
    print(json.dumps({k: v.get("metrics") for k, v in rankers.items()}, indent=1))


if __name__ == "__main__":
    main()
