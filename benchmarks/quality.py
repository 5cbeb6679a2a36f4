"""Answer quality on the evaluation split, in one run on one backbone: text RAG against PISCO
and OSCAR compressed RAG at several k, and the framework's default prompt against the PISCO
prompt.

    python benchmarks/quality.py --eval eval10.jsonl [--limit 100] [--ks 5 10] \
        [--pisco embedded] [--oscar pisco_rag/weights/oscar-smollm2-135m]
    python benchmarks/quality.py --tiny --eval tiny.jsonl --ks 2 --out /tmp/q.json  # smoke test

``--eval``: records from ``pisco-rag build-data --split eval --n-documents 10``; for each k the
reader sees the gold passage and the k-1 best-retrieved distractors, in the record's order.
Text RAG reads with the plain backbone (adapters off), the usual baseline; PISCO reads memories
compressed without the question, OSCAR memories compressed with it (compression timed).
The prompt comparison (at ``--prompt-k``) puts LlamaIndex's default QA template
(``DEFAULT_TEXT_QA_PROMPT_TMPL``, what a query engine sends by default) around the same
documents, as text and as memory tags, against the PISCO prompt the decoder was trained on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, environment, load_model, read_eval_records, subset_documents, write

from pisco_rag.defaults import SHIPPED_MODELS
from pisco_rag.evaluation.metrics import answer_metrics
from pisco_rag.evaluation.runner import evaluate_rag

SHIPPED_OSCAR = SHIPPED_MODELS["embedded-oscar"]


def load_models(args):
    """(PISCO model, OSCAR model or None)."""
    from pisco_rag import PiscoModel

    if args.tiny:
        return load_model(True, "cpu"), load_model(
            True, "cpu", compressor="first-layers:1", rerank_head=True
        )
    pisco = PiscoModel.from_pretrained(args.pisco, device=args.device)
    oscar = PiscoModel.from_pretrained(args.oscar, device=args.device) if args.oscar else None
    return pisco, oscar


def framework_prompt_answers(model, records, *, compressed: bool, args) -> dict:
    """Answers with LlamaIndex's default QA template, documents as text or as memory tags."""
    from llama_index.core.prompts.default_prompts import DEFAULT_TEXT_QA_PROMPT_TMPL

    start = time.perf_counter()
    prompts = []
    for r in records:
        if compressed:
            memories = model.compress(r["documents"], show_progress=False)
            context = "\n\n".join(model.tags(memories))
        else:
            context = "\n\n".join(r["documents"])
        user = DEFAULT_TEXT_QA_PROMPT_TMPL.format(context_str=context, query_str=r["question"])
        prompts.append([{"role": "user", "content": user}])
    answers = []
    for b in range(0, len(prompts), args.batch_size):
        answers += model.complete(
            prompts[b : b + args.batch_size],
            max_new_tokens=args.max_new_tokens,
            adapter="decoder" if compressed else "none",
        )
    preds = [a.text for a in answers]
    return {
        "metrics": answer_metrics(preds, [r["answer"] for r in records]),
        "seconds": round(time.perf_counter() - start, 3),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = ["text", "pisco", "oscar"]
    ks = list(result["by_k"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(systems)
    for j, system in enumerate(systems):
        values = [result["by_k"][k].get(system, {}).get("metrics", {}).get("match") for k in ks]
        xs = [i + j * width for i, v in enumerate(values) if v is not None]
        left.bar(xs, [v for v in values if v is not None], width, label=system)
    left.set_xticks([i + width for i in range(len(ks))], [f"k={k}" for k in ks])
    left.set_ylabel("Match")
    left.set_title("Answers: text RAG vs compressed")
    left.legend()
    prompts = result["prompts"]
    names = list(prompts)
    for j, system in enumerate(["text", "pisco"]):
        values = [prompts[n][system]["metrics"]["match"] for n in names]
        right.bar([i + j * 0.4 for i in range(len(names))], values, 0.4, label=system)
    right.set_xticks([i + 0.2 for i in range(len(names))], names)
    right.set_title(f"Prompt (k={result['settings']['prompt_k']})")
    right.legend()
    fig.suptitle(result["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval", required=True, help="evaluation records (JSONL, split eval)")
    p.add_argument("--limit", type=int, default=100, help="first N records")
    p.add_argument("--ks", type=int, nargs="+", default=[5, 10])
    p.add_argument("--prompt-k", type=int, default=5)
    p.add_argument("--pisco", default="embedded", help="PISCO checkpoint (default: embedded)")
    p.add_argument(
        "--oscar",
        default=str(SHIPPED_OSCAR) if (SHIPPED_OSCAR / "config.json").is_file() else None,
        help="OSCAR checkpoint (default: the shipped one, if present)",
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--tiny", action="store_true", help="tiny random models (smoke test)")
    p.add_argument("--out", type=Path, default=RESULTS / "quality.json")
    args = p.parse_args()

    records = read_eval_records(args.eval, args.limit)
    pisco, oscar = load_models(args)
    common = {
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "keep_predictions": False,
        "show_progress": True,
    }
    by_k: dict[str, dict] = {}
    for k in args.ks:
        recs = [subset_documents(r, k) for r in records]
        print(f"k={k}: text RAG, PISCO{', OSCAR' if oscar else ''} on {len(recs)} questions")
        rows = {}
        rows["text"] = evaluate_rag(pisco, recs, modes=["text"], **common)["text"]
        rows["pisco"] = evaluate_rag(pisco, recs, modes=["compressed"], **common)["compressed"]
        if oscar is not None:
            report = evaluate_rag(oscar, recs, modes=["compressed"], **common)
            rows["oscar"] = report["compressed"]
            rows["oscar_reranking"] = report.get("reranking")
        text_match = rows["text"]["metrics"]["match"]
        rows["match_vs_text"] = {
            s: (rows[s]["metrics"]["match"] / text_match if text_match else None)
            for s in ("pisco", "oscar")
            if s in rows
        }
        by_k[str(k)] = rows

    recs = [subset_documents(r, args.prompt_k) for r in records]
    default_prompt = {
        "text": framework_prompt_answers(pisco, recs, compressed=False, args=args),
        "pisco": framework_prompt_answers(pisco, recs, compressed=True, args=args),
    }
    pisco_prompt = by_k.get(str(args.prompt_k)) or {
        "text": evaluate_rag(pisco, recs, modes=["text"], **common)["text"],
        "pisco": evaluate_rag(pisco, recs, modes=["compressed"], **common)["compressed"],
    }
    result = {
        "benchmark": "quality",
        "title": (
            f"{pisco.config.name} vs text RAG on {pisco.config.backbone}, "
            f"{len(records)} eval questions, greedy, {args.max_new_tokens} new tokens"
        ),
        "data": {"file": str(args.eval), "n": len(records)},
        "models": {"pisco": pisco.info(), "oscar": oscar.info() if oscar else None},
        "settings": {
            "ks": args.ks,
            "prompt_k": args.prompt_k,
            "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size,
        },
        "by_k": by_k,
        "prompts": {
            "pisco_prompt": {s: pisco_prompt[s] for s in ("text", "pisco")},
            "llamaindex_default_prompt": default_prompt,
        },
        "environment": environment(),
    }
    write(result, args.out)
    plot(result, args.out.with_suffix(".png"))
    print(
        json.dumps(
            {
                k: {s: v["metrics"] for s, v in r.items() if "metrics" in (v or {})}
                for k, r in by_k.items()
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
