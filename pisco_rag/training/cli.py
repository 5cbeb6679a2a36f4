"""Command-line training and evaluation: ``pisco-rag build-data | label | score | train | eval``.

:func:`add_train_commands` registers the subcommands on the ``pisco-rag`` parser; this module
also runs on its own (``python -m pisco_rag.training.cli ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Any

from ..cli_types import positive_int
from ..errors import PiscoError, PiscoInputError
from . import DOCUMENT_ORDERS, LR_SCHEDULES, RERANK_LOSSES


def _device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")


def _records(source: str, split: str) -> list[dict[str, Any]]:
    from .data import load_records

    return load_records(source, split=split).to_list()


def _load_model(args: argparse.Namespace, *, for_training: bool):
    import torch

    from ..model import PiscoModel

    dtype = torch.float32 if for_training else None
    if getattr(args, "from_backbone", None):
        return PiscoModel.from_backbone(
            args.from_backbone,
            compressor=args.compressor,
            compression_rate=args.compression_rate,
            rerank_head=args.rerank_head,
            rerank_interaction=args.rerank_interaction,
            memory_source=args.memory_source,
            lora_r=args.lora_r,
            device=args.device,
            dtype=dtype,
            seed=args.seed,
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default's notice: training changes the model
        model = PiscoModel.from_pretrained(
            args.model, device=args.device, dtype=dtype, backbone=args.backbone
        )
    if getattr(args, "rerank_interaction", False):
        model.add_rerank_interaction()
    return model


# ---------------------------------------------------------------------- commands
def cmd_build_data(args: argparse.Namespace) -> int:
    from .data import (
        build_bigbench_records,
        build_pretraining_records,
        default_embedder,
        write_jsonl,
    )

    if args.pretraining:
        if args.split != "train":
            raise PiscoInputError(
                "--pretraining builds from the training split: pass --split train"
            )
        from ..checkpoints import load_tokenizer

        records = build_pretraining_records(
            args.task_json,
            load_tokenizer(args.tokenizer),
            limit=args.limit,
            seed=args.seed,
        )
        write_jsonl(records, args.out)
        tasks = {t: sum(r["task"] == t for r in records) for t in ("ae", "continue")}
        print(f"{len(records)} pre-training records {tasks} -> {args.out}")
        return 0
    records = build_bigbench_records(
        args.task_json,
        args.split,
        n_documents=args.n_documents,
        limit=args.limit,
        seed=args.seed,
        pool_size=args.pool_size,
        order=args.order,
        embedder=default_embedder(device=args.device),
        show_progress=not args.quiet,
    )
    write_jsonl(records, args.out)
    print(f"{len(records)} {args.split} records ({args.n_documents} documents each) -> {args.out}")
    return 0


def cmd_label(args: argparse.Namespace) -> int:
    import torch

    from .teacher import TextTeacher, label_records

    teacher = TextTeacher(
        args.teacher,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        dtype=torch.bfloat16 if args.bf16 else None,
    )
    stats = label_records(
        _records(args.data, args.data_split),
        teacher,
        args.out,
        batch_size=args.batch_size,
        resume=not args.no_resume,
        show_progress=not args.quiet,
    )
    print(f"teacher answers: {stats['written']} written, {stats['skipped']} already in {args.out}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from .teacher import make_scorer, score_records

    stats = score_records(
        _records(args.data, args.data_split),
        make_scorer(args.scorer, device=args.device),
        args.out,
        batch_size=args.batch_size,
        resume=not args.no_resume,
        show_progress=not args.quiet,
    )
    print(f"teacher scores: {stats['written']} written, {stats['skipped']} already in {args.out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.stage == "retriever":
        return _train_retriever(args)
    from .config import TrainConfig
    from .trainer import train

    config = TrainConfig(
        output_dir=args.output,
        target_field=args.target,
        max_steps=args.max_steps,
        num_train_epochs=args.epochs,
        batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        decoder_lr=args.decoder_lr,
        compressor_lr=args.compressor_lr,
        head_lr=args.head_lr,
        weight_decay=args.weight_decay,
        warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm,
        rerank_weight=args.rerank_weight,
        rerank_loss=args.rerank_loss,
        compressor_tuning=args.compressor_tuning,
        logging_steps=args.logging_steps,
        eval_steps=args.eval_steps,
        eval_generate=args.eval_generate,
        save_steps=args.save_steps,
        save_total_limit=args.save_total_limit,
        bf16=args.bf16,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
        calibrate_memories=args.calibrate_memories,
        context_distillation=args.context_distillation,
        hidden_distillation=args.hidden_distillation,
        text_context_ratio=args.text_context_ratio,
        group_by_length=args.group_by_length,
        show_progress=not args.quiet,
        extra_args={"lr_scheduler_type": args.lr_schedule} if args.lr_schedule else {},
    )
    resume: str | bool | None = args.resume
    if resume == "latest":
        resume = True
    train_data = _records(args.data, args.data_split)
    eval_data = _records(args.eval_data, "validation") if args.eval_data else None
    model = _load_model(args, for_training=True)
    result = train(model, train_data, eval_data, config, resume_from_checkpoint=resume)
    print(
        f"trained to step {result['global_step']} (mean loss {result['train_loss']}); "
        f"model saved to {result['final']}"
    )
    return 0


def _train_retriever(args: argparse.Namespace) -> int:
    from .retriever import RetrieverConfig, train_retriever

    config = RetrieverConfig(
        output_dir=args.output,
        batch_size=args.batch_size,
        lr=args.decoder_lr,
        lr_schedule=args.lr_schedule or "constant",
        max_steps=args.max_steps if args.max_steps > 0 else 200,
        seed=args.seed,
        logging_steps=args.logging_steps,
        alignment_weight=args.alignment_weight,
        invariance_weight=args.invariance_weight,
        max_passage_tokens=args.max_passage_tokens,
        save_steps=args.save_steps,
        resume=args.resume is not None,
        gradient_checkpointing=args.gradient_checkpointing,
        show_progress=not args.quiet,
    )
    records = [dict(r) for r in _records(args.data, args.data_split)]
    model = _load_model(args, for_training=True)
    if args.retriever_pooling:
        model.config.retriever_pooling = args.retriever_pooling
    result = train_retriever(model, records, config)
    print(f"retriever trained for {config.max_steps} steps; model saved to {result['final']}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..evaluation.runner import evaluate_rag, summary, write_report

    records = _records(args.data, args.data_split)
    if args.limit:
        records = records[: args.limit]
    model = _load_model(args, for_training=False)
    report = evaluate_rag(
        model,
        records,
        modes=[m.strip() for m in args.modes.split(",") if m.strip()],
        text_adapter=args.text_adapter,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        top_n=args.top_n,
        diagnostics=not args.no_diagnostics,
        allow_train_split=args.allow_train_split,
        keep_predictions=not args.no_predictions,
        show_progress=not args.quiet,
    )
    report["data"]["source"] = str(args.data)
    report["command"] = "pisco-rag " + " ".join(sys.argv[1:])
    write_report(report, args.out)
    print(summary(report))
    print(f"report -> {args.out}")
    return 0


# ---------------------------------------------------------------------- parser
def add_train_commands(subparsers: Any) -> None:
    """Register ``build-data``, ``label``, ``score``, ``train`` and ``eval`` on a
    ``parser.add_subparsers()`` object."""
    data_help = "JSONL file, a datasets directory (save_to_disk) or a datasets name"

    def data_args(p: argparse.ArgumentParser, name: str = "data") -> None:
        p.add_argument(name, help=data_help)
        p.add_argument("--data-split", default="train", help="split of a datasets name/dir")

    def quiet(p: argparse.ArgumentParser) -> None:
        p.add_argument("--quiet", action="store_true", help="no progress bars")

    bd = subparsers.add_parser(
        "build-data",
        help="records from bigbench contextual_parametric_knowledge_conflicts (task.json)",
    )
    bd.add_argument("task_json", help="path to the task's task.json (from the bigbench sdist)")
    bd.add_argument(
        "--split",
        choices=["train", "eval"],
        required=True,
        help="train: items < 14000; eval: items >= 14000",
    )
    bd.add_argument("--out", required=True, help="output JSONL file")
    bd.add_argument(
        "--n-documents",
        type=positive_int,
        default=5,
        help="documents per question: gold + retrieved distractors (default 5)",
    )
    bd.add_argument("--limit", type=positive_int, default=None, help="random sample of the split")
    bd.add_argument(
        "--pool-size",
        type=positive_int,
        default=None,
        help="retrieve distractors from a random sample of this many passages of the split "
        "(default: all of them)",
    )
    bd.add_argument(
        "--order",
        choices=DOCUMENT_ORDERS,
        default="shuffled",
        help="documents of a record: shuffled (seeded; the gold passage anywhere) or in "
        "retrieval order (MiniLM's score, highest first, as a retriever hands them over)",
    )
    bd.add_argument(
        "--pretraining",
        action="store_true",
        help="dense pre-training records instead: auto-encoding and continuation of the "
        "training split's passages (no retrieval)",
    )
    bd.add_argument(
        "--tokenizer",
        default="embedded:smollm2-135m-instruct",
        help="with --pretraining: the tokenizer that chunks passages (the backbone's)",
    )
    bd.add_argument("--seed", type=int, default=0)
    _device_args(bd)
    quiet(bd)
    bd.set_defaults(func=cmd_build_data)

    lb = subparsers.add_parser("label", help="teacher answers (text RAG), resumable JSONL")
    data_args(lb)
    lb.add_argument(
        "--teacher",
        required=True,
        help="causal LM: embedded:smollm2-135m-instruct, a directory or a hub id",
    )
    lb.add_argument("--out", required=True, help="output JSONL (appended; resumes)")
    lb.add_argument("--batch-size", type=positive_int, default=8)
    lb.add_argument("--max-new-tokens", type=positive_int, default=64)
    lb.add_argument("--bf16", action="store_true", help="load the teacher in bfloat16")
    lb.add_argument("--no-resume", action="store_true", help="fail if --out exists")
    _device_args(lb)
    quiet(lb)
    lb.set_defaults(func=cmd_label)

    sc = subparsers.add_parser("score", help="rerank-teacher scores per document (OSCAR)")
    data_args(sc)
    sc.add_argument(
        "--scorer",
        required=True,
        help="cross-encoder:<name or path>, 'gold' (gold passage 1, others 0), 'minilm' "
        "(bi-encoder cosine) or 'lm-likelihood' (log p(question | passage) under SmolLM2); "
        "the last three run offline",
    )
    sc.add_argument("--out", required=True, help="output JSONL (appended; resumes)")
    sc.add_argument("--batch-size", type=positive_int, default=16)
    sc.add_argument("--no-resume", action="store_true", help="fail if --out exists")
    _device_args(sc)
    quiet(sc)
    sc.set_defaults(func=cmd_score)

    tr = subparsers.add_parser("train", help="distil a PISCO/OSCAR model (transformers Trainer)")
    data_args(tr)
    tr.add_argument("--eval-data", default=None, help="evaluation records (" + data_help + ")")
    tr.add_argument("--output", required=True, help="run directory: checkpoints and final/")
    tr.add_argument(
        "--model",
        default="embedded",
        help="checkpoint to start from (default: the shipped PISCO default, embedded)",
    )
    tr.add_argument("--backbone", default=None, help="override the checkpoint's base model")
    tr.add_argument(
        "--from-backbone",
        default=None,
        help="start a new model on this causal LM instead of --model",
    )
    tr.add_argument(
        "--compressor",
        default="pisco",
        help="with --from-backbone: pisco (an encoder adapter), token-mean (no network: "
        "segment means of the chunk's token embeddings), first-layers:N, or a small LM (OSCAR)",
    )
    tr.add_argument(
        "--compression-rate",
        type=positive_int,
        default=16,
        help="with --from-backbone: tokens per memory vector (16: 8 memories per 128-token chunk)",
    )
    tr.add_argument(
        "--rerank-head",
        action="store_true",
        help="with --from-backbone and an OSCAR compressor: add the reranking head",
    )
    tr.add_argument(
        "--rerank-interaction",
        action="store_true",
        help="OSCAR, first-layers compressor with a head: add the late-interaction term to its "
        "scores (query tokens matched to document tokens in the same pass; ranks with no training)",
    )
    tr.add_argument(
        "--memory-source",
        choices=["compressor", "token-mean"],
        default="compressor",
        help="with --from-backbone and an OSCAR compressor: the decoder reads the compressor's "
        "memories (OSCAR) or the chunk's token-mean ones (the compressor then only scores)",
    )
    tr.add_argument(
        "--lora-r",
        type=positive_int,
        default=16,
        help="with --from-backbone: LoRA rank of the new adapters (alpha = 2 x rank)",
    )
    tr.add_argument(
        "--compressor-tuning",
        choices=["full", "lora"],
        default="full",
        help="OSCAR compressor: fully tuned or LoRA (default full)",
    )
    tr.add_argument(
        "--target",
        choices=["label", "answer"],
        default=None,
        help="what to learn (default: teacher 'label' if present, else 'answer')",
    )
    tr.add_argument(
        "--stage",
        choices=("reader", "retriever"),
        default="reader",
        help="reader: compressor and decoder (distillation, default); retriever: the retriever "
        "adapter (alignment to MiniLM, contrastive, invariance; --decoder-lr is its rate)",
    )
    tr.add_argument("--max-steps", type=int, default=-1)
    tr.add_argument("--epochs", type=float, default=1.0)
    tr.add_argument("--batch-size", type=positive_int, default=8)
    tr.add_argument(
        "--grad-accum", type=positive_int, default=1, help="gradient accumulation steps"
    )
    tr.add_argument("--decoder-lr", type=float, default=1e-4)
    tr.add_argument("--compressor-lr", type=float, default=1e-4)
    tr.add_argument(
        "--head-lr",
        type=float,
        default=None,
        help="learning rate of the OSCAR reranking head (default: --compressor-lr); its scores "
        "need a larger one to spread apart",
    )
    tr.add_argument("--weight-decay", type=float, default=0.1)
    tr.add_argument("--warmup-ratio", type=float, default=0.05)
    tr.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=None,
        help="learning rate over the run: constant, or linear/cosine decay to zero at the last "
        "step (default: linear for the reader, after --warmup-ratio; constant for the "
        "retriever, which has no warmup)",
    )
    tr.add_argument("--max-grad-norm", type=float, default=1.0)
    tr.add_argument("--rerank-weight", type=float, default=0.05)
    tr.add_argument(
        "--rerank-loss",
        choices=RERANK_LOSSES,
        default="l2",
        help="OSCAR head against teacher_scores: l2 on the scores, or listwise (cross-entropy "
        "of the softmax over each question's documents; scale-free)",
    )
    tr.add_argument(
        "--alignment-weight",
        type=float,
        default=1.0,
        help="retriever stage: weight of the KL alignment to MiniLM's similarities",
    )
    tr.add_argument(
        "--invariance-weight",
        type=float,
        default=1.0,
        help="retriever stage: weight of the invariance term (0: none, the ablation)",
    )
    tr.add_argument(
        "--max-passage-tokens",
        type=positive_int,
        default=128,
        help="retriever stage: passages are cropped to this many tokens for training",
    )
    tr.add_argument(
        "--retriever-pooling",
        choices=("mean", "last"),
        default=None,
        help="retriever stage: pooling of a new retriever adapter (default: the model's)",
    )
    tr.add_argument("--logging-steps", type=positive_int, default=10)
    tr.add_argument("--eval-steps", type=positive_int, default=None)
    tr.add_argument(
        "--eval-generate",
        type=int,
        default=0,
        help="at each evaluation, also answer this many eval records (Match)",
    )
    tr.add_argument("--save-steps", type=positive_int, default=500)
    tr.add_argument("--save-total-limit", type=positive_int, default=3)
    tr.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bf16 autocast (default: on CUDA with bf16 support)",
    )
    tr.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: a third more compute, much less "
        "memory (larger batches); both stages",
    )
    tr.add_argument(
        "--calibrate-memories",
        action="store_true",
        help="standardise memories per dimension before training, measured on the first "
        "training documents (PiscoModel.calibrate_memories); for new models (--from-backbone)",
    )
    tr.add_argument(
        "--context-distillation",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="weight of the KL to the backbone reading the documents as text, on every "
        "position after the context (question and answer); 0: off",
    )
    tr.add_argument(
        "--hidden-distillation",
        type=float,
        default=0.0,
        metavar="WEIGHT",
        help="weight of the distance to that text reader's hidden states there (every 4th "
        "layer); 0: off",
    )
    tr.add_argument(
        "--text-context-ratio",
        type=float,
        default=0.0,
        metavar="SHARE",
        help="share of QA records the decoder reads as text instead of memories, so that its "
        "adapter keeps reading text well (e.g. 0.2; only records of at most two chunks); 0: none",
    )
    tr.add_argument(
        "--group-by-length",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="batch records whose decoder rows have about the same length (less padding: text "
        "rows, auto-encoding rows and memory rows do not pad each other); default on",
    )
    tr.add_argument(
        "--resume",
        default=None,
        metavar="CHECKPOINT",
        help="a checkpoint-N directory, or 'latest' in --output; retriever stage: any value "
        "goes on from --output's retriever checkpoint (a larger --max-steps extends a run)",
    )
    tr.add_argument("--seed", type=int, default=0)
    _device_args(tr)
    quiet(tr)
    tr.set_defaults(func=cmd_train)

    ev = subparsers.add_parser(
        "eval", help="text RAG vs compressed RAG (and OSCAR reranking) -> JSON report"
    )
    data_args(ev)
    ev.add_argument("--model", default="embedded", help="checkpoint directory, hub id, embedded")
    ev.add_argument("--backbone", default=None, help="override the checkpoint's base model")
    ev.add_argument("--out", required=True, help="JSON report path")
    ev.add_argument("--limit", type=positive_int, default=None, help="first N records")
    ev.add_argument(
        "--modes",
        default="text,text_decoder,compressed",
        help="comma list: text (plain backbone, or --text-adapter), text_decoder (text read "
        "with the decoder adapter), compressed",
    )
    ev.add_argument(
        "--no-diagnostics",
        action="store_true",
        help="skip the gold-answer NLL diagnostics (text / memories / no context)",
    )
    ev.add_argument(
        "--text-adapter",
        choices=["none", "decoder"],
        default="none",
        help="text RAG reads with the plain backbone (none) or the decoder adapter",
    )
    ev.add_argument(
        "--top-n",
        type=positive_int,
        default=None,
        help="OSCAR: also answer from the top-n documents of each ranking",
    )
    ev.add_argument("--max-new-tokens", type=positive_int, default=32)
    ev.add_argument("--batch-size", type=positive_int, default=8)
    ev.add_argument(
        "--allow-train-split",
        action="store_true",
        help="evaluate records marked split=train (normally refused)",
    )
    ev.add_argument("--no-predictions", action="store_true", help="omit per-item predictions")
    _device_args(ev)
    quiet(ev)
    ev.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pisco-rag", description=__doc__)
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ModuleNotFoundError, PiscoError, PiscoInputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["add_train_commands", "build_parser", "main"]
