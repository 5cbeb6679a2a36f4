"""The pisco-rag command: ask a folder a question, precompute memories, show model info."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings

from .cli_types import existing_folder, positive_int, question_text
from .defaults import UNTRAINED_NOTICE, model_notice
from .verbosity import set_verbose


def _load_model(args: argparse.Namespace):
    from .model import PiscoModel
    from .stores import SQLiteMemoryStore

    store = SQLiteMemoryStore(args.store) if getattr(args, "store", None) else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model's notice is printed below, once
        model = PiscoModel.from_pretrained(
            args.model, device=args.device, store=store, backbone=args.backbone
        )
    notice = model_notice(model.config)
    if notice and not getattr(args, "text", False):  # --text reads with the plain backbone
        print(f"NOTE: {notice}\n", file=sys.stderr)
    return model


def _chunks(model, folder: str):
    from .documents import Chunk, read_folder

    files = read_folder(folder)
    return [
        Chunk(path, i, c) for path, text in files.items() for i, c in enumerate(model.chunk(text))
    ]


def cmd_ask(args: argparse.Namespace) -> int:
    from .documents import DenseRetriever
    from .grounding import ground_answer

    model = _load_model(args)
    chunks = _chunks(model, args.folder)
    if args.retriever == "pisco":
        retriever = DenseRetriever.from_pisco(model)
    else:
        retriever = DenseRetriever(device="cpu")
    retriever.add(chunks, show_progress=len(chunks) > 64)
    reranking = model.config.rerank_head and not args.text
    hits = retriever.search(args.question, args.retrieve_k if reranking else args.top_k)
    texts = [c.text for c, _ in hits]
    if args.text:
        mode = "text"
        answer = model.generate_from_text(
            [args.question], [texts], adapter="none", max_new_tokens=args.max_new_tokens
        )[0]
    else:
        if reranking:  # OSCAR: scores and query-dependent memories in one pass
            ranked = model.rerank(args.question, texts, top_n=args.top_k)
            hits = [(hits[r.index][0], r.score) for r in ranked]
            memories = [m for r in ranked for m in r.memories]
            mode = f"OSCAR, {len(texts)} retrieved, {len(ranked)} reranked and compressed"
        else:
            queries = [args.question] * len(texts) if model.config.is_oscar else None
            memories = model.compress(texts, queries=queries, show_progress=len(texts) > 16)
            mode = f"{len(texts)} compressed chunks"
        if args.decoder != "torch":
            model.set_decoding_backend("llama.cpp", weights=args.decoder.partition(":")[2] or "f32")
        answer = model.generate([args.question], [memories], max_new_tokens=args.max_new_tokens)[0]
        if not args.no_ground:
            decoded, answer = answer, ground_answer(answer, texts)
            if answer != decoded:
                mode += f", aligned to a passage span from {decoded!r}"
    print(f"Answer ({mode}): {answer}\n\nSources:")
    for rank, (chunk, score) in enumerate(hits, 1):
        snippet = " ".join(chunk.text.split())[:100]
        print(f"  {rank}. {chunk.source} [chunk {chunk.index}] score={score:.3f}  {snippet}")
    return 0


def _legacy_compress(args: argparse.Namespace) -> bool:
    """The original in-process path: one folder of text files into a SQLite store."""
    return (
        not args.ray
        and args.format == "sqlite"
        and args.dtype is None
        and len(args.folder) == 1
        and os.path.isdir(args.folder[0])
    )


def cmd_compress_corpus(args: argparse.Namespace) -> int:
    from .corpus import ModelLoader, compress_corpus

    if args.ray and args.ray_address:
        import ray

        ray.init(address=args.ray_address)
    vectors = args.vectors if args.vectors is not None else args.format == "lance"
    if vectors and args.format == "sqlite":
        from .errors import PiscoInputError

        raise PiscoInputError("--vectors needs --format lance or parquet")
    result = compress_corpus(
        args.folder,
        args.store,
        model=ModelLoader(args.model, backbone=args.backbone, device=args.device),
        format=args.format,
        dtype=args.dtype,
        embedder="minilm" if vectors else None,
        engine="ray" if args.ray else "local",
        num_workers=args.workers,
        num_gpus_per_worker=args.gpus_per_worker,
        batch_size=args.batch_size,
        text_field=args.text_field,
        show_progress=not args.quiet,
    )
    if not result.model_trained:
        print(f"NOTE: {UNTRAINED_NOTICE}\n", file=sys.stderr)
    print(result.summary())
    for bad in result.bad_inputs:
        print(f"  skipped {bad}")
    for failure in result.failures[:20]:
        print(f"  failed {failure}")
    return 0 if not result.failed else 1


def cmd_compress(args: argparse.Namespace) -> int:
    if not _legacy_compress(args):
        return cmd_compress_corpus(args)
    args.folder = args.folder[0]
    model = _load_model(args)
    if model.config.is_oscar:
        from .errors import PiscoInputError

        raise PiscoInputError(
            "--model is an OSCAR model: it compresses at query time, conditioned on the "
            "question, so there is nothing to precompute; use a PISCO model here"
        )
    chunks = _chunks(model, args.folder)
    before = len(model.store)
    model.compress(
        [c.text for c in chunks], show_progress=not args.quiet, batch_size=args.batch_size
    )
    added = len(model.store) - before
    print(
        f"{len(chunks)} chunks from {args.folder}: {added} compressed, "
        f"{len(chunks) - added} already stored; store {args.store} holds {len(model.store)}"
    )
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    model = _load_model(args)
    print(json.dumps(model.info(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pisco-rag", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model",
            default="embedded",
            help="checkpoint directory, hub id, or 'embedded' (default)",
        )
        p.add_argument("--backbone", default=None, help="override the checkpoint's base model")
        p.add_argument("--device", default=None, help="cpu, cuda, mps (default: best available)")
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="show loading details (transformers messages, progress bars, INFO logs)",
        )

    ask = sub.add_parser("ask", help="answer a question over a folder of .txt/.md files")
    ask.add_argument("folder", type=existing_folder, help="a folder of .txt/.md files")
    ask.add_argument("question", type=question_text)
    ask.add_argument("--top-k", type=positive_int, default=5, help="chunks read (default 5)")
    ask.add_argument(
        "--retriever",
        choices=("minilm", "pisco"),
        default="minilm",
        help="who retrieves: all-MiniLM-L6-v2 (default) or the model's own retriever (one "
        "backbone for retrieval, compression and answers)",
    )
    ask.add_argument(
        "--retrieve-k",
        type=positive_int,
        default=20,
        help="chunks retrieved before reranking, for models with a reranking head (default 20)",
    )
    ask.add_argument("--max-new-tokens", type=positive_int, default=64)
    ask.add_argument(
        "--decoder",
        choices=("torch", "llama.cpp", "llama.cpp:f16", "llama.cpp:q8_0", "llama.cpp:q4_1"),
        default="torch",
        help="who decodes the answer from memories: torch (default) or llama.cpp (much faster "
        "on CPUs; f32 weights give the torch answers; needs pisco-rag[llama-cpp])",
    )
    ask.add_argument("--store", default=None, help="SQLite memory store to read and fill")
    ask.add_argument(
        "--no-ground",
        action="store_true",
        help="print the answer as decoded from memories, without aligning a short answer to "
        "the closest span of the retrieved chunks (pisco_rag.grounding)",
    )
    ask.add_argument(
        "--text",
        action="store_true",
        help="read the retrieved chunks as text with the plain backbone (text-RAG baseline)",
    )
    model_args(ask)
    ask.set_defaults(func=cmd_ask)

    comp = sub.add_parser(
        "compress",
        help="precompute the memories of a folder or corpus (text, JSONL, Parquet) into a store",
    )
    comp.add_argument(
        "folder",
        nargs="+",
        help="folders (searched for .txt/.md/.jsonl/.parquet) or files of documents",
    )
    comp.add_argument(
        "--store",
        required=True,
        help="output: SQLite store file (--format sqlite) or directory (parquet, lance)",
    )
    comp.add_argument("--batch-size", type=positive_int, default=16, help="chunks per forward pass")
    comp.add_argument("--quiet", action="store_true", help="no progress bar")
    comp.add_argument(
        "--ray",
        action="store_true",
        help="run on Ray Data (pip install 'pisco-rag[ray]'): the current cluster, or a local one",
    )
    comp.add_argument("--ray-address", default=None, help="Ray cluster to join (with --ray)")
    comp.add_argument(
        "--workers", type=positive_int, default=1, help="compressing actors (with --ray)"
    )
    comp.add_argument(
        "--gpus-per-worker", type=float, default=0.0, help="GPUs per actor (with --ray)"
    )
    comp.add_argument(
        "--format",
        choices=["sqlite", "parquet", "lance"],
        default="sqlite",
        help="SQLite store (default), Parquet shards, or a LanceDB table",
    )
    comp.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16", "int8"],
        default=None,
        help="stored vector type (default: as computed); float16 halves the size",
    )
    comp.add_argument(
        "--vectors",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="store MiniLM retrieval vectors beside the memories (default: on for lance)",
    )
    comp.add_argument("--text-field", default="text", help="JSONL/Parquet text field")
    model_args(comp)
    comp.set_defaults(func=cmd_compress)

    from .training.cli import add_train_commands

    add_train_commands(sub)

    info = sub.add_parser("info", help="model, fingerprint, device and dtype")
    model_args(info)
    info.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    args = build_parser().parse_args(argv)
    set_verbose(getattr(args, "verbose", False))
    try:
        return args.func(args)
    except BrokenPipeError:  # `pisco-rag ask ... | head -1`: the reader left, not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except (FileNotFoundError, ModuleNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .errors import PiscoError

        if isinstance(e, PiscoError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
