"""Speed and memory, the OSCAR paper's protocol: text RAG vs PISCO vs OSCAR on one backbone.

k documents of ~128 tokens, one question each, 32 generated tokens, greedy. Text RAG reads the
documents as text; PISCO reads precomputed memories; OSCAR compresses at query time (with the
question, 5-layer compressor, reranking head) and then reads its memories, compression
included in its time. Reported per mode: latency per query at batch 1, throughput at batch
``--batch``, prefill FLOPs counted by torch's FlopCounterMode, prompt tokens, and the peak
resident memory of a separate process per mode (so modes do not share a high-water mark).
``--scaling`` adds the time per query as k grows. This measures cost: the weights do not matter.

    python benchmarks/speed.py                      # SmolLM2-135M: results/speed.json + speed.png
    python benchmarks/speed.py --tiny --repeats 1 --batch 2 --k 2 --scaling-ks 1 2 --out /tmp/s.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import RESULTS, environment, load_model, write
from torch.utils.flop_counter import FlopCounterMode

MODES = ("text", "pisco", "oscar")
# with llama-cpp-python: PISCO and OSCAR decoding in llama.cpp (set_decoding_backend), and the
# anchor: text RAG in llama.cpp on the GGUF file the backbone came from
LLAMACPP_DECODING = ("pisco-llamacpp", "oscar-llamacpp")
LLAMA_CPP = "llama.cpp-text"
SENTENCE = (
    "The harbour of {name} was rebuilt in {year} after the storm, and its lighthouse now guides "
    "ships past the northern sandbanks towards the old customs house. "
)


def documents(model, k: int, offset: int = 0) -> list[str]:
    """k distinct documents of (just under) 128 tokens each."""
    docs = []
    for i in range(offset, offset + k):
        text = " ".join(SENTENCE.format(name=f"Port {i}", year=1800 + i) for _ in range(6))
        docs.append(model.chunk(text)[0])
    return docs


def run_mode(args: argparse.Namespace) -> dict:
    """Measure one mode in this process; printed as JSON for the parent."""
    mode, _, backend = args.mode.partition("-")
    if mode == "oscar":
        model = load_model(
            args.tiny, args.device, compressor=f"first-layers:{args.layers}", rerank_head=True
        )
    else:
        model = load_model(args.tiny, args.device)
    if backend:  # written to GGUF (cached) and loaded before any timing
        model.set_decoding_backend("llama.cpp", weights=args.llamacpp_weights)
    question = "Which harbour was rebuilt after the storm?"

    def answer(batch: int, k: int, new_tokens: int = args.new_tokens) -> None:
        gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        docs = [documents(model, k, 1000 * b) for b in range(batch)]
        qs = [question] * batch
        if mode == "text":
            model.generate_from_text(qs, docs, batch_size=batch, **gen)
            return
        if mode == "pisco":
            contexts = [memories[tuple(d)] for d in docs]
        else:  # OSCAR: compression with the question is part of answering
            flat = [d for ds in docs for d in ds]
            mems = model.compress(
                flat, queries=[question] * len(flat), use_store=False, batch_size=len(flat)
            )
            contexts = [mems[b * k : (b + 1) * k] for b in range(batch)]
        model.generate(qs, contexts, batch_size=batch, **gen)

    memories: dict[tuple[str, ...], list] = {}
    if mode == "pisco":  # offline: precomputed, not timed
        for k in {args.k, *args.scaling_ks}:
            for b in range(max(args.batch, 1)):
                docs = documents(model, k, 1000 * b)
                memories[tuple(docs)] = model.compress(docs, use_store=False)

    def timed(batch: int, k: int, new_tokens: int = args.new_tokens) -> float:
        t = time.perf_counter()
        answer(batch, k, new_tokens)
        return time.perf_counter() - t

    with torch.inference_mode():
        timed(1, args.k)  # warm-up
        latency = statistics.median(timed(1, args.k) for _ in range(args.repeats))
        first_token = statistics.median(timed(1, args.k, 1) for _ in range(args.repeats))
        batch_time = statistics.median(timed(args.batch, args.k) for _ in range(args.repeats))
        scaling = {
            str(k): statistics.median(timed(1, k) for _ in range(max(1, args.repeats // 2)))
            for k in args.scaling_ks
        }
        flops, prompt_tokens = prefill_flops(model, mode, args.k, question)
    extra = {}
    if mode == "text":  # the llama.cpp anchor reads exactly this prompt
        (prompt,) = model._pisco_prompts([question], [documents(model, args.k)])
        extra["prompt_ids"] = prompt.input_ids
    if backend:
        extra["weights"] = f"{args.llamacpp_weights} (decoder merged into a GGUF file)"
    return {
        **extra,
        "mode": args.mode,
        "latency_ms_batch1": 1000 * latency,
        "profile_batch1": {  # where the latency goes
            "to_first_token_ms": 1000 * first_token,  # compression (OSCAR) + prefill
            "decode_ms_per_token": 1000 * (latency - first_token) / max(args.new_tokens - 1, 1),
        },
        f"throughput_qps_batch{args.batch}": args.batch / batch_time,
        "prefill_gflops": flops / 1e9,
        "prompt_tokens": prompt_tokens,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "scaling_ms_per_query": {k: 1000 * v for k, v in scaling.items()},
    }


def run_llama_cpp(args: argparse.Namespace) -> dict:
    """Text RAG in llama.cpp (llama-cpp-python) on the GGUF file of the embedded backbone: the
    text mode's prompt token ids, greedy, ``--new-tokens`` tokens (eos ignored, as
    ``min_new_tokens`` does for the other modes), a fresh KV cache for every run."""
    from llama_cpp import Llama

    from pisco_rag.defaults import DEFAULT_BACKBONE, embedded_gguf_path

    prompt_ids = json.loads(args.prompt_ids.read_text())
    gguf = embedded_gguf_path(DEFAULT_BACKBONE.removeprefix("embedded:"))
    threads = torch.get_num_threads()
    llm = Llama(str(gguf), n_ctx=2048, n_batch=512, n_threads=threads, verbose=False)

    def timed(new_tokens: int) -> float:
        llm.reset()  # no prefix reuse between runs: every run reads the whole prompt
        t = time.perf_counter()
        for n, _ in enumerate(llm.generate(prompt_ids, temp=0.0, top_k=1, reset=True), 1):
            if n == new_tokens:
                break
        return time.perf_counter() - t

    timed(args.new_tokens)  # warm-up
    latency = statistics.median(timed(args.new_tokens) for _ in range(args.repeats))
    first_token = statistics.median(timed(1) for _ in range(args.repeats))
    return {
        "mode": LLAMA_CPP,
        "weights": f"{gguf.name} (as shipped), {threads} threads",
        "latency_ms_batch1": 1000 * latency,
        "profile_batch1": {
            "to_first_token_ms": 1000 * first_token,
            "decode_ms_per_token": 1000 * (latency - first_token) / max(args.new_tokens - 1, 1),
        },
        "prompt_tokens": len(prompt_ids),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def prefill_flops(model, mode: str, k: int, question: str) -> tuple[float, int]:
    """FLOPs of everything before the first generated token (OSCAR's compression included;
    PISCO's offline compression not)."""
    docs = documents(model, k)
    if mode == "pisco":
        memories = model.compress(docs, use_store=False)
    counter = FlopCounterMode(display=False)
    with counter:
        if mode == "oscar":
            memories = model.compress(docs, queries=[question] * k, use_store=False)
        (prompt,) = model._pisco_prompts([question], [docs if mode == "text" else memories])
        embeds, mask = model._embed([prompt])
        model.model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=1)
    return float(counter.get_total_flops()), len(prompt.input_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--layers", type=int, default=5, help="OSCAR compressor layers")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling-ks", type=int, nargs="*", default=[1, 5, 10, 20, 50])
    parser.add_argument("--device", default=None)
    parser.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument(
        "--llama-cpp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add text RAG in llama.cpp as the anchor (default: when llama-cpp-python is "
        "installed: pip install 'pisco-rag[bench]')",
    )
    parser.add_argument(
        "--llamacpp-weights",
        default="f32",
        choices=("f32", "f16", "q8_0", "q4_1"),
        help="weights of the llama.cpp decoding modes (f32: the torch answers)",
    )
    parser.add_argument(
        "--mode", choices=[*MODES, *LLAMACPP_DECODING, LLAMA_CPP], help=argparse.SUPPRESS
    )  # child process
    parser.add_argument("--prompt-ids", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_llama_cpp(args) if args.mode == LLAMA_CPP else run_mode(args)))
        return
    if args.llama_cpp is None:
        args.llama_cpp = not args.tiny and importlib.util.find_spec("llama_cpp") is not None

    rows = {}
    for mode in [*MODES, *([*LLAMACPP_DECODING, LLAMA_CPP] if args.llama_cpp else [])]:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        with tempfile.NamedTemporaryFile("w", suffix=".json") as ids:
            if mode == LLAMA_CPP:
                json.dump(rows["text"].pop("prompt_ids"), ids)
                ids.flush()
                cmd += ["--prompt-ids", ids.name]
            child = subprocess.run(cmd, capture_output=True, text=True)
        if child.returncode != 0:
            sys.exit(f"the {mode} run failed:\n{child.stderr[-3000:]}")
        rows[mode] = json.loads(child.stdout.strip().splitlines()[-1])
        print(f"{mode:6s}", {k: v for k, v in rows[mode].items() if k != "prompt_ids"})
    rows["text"].pop("prompt_ids", None)
    text = rows["text"]
    key = f"throughput_qps_batch{args.batch}"
    result = {
        "benchmark": "speed",
        "protocol": {
            "k": args.k,
            "new_tokens": args.new_tokens,
            "batch": args.batch,
            "repeats": args.repeats,
            "oscar_layers": args.layers,
            "model": "tiny-random-llama" if args.tiny else "SmolLM2-135M-Instruct",
        },
        "modes": rows,
        "speedup_vs_text": {
            m: {
                "latency_batch1": text["latency_ms_batch1"] / rows[m]["latency_ms_batch1"],
                f"throughput_batch{args.batch}": rows[m][key] / text[key],
                "prefill_flops": text["prefill_gflops"] / rows[m]["prefill_gflops"],
            }
            for m in rows
            if m not in ("text", LLAMA_CPP)
        },
        **(
            {
                "speedup_vs_llama_cpp_text": {
                    m: {
                        "latency_batch1": rows[LLAMA_CPP]["latency_ms_batch1"]
                        / rows[m]["latency_ms_batch1"],
                        "to_first_token": rows[LLAMA_CPP]["profile_batch1"]["to_first_token_ms"]
                        / rows[m]["profile_batch1"]["to_first_token_ms"],
                    }
                    for m in rows
                    if m != LLAMA_CPP
                }
            }
            if LLAMA_CPP in rows
            else {}
        ),
        "environment": environment(),
    }
    write(result, args.out)
    plot(result, args.out.with_suffix(".png"))


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, (latency, left, right) = plt.subplots(1, 3, figsize=(15, 4))
    modes = result["modes"]
    names = list(modes)
    first = [modes[m]["profile_batch1"]["to_first_token_ms"] for m in names]
    rest = [modes[m]["latency_ms_batch1"] - f for m, f in zip(names, first)]
    latency.bar(names, first, color="tab:orange", label="to first token")
    latency.bar(names, rest, bottom=first, color="tab:purple", label="decoding")
    latency.set_ylabel("ms per query (batch 1)")
    latency.set_title(
        f"latency, k={result['protocol']['k']}, {result['protocol']['new_tokens']} tokens"
    )
    latency.legend()
    ours = [m for m in names if m != LLAMA_CPP]
    key = next(k for k in modes["text"] if k.startswith("throughput"))
    left.bar(ours, [modes[m][key] for m in ours], color=[f"C{i}" for i in range(len(ours))])
    left.set_ylabel("queries / s")
    left.set_title(
        f"throughput, {key.removeprefix('throughput_qps_')}, k={result['protocol']['k']}"
    )
    for m, style in zip(ours, ("o-", "s-", "^-", "s--", "^--")):
        ks = [int(k) for k in modes[m]["scaling_ms_per_query"]]
        right.plot(ks, list(modes[m]["scaling_ms_per_query"].values()), style, label=m)
    right.set_xlabel("documents per query (k)")
    right.set_ylabel("ms per query (batch 1)")
    right.set_title("time per query as k grows")
    right.legend()
    fig.suptitle(
        f"{result['protocol']['model']}, {result['environment']['processor']}, "
        f"{result['environment']['cpu_count']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
