"""How much of a gold passage can the decoder read from 8 memory vectors before any training?

    python benchmarks/memory_readability.py --train train_k5.jsonl --eval eval10.jsonl \
        [--limit 64] [--anchor-steps 100 --anchor-lr 3e-4] [--tiny]

For the first 128-token chunk of each evaluation question's gold passage, the gold answer's NLL
(``answer_diagnostics``: with the chunk as text, from memories, from another question's
memories, with no context) for memories made three ways, read by SmolLM2 with its adapters at
their initial state (the plain backbone):

* ``compressor``: a new OSCAR compressor (the first 5 layers, standardised memories);
* ``oracle_segment_mean`` / ``_rescaled`` / ``oracle_segment_sum``: no compressor at all, memory
  *i* is the mean (rescaled to the token embeddings' norm) or the sum of the input embeddings
  of the chunk's *i*-th eighth of tokens.

``own_minus_shuffled`` below zero means the memories carry something of *this* question's
passage to the decoder. ``--anchor-steps N`` then pretrains the compressor for N steps of 16
training chunks to regress its memories onto ``oracle_segment_mean_rescaled`` (relative squared
error, the compressor's parameters only) and measures it again (``compressor_after_anchor``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import RESULTS, environment, load_model, read_eval_records, write

ORACLES = ("oracle_segment_mean", "oracle_segment_mean_rescaled", "oracle_segment_sum")


def segment_vectors(model, text: str, how: str) -> torch.Tensor:
    """``[n_mem, hidden]``: memory i from the input embeddings of the i-th segment of ``text``."""
    table = model._input_embeddings.weight.detach()
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    n = model.n_mem
    segments = [ids[i * len(ids) // n : (i + 1) * len(ids) // n] or ids[:1] for i in range(n)]
    if how == "oracle_segment_sum":
        return torch.stack([table[s].sum(0) for s in segments])
    vectors = torch.stack([table[s].mean(0) for s in segments])
    if how == "oracle_segment_mean_rescaled":
        norm = table.norm(dim=-1).mean()
        vectors = vectors / vectors.norm(dim=-1, keepdim=True) * norm
    return vectors


def diagnostics(model, records: list[dict], chunks: list[str], how: str) -> dict[str, float]:
    from pisco_rag.evaluation.runner import answer_diagnostics
    from pisco_rag.memory import Memory

    if how.startswith("compressor"):
        model.compressor.eval()
        contexts = [model.compress([c], use_store=False)[:1] for c in chunks]
    else:
        contexts = [
            [Memory(segment_vectors(model, c, how), model.fingerprint, key=f"{how}-{i}")]
            for i, c in enumerate(chunks)
        ]
    d = answer_diagnostics(
        model,
        [r["question"] for r in records],
        [[c] for c in chunks],
        contexts,
        [r["answer"] for r in records],
    )
    d["own_minus_shuffled"] = d["nll_memories"] - d["nll_shuffled_memories"]
    return {k: round(v, 4) for k, v in d.items()}


def anchor(model, chunks: list[str], steps: int, lr: float, batch: int = 16) -> list[dict]:
    """Regress the compressor's memories onto the rescaled segment means of ``chunks``."""
    compressor = model.compressor
    params = list(compressor.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    norm = model._input_embeddings.weight.detach().norm(dim=-1).mean()
    compressor.train()
    curve, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        texts = [chunks[(step * batch + j) % len(chunks)] for j in range(batch)]
        ids, mask = compressor.encode_inputs(texts, None)
        memories = model.standardise_memories(compressor(ids, mask)[0])
        target = torch.stack(
            [segment_vectors(model, t, "oracle_segment_mean_rescaled") for t in texts]
        )
        loss = ((memories - target) ** 2).sum(-1).mean() / norm**2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps:
            cos = torch.nn.functional.cosine_similarity(memories, target, dim=-1).mean()
            curve.append(
                {
                    "step": step,
                    "relative_squared_error": round(float(loss), 4),
                    "cosine": round(float(cos), 4),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(curve[-1], flush=True)
    compressor.eval()
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", required=True, help="training records (calibration, anchor)")
    parser.add_argument("--eval", required=True, help="evaluation records (pisco-rag build-data)")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--anchor-steps", type=int, default=0)
    parser.add_argument("--anchor-lr", type=float, default=3e-4)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "memory_readability.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    model = load_model(args.tiny, "cpu", compressor="first-layers:5")
    records = read_eval_records(args.eval, args.limit)
    with open(args.train) as f:
        train = [json.loads(line) for line in f if line.strip()]
    passages = sorted({d for r in train for d in r["documents"]})
    train_chunks = [c for p in passages for c in model.chunk(p)]
    random.Random(0).shuffle(train_chunks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.calibrate_memories(train_chunks[:64])
    chunks = [model.chunk(r["documents"][r["gold_index"]])[0] for r in records]

    result: dict = {"eval": Path(args.eval).name, "questions": len(records), "memories": {}}
    for how in ("compressor", *ORACLES):
        result["memories"][how] = diagnostics(model, records, chunks, how)
        print(how, result["memories"][how], flush=True)
    if args.anchor_steps:
        result["anchor"] = {
            "steps": args.anchor_steps,
            "lr": args.anchor_lr,
            "batch_size": 16,
            "curve": anchor(model, train_chunks, args.anchor_steps, args.anchor_lr),
        }
        after = diagnostics(model, records, chunks, "compressor_after_anchor")
        result["memories"]["compressor_after_anchor"] = after
        print("compressor_after_anchor", after, flush=True)
    result["environment"] = environment()
    write(result, Path(args.out))


if __name__ == "__main__":
    main()
