"""A short distillation run on SmolLM2-135M (the embedded PISCO default) and an evaluation of
text RAG vs compressed RAG before and after it, written as one JSON file.

    python benchmarks/train_smollm2.py --train train.jsonl --eval eval.jsonl \
        [--train-documents 2] [--max-steps 50] [--time-limit 900] [--eval-limit 100]

``--train`` / ``--eval``: records from ``pisco-rag build-data`` (train: split train, eval:
split eval). ``--train-documents N`` keeps, per training record, the gold passage and the
N-1 best-retrieved distractors (their order unchanged): CPU training is slow. The target is
the gold ``answer`` unless the records carry teacher ``label``s. The trained weights are written
under ``--work-dir`` (not to the repository).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import RESULTS, environment, subset_documents, write
from transformers import TrainerCallback


class TimeLimit(TrainerCallback):
    """Stop training (after the current step) once ``seconds`` have passed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True
            control.should_save = True


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--train-documents", type=int, default=2)
    p.add_argument("--eval-limit", type=int, default=100)
    p.add_argument("--max-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--time-limit", type=float, default=900, help="seconds of training at most")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--device", default=None)
    p.add_argument("--work-dir", default=None, help="where checkpoints go (default: a temp dir)")
    p.add_argument("--out", type=Path, default=RESULTS / "training_smollm2_cpu.json")
    args = p.parse_args()

    from pisco_rag import PiscoModel
    from pisco_rag.evaluation.runner import evaluate_rag, summary
    from pisco_rag.training import TrainConfig, train
    from pisco_rag.training.data import read_jsonl

    train_records = read_jsonl(args.train)[: args.train_limit]
    if any(r.get("split") != "train" for r in train_records):
        raise SystemExit("--train must hold split=train records only")
    train_records = [subset_documents(r, args.train_documents) for r in train_records]
    eval_records = read_jsonl(args.eval)[: args.eval_limit]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PiscoModel.from_pretrained("embedded", device=args.device, dtype=torch.float32)
    eval_kw = dict(max_new_tokens=args.max_new_tokens, batch_size=8, show_progress=True)
    t0 = time.perf_counter()
    before = evaluate_rag(model, eval_records, modes=["text", "compressed"], **eval_kw)
    print(summary(before), flush=True)
    eval_before_s = time.perf_counter() - t0

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="pisco-train-"))
    target = "label" if all("label" in r for r in train_records) else "answer"
    config = TrainConfig(
        output_dir=str(work),
        target_field=target,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        decoder_lr=args.lr,
        compressor_lr=args.lr,
        logging_steps=1,
        save_steps=10_000,
        save_total_limit=1,
    )
    t0 = time.perf_counter()
    result = train(model, train_records, config=config, callbacks=[TimeLimit(args.time_limit)])
    train_s = time.perf_counter() - t0
    after = evaluate_rag(model, eval_records, modes=["compressed"], **eval_kw)
    print(summary(after), flush=True)

    losses = [
        {"step": h["step"], "loss": round(h["loss"], 4), "lr": h["learning_rate"]}
        for h in result["log_history"]
        if "loss" in h
    ]
    write(
        {
            "what": "PISCO distillation smoke run on SmolLM2-135M-Instruct (CPU), then text vs "
            "compressed RAG on bigbench contextual_parametric_knowledge_conflicts eval items",
            "environment": environment(),
            "data": {
                "train_file": str(args.train),
                "eval_file": str(args.eval),
                "train_records": len(train_records),
                "train_records_seen": result["global_step"] * args.batch_size,
                "train_documents_per_question": args.train_documents,
                "eval_records": len(eval_records),
                "eval_documents_per_question": before["data"]["documents_per_question"],
                "target": target,
            },
            "training": {
                "steps": result["global_step"],
                "batch_size": args.batch_size,
                "lr": args.lr,
                "seconds": round(train_s, 1),
                "loss_curve": losses,
            },
            "eval_before_training": {k: before[k] for k in ("text", "compressed")},
            "eval_after_training": {"compressed": after["compressed"]},
            "eval_seconds_before": round(eval_before_s, 1),
            "sample_predictions_after": after["predictions"][:10],
            "sample_predictions_before": before["predictions"][:10],
            "note": "text RAG reads with the plain backbone (adapters disabled), so training "
            "does not change it; it is measured once.",
        },
        args.out,
    )


if __name__ == "__main__":
    main()
