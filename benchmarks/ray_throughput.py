"""Corpus compression on Ray Data: documents per second with 1 and 2 compressing workers
(actors), against ``PiscoModel.compress`` in one process on one thread.

Each run compresses the same synthetic corpus (JSONL shards, one chunk per document) into a
fresh SQLite store, on a local Ray cluster of ``--num-cpus`` CPUs, one CPU per worker.
``documents_per_second`` is end to end (cluster already up; model loads in the workers
included); ``documents_per_second_after_startup`` is ``(N - n) / (t(N) - t(n))`` from a run on
the corpus (N documents) and one on ``--warmup-documents`` (n), which leaves startup out.

    python benchmarks/ray_throughput.py      # SmolLM2-135M: results/ray_throughput.json
    python benchmarks/ray_throughput.py --tiny --documents 6 --warmup-documents 0 --workers 1 \
        --num-cpus 1 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, environment, tiny_backbone, write

from pisco_rag.corpus import ModelLoader, compress_corpus

TOPICS = ["river", "lighthouse", "bakery", "forest", "harbour", "library", "bridge", "garden"]


def corpus(folder: Path, n: int, shards: int = 8) -> list[str]:
    """``n`` documents of about 60 tokens in ``shards`` JSONL files; returns their texts."""
    shards = min(shards, n)
    texts = [
        f"Document {i} is about the {TOPICS[i % len(TOPICS)]} of town {i}. "
        f"It was built in {1800 + i % 200} and restored in {1950 + i % 70}. "
        f"Visitors count {i * 37 % 1000} people a day, most of them in summer, "
        f"and the local guide number {i % 13} tells its story in three languages."
        for i in range(n)
    ]
    folder.mkdir(parents=True)
    for s in range(shards):
        with (folder / f"shard{s}.jsonl").open("w") as f:
            for text in texts[s::shards]:
                f.write(json.dumps({"text": text}) + "\n")
    return texts


def tiny_checkpoint(work: Path) -> Path:
    """A tiny random PISCO model saved in the native format, its backbone beside it."""
    from pisco_rag import PiscoModel

    backbone, tok = tiny_backbone()
    backbone.save_pretrained(work / "backbone")
    tok.save_pretrained(work / "backbone")
    PiscoModel.from_backbone(str(work / "backbone"), device="cpu").save_pretrained(work / "ckpt")
    return work / "ckpt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--documents", type=int, default=96)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--warmup-documents",
        type=int,
        default=8,
        help="a run on this many documents measures the startup (model loads), left out of "
        "documents_per_second_after_startup (0: no such run)",
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--batch-size", type=int, default=8, help="chunks per forward pass")
    parser.add_argument("--rows-per-write", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="e.g. 1 with cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "ray_throughput.json")
    args = parser.parse_args()
    if not 0 <= args.warmup_documents < args.documents:
        parser.error("--warmup-documents must be at least 0 and less than --documents")

    import ray
    import ray.data

    work = Path(tempfile.mkdtemp(prefix="ray-throughput-"))
    try:
        texts = corpus(work / "corpus", args.documents)
        if args.warmup_documents:
            corpus(work / "small", args.warmup_documents)
        if args.tiny:  # workers load the model by path: save it (and its backbone) first
            loader = ModelLoader(str(tiny_checkpoint(work)), device=args.device)
        else:
            loader = ModelLoader("embedded", device=args.device)
        model = loader()
        load_before = os.getloadavg()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # like one Ray worker (one CPU)
        t0 = time.perf_counter()
        memories = model.compress(texts, batch_size=args.batch_size, use_store=False)
        in_process = time.perf_counter() - t0
        torch.set_num_threads(threads)
        assert len(memories) == len(texts), "the corpus should be one chunk per document"

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        runs = []
        for workers in args.workers:
            seconds = {"small": 0.0}
            sizes = [(args.warmup_documents, "small")] if args.warmup_documents else []
            for n, folder in [*sizes, (len(texts), "corpus")]:
                result = compress_corpus(
                    work / folder,
                    work / f"store-{workers}-{folder}.sqlite",
                    model=loader,
                    num_workers=workers,
                    num_gpus_per_worker=args.gpus_per_worker,
                    batch_size=args.batch_size,
                    rows_per_write=args.rows_per_write,
                    show_progress=False,
                )
                assert result.compressed == result.documents == n and not result.failed
                seconds[folder] = result.seconds
            steady = (
                (len(texts) - args.warmup_documents) / (seconds["corpus"] - seconds["small"])
                if args.warmup_documents and seconds["corpus"] > seconds["small"]
                else None
            )
            runs.append(
                {
                    "workers": workers,
                    "documents": len(texts),
                    "seconds": seconds["corpus"],
                    "documents_per_second": len(texts) / seconds["corpus"],
                    f"seconds_for_{args.warmup_documents}_documents": seconds["small"],
                    "documents_per_second_after_startup": steady,
                }
            )
            print(
                f"{workers} worker(s): {len(texts) / seconds['corpus']:.2f} docs/s end to end, "
                + (f"{steady:.2f} docs/s without startup" if steady else "")
            )
        ray.shutdown()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "benchmark": "ray_throughput",
        "model": "tiny-random-llama" if args.tiny else "SmolLM2-135M (embedded)",
        "documents": len(texts),
        "chunk_tokens_about": 60,
        "batch_size": args.batch_size,
        "rows_per_write": args.rows_per_write,
        "ray_cluster_cpus": args.num_cpus,
        "cpus_per_worker": 1,
        "gpus_per_worker": args.gpus_per_worker,
        "device": args.device,
        "ray": ray.__version__,
        "runs": runs,
        "in_process_compress": {
            "seconds": in_process,
            "documents_per_second": len(texts) / in_process,
            "torch_threads": 1,
        },
        "load_average_1_5_15_min": {"before": load_before, "after": os.getloadavg()},
        "environment": environment(),
    }
    write(result, args.out)


if __name__ == "__main__":
    main()
