"""One-call training run for an accelerator machine: dense pre-training, then distillation on
questions with a k=1 -> k=3 curriculum, then evaluation; weights and reports go to ``--out``.

    python benchmarks/accelerator_run.py --pretrain pretrain.jsonl --train-k1 train_k1.jsonl \
        --train-k3 train_k3_gold.jsonl --eval eval_k1.jsonl --eval-k5 eval_k5.jsonl \
        --out "$OUT" [--minutes 8] [--compressor first-layers:5] [--tiny]

Every phase stops on the clock (``--minutes`` in all, shared 35/35/20/10 between pre-training,
k=1, k=3 and evaluation), so the whole run fits one device call; a phase also stops at its
``--max-steps``. The model starts from the embedded SmolLM2-135M (``--tiny``: a 2-layer random
model, for the CPU test of this script). On a GPU the run uses bf16 autocast; on a CPU float32.
``--out`` receives ``model/`` (native checkpoint, float16), ``train_log_<phase>.json``,
``eval_k1.json`` / ``eval_k5.json`` (``pisco-rag eval`` reports with diagnostics) and
``run.json`` (settings, phase timings, steps, environment).

Data: the records of ``pisco-rag build-data`` (``--split train --pretraining`` for
``--pretrain``; ``--n-documents 1`` for ``--train-k1``; 3 documents with ``pisco-rag score
--scorer gold`` for ``--train-k3``) and evaluation records (``--split eval``). How to carry the
backbone and data to an offline accelerator: docs/training.md, "One call on an accelerator".
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import environment, tiny_backbone
from train_smollm2 import TimeLimit

SHARES = {"pretrain": 0.35, "k1": 0.35, "k3": 0.20}  # the rest (0.10): evaluation


def build_model(args: argparse.Namespace):
    from pisco_rag import PiscoModel
    from pisco_rag.defaults import DEFAULT_BACKBONE

    oscar = args.compressor != "pisco"
    if args.tiny:
        backbone, tok = tiny_backbone()
        compressor = "first-layers:1" if oscar else "pisco"
        return PiscoModel.from_backbone(backbone, tok, compressor=compressor, rerank_head=oscar)
    return PiscoModel.from_backbone(
        DEFAULT_BACKBONE,
        compressor=args.compressor,
        rerank_head=oscar,
        dtype=torch.float32,
        device="cuda" if torch.cuda.is_available() else "cpu",
    )


def run_phase(model, name: str, data: str, seconds: float, args, out: Path) -> dict:
    from pisco_rag.training import TrainConfig, train

    start = time.monotonic()
    config = TrainConfig(
        output_dir=str(Path(args.work_dir) / name),
        batch_size=args.batch_size,
        decoder_lr=args.decoder_lr,
        compressor_lr=args.compressor_lr,
        max_steps=args.max_steps,
        warmup_ratio=0.03,
        logging_steps=10,
        save_steps=10**9,  # only the final model: the clock, not checkpoints, bounds the run
        bf16=torch.cuda.is_available(),
        show_progress=False,
    )
    result = train(model, data, config=config, callbacks=[TimeLimit(seconds)])
    (out / f"train_log_{name}.json").write_text(json.dumps(result["log_history"], indent=2))
    return {"steps": result["global_step"], "seconds": round(time.monotonic() - start, 1)}


def evaluate(model, data: str, name: str, args, out: Path) -> dict:
    from pisco_rag.evaluation.runner import evaluate_rag, summary, write_report

    with open(data) as f:
        records = [json.loads(line) for line in f if line.strip()][: args.eval_limit]
    start = time.monotonic()
    report = evaluate_rag(model, records, show_progress=False)
    write_report(report, out / f"eval_{name}.json")
    print(summary(report), flush=True)
    return {"questions": len(records), "seconds": round(time.monotonic() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain", required=True)
    parser.add_argument("--train-k1", required=True)
    parser.add_argument("--train-k3", required=True)
    parser.add_argument("--eval", required=True, help="evaluation records, one document each")
    parser.add_argument("--eval-k5", default=None, help="evaluation records, five documents")
    parser.add_argument("--out", required=True)
    parser.add_argument("--work-dir", default="/tmp/pisco-accelerator-run")
    parser.add_argument("--minutes", type=float, default=8.0)
    parser.add_argument("--compressor", default="first-layers:5", help="pisco or first-layers:N")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument("--compressor-lr", type=float, default=1e-4)
    parser.add_argument("--max-steps", type=int, default=100_000, help="per phase")
    parser.add_argument("--eval-limit", type=int, default=400)
    parser.add_argument("--tiny", action="store_true", help="2-layer random model (CPU test)")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    budget = args.minutes * 60
    model = build_model(args)
    phases = {}
    for name, data in (("pretrain", args.pretrain), ("k1", args.train_k1), ("k3", args.train_k3)):
        phases[name] = run_phase(model, name, data, SHARES[name] * budget, args, out)
        print(f"{name}: {phases[name]}", flush=True)
    model.config.name = f"{'oscar' if model.config.is_oscar else 'pisco'}-smollm2-135m"
    model.save_pretrained(out / "model", dtype=torch.float16)
    evaluations = {"k1": evaluate(model, args.eval, "k1", args, out)}
    if args.eval_k5:
        evaluations["k5"] = evaluate(model, args.eval_k5, "k5", args, out)
    run = {"settings": vars(args), "phases": phases, "evaluations": evaluations}
    run["environment"] = environment()
    (out / "run.json").write_text(json.dumps(run, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
