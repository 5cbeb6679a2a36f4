"""Cost of compressing k documents: OSCAR's N-layer compressor vs a full backbone pass (PISCO).

Both compress the same k documents of ~128 tokens on the same SmolLM2-135M backbone (30
layers); OSCAR's compressor is the first ``--layers`` layers with the question in its input and
a reranking head. Weights are untrained: this measures cost, not quality. Runs interleaved,
medians reported.

    python benchmarks/compression_cost.py          # writes results/compression_cost.json
    python benchmarks/compression_cost.py --tiny --repeats 1 --out /tmp/x.json   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from _common import RESULTS, environment, load_model, write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=10, help="documents per query")
    parser.add_argument("--layers", type=int, default=5, help="OSCAR compressor layers")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "compression_cost.json")
    args = parser.parse_args()

    pisco = load_model(args.tiny, args.device)
    oscar = load_model(
        args.tiny, args.device, compressor=f"first-layers:{args.layers}", rerank_head=True
    )
    sentence = "The river passes the old mill, the bridge and the market square. "
    doc = " ".join([sentence] * 12)
    docs = [pisco.chunk(f"Document {i}. {doc}")[0] for i in range(args.k)]
    question = "Which places does the river pass?"

    def time_pisco() -> float:
        t = time.perf_counter()
        pisco.compress_texts(docs)
        return time.perf_counter() - t

    def time_oscar() -> float:
        t = time.perf_counter()
        oscar._compress_batch(docs, [question] * len(docs))
        return time.perf_counter() - t

    time_pisco(), time_oscar()  # warm-up
    runs: dict[str, list[float]] = {"pisco_full_backbone": [], "oscar_first_layers": []}
    with torch.inference_mode():
        for _ in range(args.repeats):
            runs["pisco_full_backbone"].append(time_pisco())
            runs["oscar_first_layers"].append(time_oscar())
    med = {k: statistics.median(v) for k, v in runs.items()}
    n_layers = pisco.model.config.num_hidden_layers
    tokens = {
        "pisco": int(
            pisco.tokenizer(docs, padding="longest", return_tensors="pt")["input_ids"].shape[1]
        )
        + 3
        + pisco.n_mem,
        "oscar": int(oscar.compressor.encode_inputs(docs, [question] * len(docs))[0].shape[1]),
    }
    result = {
        "benchmark": "compression_cost",
        "k_documents": len(docs),
        "backbone_layers": n_layers,
        "compressor_layers": len(oscar.compressor.body.layers),
        "sequence_tokens": tokens,
        "repeats": args.repeats,
        "median_seconds": med,
        "oscar_over_pisco": med["oscar_first_layers"] / med["pisco_full_backbone"],
        "layer_ratio": len(oscar.compressor.body.layers) / n_layers,
        "environment": environment(),
    }
    print(
        f"PISCO (full backbone) {med['pisco_full_backbone'] * 1000:.1f} ms, OSCAR "
        f"({result['compressor_layers']} layers, with query and head) "
        f"{med['oscar_first_layers'] * 1000:.1f} ms: ratio {result['oscar_over_pisco']:.3f} "
        f"(layer ratio {result['layer_ratio']:.3f})"
    )
    write(result, args.out)


if __name__ == "__main__":
    main()
