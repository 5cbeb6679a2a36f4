"""How much of a gold passage can the decoder read from 8 memory vectors before any training?

    python benchmarks/memory_readability.py --train train_k5.jsonl --eval eval10.jsonl \
        [--limit 64] [--anchor-steps 100 --anchor-lr 3e-4] [--decoder-steps 300] [--tiny] \
        [--compression-rate 4 --decoder-only]

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

``--decoder-steps N`` asks whether training makes the decoder read such memories: a PISCO model
on the same backbone (``--compression-rate`` tokens per memory, 16 by default) trains its
decoder adapter for N steps of 8 (QA on the ``--train`` records with all their passages, gold
answers: ``train_k1.jsonl`` holds the gold passage alone, ``train_k5.jsonl`` four distractors
too) with ``oracle_segment_mean_rescaled`` memories in place of its encoder's (the trainer's
compress step is replaced in this process: a parameter-free compressor), then reports the
diagnostics at every 100 steps and Match of answers generated from the oracle memories,
against the plain backbone reading the chunk as text (``match_text_k1``).
``--decoder-only`` skips the measurements before it. The core's ``token-mean`` compressor
computes these oracle memories for any model (``compressor="token-mean"``).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).parent))

import torch
from _common import RESULTS, environment, load_model, read_eval_records, tiny_backbone, write

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
            cos = torch.nn.functional.cosine_similarity(memories.detach(), target, dim=-1).mean()
            curve.append(
                {
                    "step": step,
                    "relative_squared_error": round(float(loss.detach()), 4),
                    "cosine": round(float(cos), 4),
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
            print(curve[-1], flush=True)
    compressor.eval()
    return curve


def match_rate(predictions: list[str], records: list[dict]) -> float:
    from pisco_rag.evaluation.metrics import answer_metrics

    return round(answer_metrics(predictions, [r["answer"] for r in records])["match"], 4)


def new_pisco_model(tiny: bool, compression_rate: int = 16):
    """An untrained PISCO model on SmolLM2-135M (or the tiny random backbone)."""
    from pisco_rag import PiscoModel
    from pisco_rag.defaults import DEFAULT_BACKBONE

    backbone = tiny_backbone() if tiny else (DEFAULT_BACKBONE,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PiscoModel.from_backbone(*backbone, device="cpu", compression_rate=compression_rate)


def train_decoder_on_oracle(
    tiny: bool,
    train_path: str,
    records: list[dict],
    steps: int,
    lr: float,
    out: str,
    compression_rate: int = 16,
) -> dict:
    """A new PISCO model whose decoder adapter learns to answer from oracle memories (the
    trainer's compress step replaced by the oracle while it trains)."""
    from pisco_rag import training
    from pisco_rag.memory import Memory

    model = new_pisco_model(tiny, compression_rate)
    tokenizer = model.tokenizer
    skip = set(model.mem_token_ids) | set(tokenizer.all_special_ids)
    how = "oracle_segment_mean_rescaled"

    def oracle_compress(self, enc_input_ids, enc_attention_mask, enc_query_mask=None):
        vectors = []
        for row, mask in zip(enc_input_ids.tolist(), enc_attention_mask.tolist()):
            text = tokenizer.decode([t for t, m in zip(row, mask) if m and t not in skip])
            vectors.append(segment_vectors(model, text, how))
        return torch.stack(vectors), None

    chunks = [model.chunk(r["documents"][r["gold_index"]])[0] for r in records]
    questions = [r["question"] for r in records]
    text_answers = model.generate_from_text(
        questions, [[c] for c in chunks], adapter="none", max_new_tokens=32
    )
    match_text = match_rate(text_answers, records)
    result = {
        "train": Path(train_path).name,
        "compression_rate": compression_rate,
        "steps": steps,
        "lr": lr,
        "batch_size": 8,
        "match_text_k1": match_text,
        "curve": [],
    }
    done = 0
    for stop in [*range(100, steps, 100), steps]:
        config = training.TrainConfig(
            output_dir=out,
            max_steps=stop - done,
            batch_size=8,
            decoder_lr=lr,
            warmup_ratio=0.05 if done == 0 else 0.0,
            logging_steps=10,
            save_steps=10**6,
            bf16=False,
            target_field="answer",
            seed=done,  # another order of the training records for each stretch
            show_progress=False,
            extra_args={"lr_scheduler_type": "constant"},
        )
        with mock.patch.object(training.StudentModule, "compress", oracle_compress):
            training.train(model, train_path, config=config)
        done = stop
        point = {"step": done, "examples": 8 * done}
        point.update(diagnostics(model, records, chunks, how))
        contexts = [
            [Memory(segment_vectors(model, c, how), model.fingerprint, key=f"m{i}")]
            for i, c in enumerate(chunks)
        ]
        point["match_memories_k1"] = match_rate(
            model.generate(questions, contexts, max_new_tokens=32), records
        )
        result["curve"].append(point)
        print("decoder on oracle memories", point, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train", required=True, help="training records (calibration, anchor)")
    parser.add_argument("--eval", required=True, help="evaluation records (pisco-rag build-data)")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--anchor-steps", type=int, default=0)
    parser.add_argument("--anchor-lr", type=float, default=3e-4)
    parser.add_argument("--decoder-steps", type=int, default=0)
    parser.add_argument("--decoder-lr", type=float, default=5e-4)
    parser.add_argument(
        "--compression-rate",
        type=int,
        default=16,
        help="of the --decoder-steps model: tokens per oracle memory (16: 8 per 128-token chunk)",
    )
    parser.add_argument(
        "--decoder-only",
        action="store_true",
        help="only the --decoder-steps run (no untrained-compressor measurements)",
    )
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=str(RESULTS / "memory_readability.json"))
    args = parser.parse_args()

    torch.manual_seed(0)
    records = read_eval_records(args.eval, args.limit)
    result: dict = {"eval": Path(args.eval).name, "questions": len(records)}
    if not args.decoder_only:
        result.update(untrained_measurements(args, records))
    if args.decoder_steps:
        with tempfile.TemporaryDirectory() as out:
            result["decoder_on_oracle"] = train_decoder_on_oracle(
                args.tiny,
                args.train,
                records,
                args.decoder_steps,
                args.decoder_lr,
                out,
                args.compression_rate,
            )
    result["environment"] = environment()
    write(result, Path(args.out))


def untrained_measurements(args: argparse.Namespace, records: list[dict]) -> dict:
    """The diagnostics of a new OSCAR compressor's memories and of the oracles (and, with
    ``--anchor-steps``, of the compressor anchored to an oracle)."""
    model = load_model(args.tiny, "cpu", compressor="first-layers:5")
    with open(args.train) as f:
        train = [json.loads(line) for line in f if line.strip()]
    passages = sorted({d for r in train for d in r["documents"]})
    train_chunks = [c for p in passages for c in model.chunk(p)]
    random.Random(0).shuffle(train_chunks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.calibrate_memories(train_chunks[:64])
    chunks = [model.chunk(r["documents"][r["gold_index"]])[0] for r in records]

    result: dict = {"memories": {}}
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
    return result


if __name__ == "__main__":
    main()
