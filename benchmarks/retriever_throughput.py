"""Retriever training: seconds per step, questions per second and peak memory of several
recipes, side by side in one run on one machine.

    python benchmarks/retriever_throughput.py --train train.jsonl [--steps 3]

Each recipe runs in its own process (so that its peak resident memory is its own): the shipped
PISCO model, ``train_retriever`` on the same records (seed 0: the batch-4 recipes see the same
batches) for one untimed warm-up step and ``--steps`` timed ones, passages cropped at
``--max-passage-tokens``. The recipes:

- ``one_forward_b4``: batch 4 (12 passages), every passage of the batch in one forward pass,
  padded to the longest (the recipe before length chunks);
- ``one_forward_b4_checkpointing``: the same with activation checkpointing;
- ``length_chunks_b4``: batch 4, passages in forward passes of similar length of at most
  ``RetrieverConfig.chunk_tokens`` padded tokens (the default);
- ``length_chunks_b16_checkpointing``: batch 16 (48 passages) in length chunks, with
  activation checkpointing (the memory a 4x larger batch needs).

``--recipes`` picks some of them; ``--tiny`` runs on a 2-layer random model (smoke test).
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, environment, load_model, write

ONE_FORWARD = 10**9  # chunk_tokens: every text of the batch in one forward pass
RECIPES = {
    "one_forward_b4": {"batch_size": 4, "chunk_tokens": ONE_FORWARD},
    "one_forward_b4_checkpointing": {
        "batch_size": 4,
        "chunk_tokens": ONE_FORWARD,
        "gradient_checkpointing": True,
    },
    "length_chunks_b4": {"batch_size": 4},
    "length_chunks_b16_checkpointing": {"batch_size": 16, "gradient_checkpointing": True},
}


def run_recipe(name: str, args: argparse.Namespace) -> dict:
    """One recipe in this process: timed steps and the process's peak memory."""
    from pisco_rag.training.retriever import RetrieverConfig, train_retriever

    with open(args.train) as f:
        records = [json.loads(line) for line in f if line.strip()]
    model = load_model(args.tiny, "cpu")
    with tempfile.TemporaryDirectory() as out:
        config = RetrieverConfig(
            out,
            max_steps=args.steps + 1,
            logging_steps=1,
            save_steps=10**9,
            max_passage_tokens=args.max_passage_tokens,
            invariance_weight=10,
            show_progress=False,
            **RECIPES[name],
        )
        start = time.perf_counter()
        log = train_retriever(model, records, config)["log"]
    seconds = [e["seconds"] for e in log]
    timed = [b - a for a, b in itertools.pairwise(seconds)]  # the steps after the warm-up one
    per_step = statistics.median(timed)
    return {
        "batch_size": config.batch_size,
        "chunk_tokens": config.chunk_tokens,
        "gradient_checkpointing": config.gradient_checkpointing,
        "timed_steps": len(timed),
        "seconds_per_step": round(per_step, 2),
        "step_seconds": [round(t, 2) for t in timed],
        "questions_per_second": round(config.batch_size / per_step, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "losses": [e["loss"] for e in log],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", required=True, help="training records (pisco-rag build-data)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per recipe")
    parser.add_argument("--max-passage-tokens", type=int, default=256)
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--child", choices=list(RECIPES), help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(RESULTS / "retriever_throughput.json"))
    args = parser.parse_args()
    if args.child:  # one recipe, its result on stdout's last line
        print(json.dumps(run_recipe(args.child, args)))
        return
    result = {"train": Path(args.train).name, "steps": args.steps, "recipes": {}}
    result["max_passage_tokens"] = args.max_passage_tokens
    for name in args.recipes:
        argv = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        done = subprocess.run(argv, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"recipe {name} failed:\n{done.stderr}")
        result["recipes"][name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, result["recipes"][name]["seconds_per_step"], "s/step", flush=True)
    base = result["recipes"].get("one_forward_b4")
    for r in result["recipes"].values():
        if base:
            speedup = r["questions_per_second"] / base["questions_per_second"]
            r["speedup_vs_one_forward_b4"] = round(speedup, 2)
    result["environment"] = environment()
    write(result, Path(args.out))


if __name__ == "__main__":
    main()
