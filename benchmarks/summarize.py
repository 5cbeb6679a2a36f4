"""Print the README's results tables from the JSON files under benchmarks/results/.

python benchmarks/summarize.py
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    speed = load("speed")
    if speed:
        p = speed["protocol"]
        key = f"throughput_qps_batch{p['batch']}"
        print(
            f"Speed ({p['model']}, k={p['k']}, {p['new_tokens']} new tokens, greedy; "
            f"`{speed['environment']['command']}`):\n"
        )
        print(
            f"| mode | latency, batch 1 | to first token | decode per token | throughput, "
            f"batch {p['batch']} | prefill GFLOPs | prompt tokens | peak RSS |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for mode, row in speed["modes"].items():
            prof = row["profile_batch1"]
            print(
                f"| {mode} | {row['latency_ms_batch1']:.0f} ms | "
                f"{prof['to_first_token_ms']:.0f} ms | {prof['decode_ms_per_token']:.1f} ms | "
                + (f"{row[key]:.2f} q/s | " if key in row else "n/a | ")
                + (f"{row['prefill_gflops']:.1f} | " if "prefill_gflops" in row else "n/a | ")
                + f"{row['prompt_tokens']} | {row['peak_rss_mib']:.0f} MiB |"
            )
        ratio_key = f"throughput_batch{p['batch']}"
        for mode, s in speed["speedup_vs_text"].items():
            print(
                f"\n{mode} vs text: latency x{s['latency_batch1']:.2f}, throughput "
                f"x{s[ratio_key]:.2f}, prefill FLOPs x{s['prefill_flops']:.1f} fewer",
                end="",
            )
        for mode, s in speed.get("speedup_vs_llama_cpp_text", {}).items():
            print(
                f"\n{mode} vs llama.cpp text RAG: latency x{s['latency_batch1']:.2f}, time to "
                f"first token x{s['to_first_token']:.2f}",
                end="",
            )
        print("\n")
        modes = speed["modes"]
        ks = list(next(iter(modes.values()))["scaling_ms_per_query"])
        print("Time per query at batch 1 as k grows (ms):\n")
        print("| mode | " + " | ".join(f"k={k}" for k in ks) + " |")
        print("|---|" + "---|" * len(ks))
        for mode, row in modes.items():
            if "scaling_ms_per_query" not in row:
                continue
            cells = " | ".join(f"{row['scaling_ms_per_query'][k]:.0f}" for k in ks)
            print(f"| {mode} | {cells} |")
        print()
    decode = load("decode_techniques")
    if decode:
        p = decode["protocol"]
        print(
            f"Decoding at batch 1 ({p['model']}, {p['prompt_tokens']}-token PISCO prompt, "
            f"{p['new_tokens']} greedy tokens; `{decode['environment']['command']}`):\n"
        )
        print("| technique | decode per token | speed-up | to first token | same greedy tokens |")
        print("|---|---|---|---|---|")
        for name, row in decode["techniques"].items():
            same = (
                "yes"
                if row["greedy_tokens_as_reference"]
                else f"no (from token {row['first_different_token']})"
            )
            print(
                f"| {name} | {row['decode_ms_per_token']:.1f} ms | "
                f"x{row['speedup_vs_default']:.2f} | {row['to_first_token_ms']:.0f} ms | {same} |"
            )
        print()
    splice = load("splice_overhead")
    if splice:
        m = splice["median_seconds"]
        print(
            f"Splicing: {splice['k_memories']} memories in a {splice['prompt_tokens']}-token "
            f"prompt, {splice['new_tokens']} new tokens: {m['from_memories'] * 1000:.0f} ms vs "
            f"{m['plain_prompt'] * 1000:.0f} ms for a plain prompt of the same length "
            f"({splice['overhead_percent']:+.1f}%); `{splice['environment']['command']}`\n"
        )
    cost = load("compression_cost")
    if cost:
        m = cost["median_seconds"]
        print(
            f"Compression of k={cost['k_documents']}: full backbone ({cost['backbone_layers']} "
            f"layers) {m['pisco_full_backbone'] * 1000:.0f} ms, OSCAR "
            f"{cost['compressor_layers']}-layer compressor with the query and head "
            f"{m['oscar_first_layers'] * 1000:.0f} ms: ratio {cost['oscar_over_pisco']:.3f} "
            f"(layer ratio {cost['layer_ratio']:.3f}); `{cost['environment']['command']}`\n"
        )
    quality = load("quality")
    if quality:
        print(f"Answers ({quality['title']}; `{quality['environment']['command']}`):\n")
        print("| k | system | Match | EM | F1 | Match vs text | seconds |")
        print("|---|---|---|---|---|---|---|")
        for k, rows in quality["by_k"].items():
            for system in ("text", "pisco", "oscar"):
                if system not in rows:
                    continue
                m, ratio = rows[system]["metrics"], rows["match_vs_text"].get(system)
                print(
                    f"| {k} | {system} | {m['match']:.3f} | {m['em']:.3f} | {m['f1']:.3f} | "
                    f"{'' if ratio is None else f'{ratio:.2f}x'} | {rows[system]['seconds']:.0f} |"
                )
        print(f"\nPrompt (k={quality['settings']['prompt_k']}), Match: ", end="")
        print(
            "; ".join(
                f"{name}: text {v['text']['metrics']['match']:.3f}, "
                f"pisco {v['pisco']['metrics']['match']:.3f}"
                for name, v in quality["prompts"].items()
            )
            + "\n"
        )
    rerank = load("reranking")
    if rerank:
        print(f"Reranking ({rerank['title']}; `{rerank['environment']['command']}`):\n")
        print("| ranker | recall@1 | recall@5 | nDCG@5 | MRR |")
        print("|---|---|---|---|---|")
        for name, row in rerank["rankers"].items():
            if "metrics" in row:
                m = row["metrics"]
                print(
                    f"| {name} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | "
                    f"{m['ndcg@5']:.3f} | {m['mrr']:.3f} |"
                )
            else:
                print(f"| {name} | {row['note']} ||||")
        print()


if __name__ == "__main__":
    main()
