"""Training examples per second of several recipes, side by side in one run on one machine.

    python benchmarks/train_throughput.py --train train.jsonl [--steps 3] [--documents 2]

Each recipe builds a fresh model on SmolLM2-135M, then times ``--steps`` optimizer steps of the
real training forward/backward (``StudentModule``) on the same records (``--documents`` per
question: the gold passage and the best-retrieved distractors), after one untimed warm-up step
(the first step costs up to twice a later one: lazy initialisation and allocation).
The recipes:

- ``shipped_default``: what trained the shipped defaults: PISCO (the whole backbone compresses),
  bfloat16 autocast, batch 4;
- ``pisco_fp32``: the same model in float32 (the precision chosen by measurement on CPUs
  without native bf16), batch 8;
- ``oscar_fp32``: OSCAR with the backbone's first 5 layers as compressor, float32, batch 8;
- ``oscar_fp32_text_rows``: the same with a quarter of the records read as text
  (``--text-context-ratio 0.25``), batches in random order;
- ``oscar_fp32_text_rows_grouped``: the same records in batches grouped by decoder row length,
  as the trainer groups them by default (transformers' length-grouped order, mega-batches of
  ``--steps`` batches; the trainer's are 50 batches, which groups at least as well).

``--recipes`` picks some of them; ``--tiny`` runs on a 2-layer random model (smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import RESULTS, environment, subset_documents, tiny_backbone, write

RECIPES = {
    "shipped_default": {"compressor": "pisco", "bf16": True, "batch_size": 4, "warmup": 1},
    "pisco_fp32": {"compressor": "pisco", "bf16": False, "batch_size": 8, "warmup": 1},
    "oscar_fp32": {"compressor": "first-layers:5", "bf16": False, "batch_size": 8, "warmup": 1},
}
TEXT_ROWS = {**RECIPES["oscar_fp32"], "text_context_ratio": 0.25}
RECIPES["oscar_fp32_text_rows"] = {**TEXT_ROWS, "group_by_length": False}
RECIPES["oscar_fp32_text_rows_grouped"] = {**TEXT_ROWS, "group_by_length": True}


def batches(records: list[dict], recipe: dict, collator, steps: int) -> list[list[dict]]:
    """The warm-up batches, then ``steps`` timed batches (length-grouped if the recipe says)."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    bs, warmup = recipe["batch_size"], recipe["warmup"]
    head, timed = records[: warmup * bs], records[warmup * bs : (warmup + steps) * bs]
    if recipe.get("group_by_length"):
        lengths = [collator.decoder_length(r) for r in timed]
        order = get_length_grouped_indices(
            lengths, bs, mega_batch_mult=steps, generator=torch.Generator().manual_seed(0)
        )
        timed = [timed[i] for i in order]
    rows = head + timed
    return [rows[i : i + bs] for i in range(0, len(rows), bs)]


def build(recipe: dict, tiny: bool):
    from pisco_rag import PiscoModel
    from pisco_rag.defaults import DEFAULT_BACKBONE

    compressor = recipe["compressor"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tiny:
            backbone, tok = tiny_backbone()
            compressor = "first-layers:1" if compressor != "pisco" else compressor
            return PiscoModel.from_backbone(backbone, tok, compressor=compressor)
        return PiscoModel.from_backbone(
            DEFAULT_BACKBONE, compressor=compressor, dtype=torch.float32
        )


def time_recipe(name: str, recipe: dict, records: list[dict], steps: int, tiny: bool) -> dict:
    from pisco_rag.training import DistillationCollator, StudentModule, TrainConfig
    from pisco_rag.training.trainable import setup_trainable

    model = build(recipe, tiny)
    student = StudentModule(model)
    setup = setup_trainable(student, TrainConfig(output_dir="unused"))
    optimizer = torch.optim.AdamW(setup.groups, lr=1e-5)
    collator = DistillationCollator(
        model, "answer", text_context_ratio=recipe.get("text_context_ratio", 0.0)
    )
    student.train()
    bs = recipe["batch_size"]
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16) if recipe["bf16"] else contextlib.nullcontext()
    )
    seconds = []
    warmup = recipe["warmup"]
    for step, rows in enumerate(batches(records, recipe, collator, steps)):
        batch = collator(rows)
        start = time.perf_counter()
        with autocast:
            loss = student(**batch)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step >= warmup:
            seconds.append(time.perf_counter() - start)
        print(f"{name} step {step}: {time.perf_counter() - start:.2f}s", flush=True)
    setup.restore()
    per_step = sum(seconds) / len(seconds)
    return {
        **recipe,
        "seconds_per_step": round(per_step, 3),
        "examples_per_second": round(bs / per_step, 4),
        "timed_steps": len(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="training records (pisco-rag build-data)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per recipe")
    parser.add_argument("--documents", type=int, default=2, help="documents per question")
    parser.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    args = parser.parse_args()

    with open(args.train) as f:
        records = [json.loads(line) for line in f if line.strip()]
    need = (args.steps + 1) * max(RECIPES[r]["batch_size"] for r in args.recipes)
    records = [subset_documents(records[i % len(records)], args.documents) for i in range(need)]
    results = {
        name: time_recipe(name, RECIPES[name], records, args.steps, args.tiny)
        for name in args.recipes
    }
    if "shipped_default" in results:
        base = results["shipped_default"]["examples_per_second"]
        for r in results.values():
            r["speedup_vs_shipped_default"] = round(r["examples_per_second"] / base, 2)
    write(
        {
            "documents_per_question": args.documents,
            "recipes": results,
            "environment": environment(),
        },
        Path(args.out),
    )


if __name__ == "__main__":
    main()
