"""Evaluation records with fewer documents, cut from records built with more: the gold passage
plus the k-1 distractors the first-stage retriever scored highest, in the records' order.

    pisco-rag build-data task.json --split eval --n-documents 10 --limit 400 --out eval10.jsonl
    python benchmarks/eval_subsets.py eval10.jsonl --ks 1 5 --limit 200   # eval_k1.jsonl, ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pisco_rag.training.data import read_jsonl, write_jsonl


def subset(record: dict, k: int) -> dict:
    gold = record["gold_index"]
    scores = record["retrieval_scores"]
    others = sorted((i for i in range(len(scores)) if i != gold), key=lambda i: -scores[i])
    keep = sorted([gold, *others[: k - 1]])
    return {
        **record,
        "documents": [record["documents"][i] for i in keep],
        "retrieval_scores": [scores[i] for i in keep],
        "gold_index": keep.index(gold),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", help="evaluation JSONL with gold_index and retrieval_scores")
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--limit", type=int, default=None, help="first N records")
    args = parser.parse_args()
    records = read_jsonl(args.records)[: args.limit]
    for k in args.ks:
        out = Path(args.records).with_name(f"eval_k{k}.jsonl")
        write_jsonl([subset(r, k) for r in records], out)
        print(f"{len(records)} records with {k} documents -> {out}")


if __name__ == "__main__":
    main()
