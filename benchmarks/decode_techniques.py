"""Decoding speed at batch 1, one technique at a time: where the time of a PISCO answer goes.

The shipped PISCO model (SmolLM2-135M), k=10 memories (a 145-token prompt), greedy, 32 tokens
(eos ignored). For each technique: decode ms/token, time to the first token, and whether the
32 greedy tokens are those of eager torch decoding with the peft adapter (the reference).

- torch: eager with the peft adapter (today's default path), the static KV cache of
  transformers, the decoder adapter merged into the weights (peft), both, both plus
  ``torch.compile`` (``--compile``: about a minute of compilation), and dynamic int8
  quantisation of the Linear layers (torch.ao, weights quantised: answers may change);
- llama.cpp (``PiscoModel.set_decoding_backend``, with llama-cpp-python): the decoder merged
  into a GGUF file in f32, f16, q8_0 and q4_1.

    python benchmarks/decode_techniques.py [--compile] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings
from pathlib import Path

import torch
from _common import RESULTS, environment, load_model, write
from speed import documents

NEW_TOKENS = 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="add torch.compile (slow start)")
    parser.add_argument("--tiny", action="store_true", help="tiny random model (smoke test)")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_techniques.json")
    args = parser.parse_args()
    warnings.simplefilter("ignore")

    model = load_model(args.tiny, None)
    memories = model.compress(documents(model, 10), use_store=False)
    (prompt,) = model._pisco_prompts(["Which harbour was rebuilt after the storm?"], [memories])
    model._activate_decoder("decoder")
    with torch.no_grad():
        embeds, mask = model._embed([prompt])
    pad = model.tokenizer.pad_token_id

    def torch_run(new_tokens: int, **kwargs) -> list[int]:
        with torch.inference_mode():
            out = model.model.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                pad_token_id=pad,
                **kwargs,
            )
        return out[0].tolist()

    def measure(run) -> dict:
        run(NEW_TOKENS)  # warm-up
        totals, firsts, tokens = [], [], None
        for _ in range(args.repeats):
            t = time.perf_counter()
            tokens = run(NEW_TOKENS)
            totals.append(time.perf_counter() - t)
            t = time.perf_counter()
            run(1)
            firsts.append(time.perf_counter() - t)
        total, first = statistics.median(totals), statistics.median(firsts)
        return {
            "decode_ms_per_token": round(1000 * (total - first) / (NEW_TOKENS - 1), 2),
            "to_first_token_ms": round(1000 * first, 1),
            "tokens": tokens,
        }

    rows: dict[str, dict] = {}

    def record(name: str, run) -> None:
        rows[name] = measure(run)
        print(f"{name:34s} {rows[name]['decode_ms_per_token']:7.1f} ms/token", flush=True)

    record("torch eager, peft adapter (default)", torch_run)
    record("torch static KV cache", lambda n: torch_run(n, cache_implementation="static"))
    base = model.model
    merged = copy.deepcopy(base)
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in merged.modules():
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=["decoder_adapter"])
    model.model = merged
    record("torch adapter merged", torch_run)
    record("torch merged + static cache", lambda n: torch_run(n, cache_implementation="static"))
    if args.compile:
        from transformers import CompileConfig

        compile_config = CompileConfig(mode="default", fullgraph=False)
        compile_config._compile_all_devices = True  # transformers compiles on GPUs only otherwise
        record(
            "torch merged + static + compile",
            lambda n: torch_run(n, cache_implementation="static", compile_config=compile_config),
        )
    from torch.ao.quantization import quantize_dynamic

    model.model = quantize_dynamic(merged, {torch.nn.Linear}, dtype=torch.qint8)
    record("torch merged + int8 dynamic", torch_run)
    model.model = base
    del merged

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama-cpp-python is not installed: no llama.cpp rows")
    else:
        for weights in ("f32", "f16", "q8_0", "q4_1"):
            model.set_decoding_backend("llama.cpp", weights=weights)
            decoder = model._llamacpp
            eos = [model.tokenizer.eos_token_id]

            def llama_run(n: int, decoder=decoder, eos=eos) -> list[int]:
                return list(decoder.stream_ids(embeds[0], n, eos_ids=eos, min_new_tokens=n))

            record(f"llama.cpp {weights}", llama_run)
        model.set_decoding_backend("torch")

    reference = rows["torch eager, peft adapter (default)"]
    reference_tokens, reference_ms = reference["tokens"], reference["decode_ms_per_token"]
    for row in rows.values():
        same = next(
            (i for i, (a, b) in enumerate(zip(row["tokens"], reference_tokens)) if a != b),
            NEW_TOKENS,
        )
        row["greedy_tokens_as_reference"] = same == NEW_TOKENS
        row["first_different_token"] = None if same == NEW_TOKENS else same
        row["speedup_vs_default"] = round(reference_ms / row["decode_ms_per_token"], 2)
        row["answer"] = model.tokenizer.decode(row.pop("tokens"), skip_special_tokens=True)
    result = {
        "benchmark": "decode_techniques",
        "protocol": {
            "model": "tiny-random-llama" if args.tiny else "SmolLM2-135M-Instruct (embedded)",
            "prompt_tokens": len(prompt.input_ids),
            "new_tokens": NEW_TOKENS,
            "repeats": args.repeats,
        },
        "techniques": rows,
        "environment": environment(),
    }
    write(result, args.out)


if __name__ == "__main__":
    main()
