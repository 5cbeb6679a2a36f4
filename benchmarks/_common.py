"""Shared helpers of the benchmark scripts: model loading and the environment record."""

from __future__ import annotations

import json
import os
import platform
import sys
import warnings
from pathlib import Path

import torch
import transformers

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def tiny_backbone():
    """(2-layer random Llama, SmolLM2 tokenizer) for smoke tests."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from pisco_rag.defaults import embedded_backbone_dir

    tok = AutoTokenizer.from_pretrained(embedded_backbone_dir("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config), tok


def load_model(tiny: bool, device: str | None, compressor: str = "pisco", **kwargs):
    """A PiscoModel on SmolLM2-135M (the shipped embedded default for PISCO, an untrained
    OSCAR model otherwise), or (``tiny``) on a 2-layer random model for smoke tests."""
    from pisco_rag import PiscoModel
    from pisco_rag.defaults import DEFAULT_BACKBONE

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if tiny:
            backbone, tok = tiny_backbone()
            compressor = "first-layers:1" if compressor != "pisco" else compressor
            return PiscoModel.from_backbone(
                backbone, tok, device=device or "cpu", compressor=compressor, **kwargs
            )
        if compressor == "pisco":
            return PiscoModel.from_pretrained("embedded", device=device)
        return PiscoModel.from_backbone(
            DEFAULT_BACKBONE, device=device, compressor=compressor, **kwargs
        )


def subset_documents(rec: dict, n: int) -> dict:
    """The gold passage plus the n-1 best-retrieved distractors, in the record's order."""
    docs = rec["documents"]
    if n >= len(docs) or rec.get("gold_index") is None:
        return rec
    gold = rec["gold_index"]
    scores = rec.get("retrieval_scores") or [0.0] * len(docs)
    others = sorted((i for i in range(len(docs)) if i != gold), key=lambda i: -scores[i])
    keep = sorted([gold, *others[: n - 1]])
    out = dict(rec, documents=[docs[i] for i in keep], gold_index=keep.index(gold))
    out["retrieval_scores"] = [scores[i] for i in keep]
    return out


def read_eval_records(path: str, limit: int | None) -> list[dict]:
    """The first ``limit`` records of an evaluation JSONL file (refusing training-split ones)."""
    from pisco_rag.evaluation.runner import check_eval_split

    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()][:limit]
    check_eval_split(records)
    return records


def write(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
