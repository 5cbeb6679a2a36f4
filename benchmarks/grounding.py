"""Grounded answers, measured on stored evaluation reports: Match and F1 of each mode's answers
as decoded and once aligned to the closest span of the documents they were read from, over a
range of similarity thresholds; how many right answers grounding makes wrong.

    python benchmarks/grounding.py REPORT.json RECORDS.jsonl [REPORT RECORDS ...] --out OUT

Grounding is string alignment on the answers a report keeps (``predictions``), so no model runs
here: the numbers are those the same answers get with ``ground_answers=True``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, environment, write

THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
MODES = ("text", "text_decoder", "compressed")


def grounding_rows(report: dict, records: list[dict]) -> dict:
    """Per mode: metrics as decoded, and per threshold the grounded metrics and the number of
    answers that matched before grounding and no longer do."""
    from pisco_rag.evaluation.metrics import answer_metrics, answer_sources, match
    from pisco_rag.grounding import MIN_SIMILARITY, ground_answer

    records_by_id = {r.get("id", i): r for i, r in enumerate(records)}
    documents = {k: r["documents"] for k, r in records_by_id.items()}
    predictions = report["predictions"]
    labels = [p["answer"] for p in predictions]
    out = {}
    for mode in (m for m in MODES if m in predictions[0]):
        answers = [p[mode] for p in predictions]
        docs = [documents[p["id"]] for p in predictions]
        row = {"as_decoded": answer_metrics(answers, labels), "grounded": {}}
        by_threshold = {}
        for t in THRESHOLDS:
            grounded = [ground_answer(a, d, min_similarity=t) for a, d in zip(answers, docs)]
            lost = sum(match(a, y) > match(g, y) for a, g, y in zip(answers, grounded, labels))
            row["grounded"][str(t)] = {**answer_metrics(grounded, labels), "matches_lost": lost}
            by_threshold[t] = grounded
        # where the answers still wrong at the default threshold come from (answer_sources:
        # the gold passage, only another passage, or none), as counts
        gold = [records_by_id[p["id"]].get("gold_index") for p in predictions]
        wrong = [
            i
            for i, (g, y) in enumerate(zip(by_threshold[MIN_SIMILARITY], labels))
            if not match(g, y)
        ]
        if wrong and all(isinstance(g, int) for g in gold):
            shares = answer_sources(
                [by_threshold[MIN_SIMILARITY][i] for i in wrong],
                [predictions[i]["question"] for i in wrong],
                [docs[i] for i in wrong],
                [gold[i] for i in wrong],
            )
            row["wrong_after_grounding"] = {k: round(v * len(wrong)) for k, v in shares.items()}
        out[mode] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pairs", nargs="+", help="REPORT.json RECORDS.jsonl, one pair or more")
    parser.add_argument("--out", default=str(RESULTS / "grounding.json"))
    args = parser.parse_args()
    if len(args.pairs) % 2:
        parser.error("give each report with the records it was made from: REPORT RECORDS ...")
    results = {}
    for report_path, records_path in zip(args.pairs[::2], args.pairs[1::2]):
        report = json.loads(Path(report_path).read_text())
        with open(records_path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        results[Path(report_path).name] = {
            "records": Path(records_path).name,
            "questions": len(report["predictions"]),
            "model": report["model"].get("name"),
            "modes": grounding_rows(report, records),
        }
        for mode, row in results[Path(report_path).name]["modes"].items():
            shown = " ".join(
                f"{t}:{g['match']:.3f}/-{g['matches_lost']}" for t, g in row["grounded"].items()
            )
            print(f"{Path(report_path).name} {mode}: {row['as_decoded']['match']:.3f} -> {shown}")
    result = {"environment": environment(), "thresholds": list(THRESHOLDS), "reports": results}
    write(result, Path(args.out))


if __name__ == "__main__":
    main()
