"""The persistent memory store at scale: bulk writes from several processes, read latency of
10 and 50 random keys at 100k and 1M entries (SQLite, and LanceDB with a B-tree key index),
size on disk, and the effect of float16 / int8 storage on memories and on greedy answers.

Entries hold small vectors ([8, 16], float16) so that a million fit in minutes; the size of
real memories ([8, 576] SmolLM2-135M, [8, 4096] Mistral-7B) is computed per entry.

    python benchmarks/store_scale.py     # 100k and 1M entries: results/store_scale.json
    python benchmarks/store_scale.py --tiny --out /tmp/x.json       # smoke test
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import random
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
from _common import RESULTS, environment, load_model, write

from pisco_rag import Memory, SQLiteMemoryStore
from pisco_rag.stores import encode_memory

FINGERPRINT = "benchmark0000000"
SHAPE = (8, 16)


def key_of(i: int) -> str:
    return f"{i:032x}"


def _fill(path: str, start: int, stop: int, transaction_rows: int, barrier=None, times=None):
    """One writer: encode entries [start, stop) and write them in big transactions."""
    store = SQLiteMemoryStore(path)
    gen = torch.Generator().manual_seed(start)
    if barrier is not None:
        barrier.wait()  # all writers start together, once their imports are done
    t0 = time.perf_counter()
    for lo in range(start, stop, transaction_rows):
        hi = min(lo + transaction_rows, stop)
        vectors = torch.randn((hi - lo, *SHAPE), generator=gen).half()
        store.put_encoded(
            (key_of(i), FINGERPRINT, Memory(vectors[i - lo], FINGERPRINT, key_of(i)).to_bytes())
            for i in range(lo, hi)
        )
    if times is not None:
        times.put(time.perf_counter() - t0)
    return time.perf_counter() - t0


def fill(path: Path, start: int, stop: int, writers: int, transaction_rows: int) -> float:
    """Write entries [start, stop) from ``writers`` processes at once (encoding included);
    returns the seconds the slowest writer took."""
    if writers == 1:
        return _fill(str(path), start, stop, transaction_rows)
    bounds = [start + (stop - start) * w // writers for w in range(writers + 1)]
    ctx = multiprocessing.get_context("spawn")
    barrier, times = ctx.Barrier(writers), ctx.Queue()
    procs = [
        ctx.Process(target=_fill, args=(str(path), lo, hi, transaction_rows, barrier, times))
        for lo, hi in itertools.pairwise(bounds)
    ]
    for p in procs:
        p.start()
    seconds = [times.get(timeout=3600) for _ in procs]
    for p in procs:
        p.join()
    if any(p.exitcode != 0 for p in procs):
        raise RuntimeError("a writer process failed")
    return max(seconds)


def latency(get, n_entries: int, k: int, repeats: int, rng: random.Random) -> dict:
    times = []
    for _ in range(repeats):
        keys = [key_of(rng.randrange(n_entries)) for _ in range(k)]
        t0 = time.perf_counter()
        got = get(keys)
        times.append(time.perf_counter() - t0)
        assert all(m is not None for m in got)
    times.sort()
    return {
        "median_ms": 1000 * statistics.median(times),
        "p95_ms": 1000 * times[int(0.95 * (len(times) - 1))],
    }


def lance_copy(sqlite_path: Path, lance_dir: Path, start: int, batch_rows: int = 100_000):
    """Append the SQLite entries from rowid ``start`` on to a LanceDB table; reindex key."""
    import sqlite3

    import pyarrow as pa

    from pisco_rag.stores import LanceMemoryStore

    store = LanceMemoryStore(lance_dir)
    conn = sqlite3.connect(sqlite_path)
    t0 = time.perf_counter()
    cursor = conn.execute(
        "SELECT key, fingerprint, data FROM memories WHERE rowid > ? ORDER BY rowid", (start,)
    )
    while rows := cursor.fetchmany(batch_rows):
        keys, fps, data = zip(*rows)
        n = len(keys)
        store.table.add(
            pa.table(
                {
                    "key": keys,
                    "fingerprint": fps,
                    "text": [None] * n,
                    "source": [None] * n,
                    "chunk_index": [0] * n,
                    "memory": data,
                },
                schema=store.table.schema,
            )
        )
    store.optimize(cleanup_older_than=timedelta(0))  # keep only the latest version
    return store, time.perf_counter() - t0


def entry_sizes() -> dict:
    """Bytes per stored entry for real memory shapes, by stored dtype."""
    out = {}
    for name, hidden in (("smollm2-135m_8x576", 576), ("mistral-7b_8x4096", 4096)):
        memory = Memory(torch.randn(8, hidden), FINGERPRINT, key_of(0), text=None)
        out[name] = {
            dtype or "float32": len(encode_memory(memory, dtype))
            for dtype in (None, "float16", "int8")
        }
        out[name]["GiB_per_million_float16"] = out[name]["float16"] * 1e6 / 2**30
    return out


def quality(tiny: bool) -> dict:
    """Effect of narrowed storage on memories and on greedy answers (same questions, same
    chunks; float32 memories vs the ones read back from a narrowed store)."""
    model = load_model(tiny, "cpu")
    texts = [p.read_text() for p in sorted(Path("examples/docs").glob("*.*"))]
    memories = model.compress(texts, use_store=False)
    by_doc: dict[int, list[Memory]] = {}
    for m in memories:
        by_doc.setdefault(m.source_index, []).append(m)
    questions = ["What is the background about?", "Give one fact from the background."]
    pairs = [(q, by_doc[d]) for d in sorted(by_doc) for q in questions]
    new_tokens = 4 if tiny else 24

    def answers(groups: list[list[Memory]]) -> list[str]:
        return model.generate([q for q, _ in pairs], groups, max_new_tokens=new_tokens)

    reference = answers([ms for _, ms in pairs])
    out: dict = {"chunks": len(memories), "questions": len(pairs), "new_tokens": new_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("float16", "int8"):
            store = SQLiteMemoryStore(Path(tmp) / f"{dtype}.sqlite", dtype=dtype)
            store.put_many(memories)
            back = {m.key: m for m in store.get_many([m.key for m in memories])}
            cos = torch.cat(
                [
                    torch.nn.functional.cosine_similarity(
                        back[m.key].vectors, m.vectors.float(), dim=-1
                    )
                    for m in memories
                ]
            )
            rel = max(
                float((back[m.key].vectors - m.vectors).abs().max() / m.vectors.abs().max())
                for m in memories
            )
            got = answers([[back[m.key] for m in ms] for _, ms in pairs])
            out[dtype] = {
                "min_cosine": float(cos.min()),
                "mean_cosine": float(cos.mean()),
                "max_error_relative_to_max_abs": rel,
                "identical_greedy_answers": sum(a == b for a, b in zip(got, reference)),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--writers", type=int, default=2, help="writer processes")
    parser.add_argument("--transaction-rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=200, help="reads per measurement")
    parser.add_argument("--no-lance", action="store_true", help="SQLite only")
    parser.add_argument("--dir", type=Path, default=None, help="where to build the stores")
    parser.add_argument("--tiny", action="store_true", help="small sizes, tiny model (smoke)")
    parser.add_argument("--out", type=Path, default=RESULTS / "store_scale.json")
    args = parser.parse_args()
    if args.tiny:
        args.sizes = [2_000, 5_000] if args.sizes == parser.get_default("sizes") else args.sizes
        args.repeats = min(args.repeats, 20)
        args.transaction_rows = min(args.transaction_rows, 1_000)
    sizes = sorted(args.sizes)
    lance = not args.no_lance
    if lance:
        try:
            import lancedb  # noqa: F401
        except ImportError:
            print("lancedb is not installed: SQLite only")
            lance = False

    work = Path(tempfile.mkdtemp(prefix="store-scale-", dir=args.dir))
    rng = random.Random(0)
    rows = []
    try:
        path = work / "memories.sqlite"
        SQLiteMemoryStore(path)  # create the schema before the writers start
        done, lance_store = 0, None
        for size in sizes:
            seconds = fill(path, done, size, args.writers, args.transaction_rows)
            store = SQLiteMemoryStore(path)
            assert len(store) == size
            row = {
                "entries": size,
                "write_seconds": seconds,
                "writes_per_second": (size - done) / seconds,
                "sqlite": {
                    "size_on_disk_bytes": store.size_on_disk,
                    "bytes_per_entry": store.size_on_disk / size,
                    **{
                        f"read_{k}_keys": latency(store.get_many, size, k, args.repeats, rng)
                        for k in (10, 50)
                    },
                },
            }
            if lance:
                lance_store, lance_seconds = lance_copy(path, work / "lance", done)
                assert len(lance_store) == size
                row["lance"] = {
                    "copy_and_index_seconds": lance_seconds,
                    "size_on_disk_bytes": lance_store.size_on_disk,
                    **{
                        f"read_{k}_keys": latency(lance_store.get_many, size, k, args.repeats, rng)
                        for k in (10, 50)
                    },
                }
            done = size
            rows.append(row)
            line = f"{size:>9} entries: " + ", ".join(
                f"{kind} {k} keys {row[kind][f'read_{k}_keys']['median_ms']:.2f} ms"
                for kind in ("sqlite", "lance")
                if kind in row
                for k in (10, 50)
            )
            print(f"{line}; SQLite {row['sqlite']['size_on_disk_bytes'] / 2**20:.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    effect = quality(args.tiny)
    print(f"narrowed storage: {effect}")
    result = {
        "benchmark": "store_scale",
        "entry_shape": list(SHAPE),
        "stored_dtype": "float16",
        "writer_processes": args.writers,
        "transaction_rows": args.transaction_rows,
        "repeats": args.repeats,
        "reads": "get_many of k random keys, decoded to Memory objects (warm OS cache)",
        "sizes": rows,
        "bytes_per_entry_real_shapes": entry_sizes(),
        "narrowed_storage_effect": {
            "model": "tiny-random-llama" if args.tiny else "SmolLM2-135M (embedded)",
            **effect,
        },
        "environment": environment(),
    }
    write(result, args.out)


if __name__ == "__main__":
    main()
