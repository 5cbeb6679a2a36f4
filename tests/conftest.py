"""Shared fixtures: tiny random models for unit tests, the real SmolLM2 default for integration."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GemmaConfig,
    GemmaForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from pisco_rag import PiscoModel
from pisco_rag.defaults import embedded_backbone_dir

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
)
ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"tie_word_embeddings": False}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "gemma": (GemmaConfig, GemmaForCausalLM, {"head_dim": 16}),
}


def tokenizer():
    """A fresh SmolLM2 tokenizer (real vocabulary and chat template)."""
    return AutoTokenizer.from_pretrained(embedded_backbone_dir("smollm2-135m-instruct"))


def tiny_backbone(arch: str = "llama", seed: int = 0):
    """(random tiny causal LM, its tokenizer) of the given architecture family."""
    tok = tokenizer()
    config_cls, model_cls, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY,
        **extra,
    )
    return model_cls(config).eval(), tok


def randomize_lora(model: PiscoModel, seed: int = 1) -> None:
    """Give the (zero-initialised) LoRA B matrices random values so adapters matter."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.refresh_fingerprint()


def tiny_pisco(arch: str = "llama", seed: int = 0, **kwargs) -> PiscoModel:
    backbone, tok = tiny_backbone(arch, seed)
    model = PiscoModel.from_backbone(backbone, tok, device="cpu", seed=seed, **kwargs)
    randomize_lora(model, seed + 1)
    return model


def tiny_oscar(rerank_head: bool = True, seed: int = 0) -> PiscoModel:
    """A tiny random OSCAR model (first-layer compressor), with a reranking head by default."""
    return tiny_pisco("llama", seed, compressor="first-layers:1", rerank_head=rerank_head)


@pytest.fixture(autouse=True)
def _fresh_warn_once():
    """Each test sees pisco-rag's once-per-process notices as a new process would."""
    from pisco_rag import verbosity

    verbosity._warned.clear()


@pytest.fixture(scope="session")
def tiny_model() -> PiscoModel:
    """A tiny random Llama-family PISCO model (adapters randomised)."""
    return tiny_pisco("llama")


@pytest.fixture(scope="session")
def smollm() -> PiscoModel:
    """The embedded default on SmolLM2-135M-Instruct (integration tests)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrained notice has its own test
        return PiscoModel.from_pretrained("embedded", device="cpu")


LONG_TEXT = " ".join(
    f"Sentence number {i} says that the river Elbe flows through city {i} in the north."
    for i in range(30)
)
