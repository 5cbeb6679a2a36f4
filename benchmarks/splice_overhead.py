"""Cost of splicing memories: generation from memories vs a plain prompt of the same length.

Both prompts have exactly the same token count; the memory prompt has k memories written into
its input embeddings (one masked write), the plain one has ordinary tokens in those slots. Both
generate exactly ``--new-tokens`` tokens greedily. Runs are interleaved; medians are reported.

    python benchmarks/splice_overhead.py      # SmolLM2-135M: results/splice_overhead.json
    python benchmarks/splice_overhead.py --tiny --repeats 1 --out /tmp/x.json   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import RESULTS, environment, load_model, write

from pisco_rag.prompting import RenderedPrompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=10, help="memories in the prompt")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "splice_overhead.json")
    args = parser.parse_args()

    model = load_model(args.tiny, args.device)
    docs = [
        " ".join(f"Document {i} sentence {j} about rivers." for j in range(20))
        for i in range(args.k)
    ]
    memories = [m for m in model.compress(docs) if m.chunk_index == 0][: args.k]
    (with_memories,) = model._pisco_prompts(["Which river is it?"], [memories])
    filler = model.tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    slot_ids = set(model.mem_token_ids)
    plain = RenderedPrompt([filler if t in slot_ids else t for t in with_memories.input_ids], [])
    assert len(plain.input_ids) == len(with_memories.input_ids)
    gen = {"min_new_tokens": args.new_tokens}

    def timed(prompt: RenderedPrompt) -> tuple[float, float]:
        t0 = time.perf_counter()
        model._embed([prompt])
        t1 = time.perf_counter()
        model._generate([prompt], args.new_tokens, None, gen)
        return t1 - t0, time.perf_counter() - t1

    timed(with_memories), timed(plain)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {"memories": [], "plain": []}
    with torch.inference_mode():
        for _ in range(args.repeats):
            runs["memories"].append(timed(with_memories))
            runs["plain"].append(timed(plain))
    med = {k: statistics.median(e + g for e, g in v) for k, v in runs.items()}
    embed = {k: statistics.median(e for e, _ in v) for k, v in runs.items()}
    result = {
        "benchmark": "splice_overhead",
        "model": model.info()["name"] if not args.tiny else "tiny-random-llama",
        "k_memories": len(memories),
        "prompt_tokens": len(plain.input_ids),
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "median_seconds": {"from_memories": med["memories"], "plain_prompt": med["plain"]},
        "median_embedding_seconds": {
            "from_memories": embed["memories"],
            "plain_prompt": embed["plain"],
        },
        "overhead_percent": 100 * (med["memories"] / med["plain"] - 1),
        "environment": environment(),
    }
    print(
        f"from memories {med['memories'] * 1000:.1f} ms, plain prompt "
        f"{med['plain'] * 1000:.1f} ms, overhead {result['overhead_percent']:+.1f}%"
    )
    write(result, args.out)


if __name__ == "__main__":
    main()
