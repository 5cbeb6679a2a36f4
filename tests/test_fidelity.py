"""Numerical fidelity (docs/fidelity.md): half-precision loading keeps float32 rotary buffers
as transformers does, compression is batch-invariant in every dtype, and naver's truncation of
long documents is available."""

from __future__ import annotations

import pytest
import torch
from conftest import LONG_TEXT, tiny_pisco
from peft import LoraConfig
from peft.functional import inject_adapter_in_model, set_peft_model_state_dict
from test_naver_checkpoint import (
    DOCS,
    QUESTION,
    build_naver_checkpoint,
    reference_answer,
    reference_memories,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from pisco_rag import PiscoModel

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def naver_load(root, dtype):
    """naver's own loading, step by step with transformers and peft: the base model loaded in
    ``dtype`` by transformers, the special tokens, the adapters and the embedding matrices."""
    tok = AutoTokenizer.from_pretrained(root / "base")
    tok.add_special_tokens(
        {"additional_special_tokens": [*(f"<MEM{i}>" for i in range(8)), "<AE>", "<ENC>", "<SEP>"]}
    )
    tok.padding_side = "left"
    base = AutoModelForCausalLM.from_pretrained(root / "base", dtype=dtype)
    base.resize_token_embeddings(len(tok))
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear"
    )
    adapters = torch.load(root / "ckpt" / "adapters.pth", weights_only=True)
    for name in ("decoder_adapter", "encoder_adapter"):
        inject_adapter_in_model(lora, base, adapter_name=name)
        set_peft_model_state_dict(base, adapters[name], adapter_name=name)
    first_last = torch.load(root / "ckpt" / "decoder_first_last_layers.pth", weights_only=True)
    base.load_state_dict(first_last, strict=False)
    return base.eval(), tok


def rotary_buffers(module: torch.nn.Module) -> dict[str, torch.dtype]:
    return {n: b.dtype for n, b in module.named_buffers() if "inv_freq" in n}


def test_bf16_naver_checkpoint_is_bitwise_naver(tmp_path):
    build_naver_checkpoint(tmp_path)
    base, tok = naver_load(tmp_path, torch.bfloat16)
    assert set(rotary_buffers(base).values()) == {torch.float32}  # what transformers keeps
    expected = reference_memories(base, tok, DOCS)
    expected_answer = reference_answer(base, tok, expected, QUESTION, max_new_tokens=12)

    model = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    assert set(rotary_buffers(model.model).values()) == {torch.float32}
    memories = model.compress(DOCS)
    for m, e in zip(memories, expected, strict=True):
        assert torch.equal(m.vectors, e)
    assert model.generate([QUESTION], [memories], max_new_tokens=12) == [expected_answer]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_compression_is_batch_invariant(arch, dtype):
    model = tiny_pisco(arch, seed=3, dtype=dtype)
    texts = ["Short.", "A somewhat longer document about the harbour of Hamburg and its ships."]
    alone = model.compress(texts[:1], use_store=False)[0].vectors
    batched = model.compress([*texts, LONG_TEXT[:300]], use_store=False)[0].vectors
    assert alone.dtype == dtype and torch.equal(alone, batched)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_oscar_compressor_keeps_float32_rotary_buffers(dtype):
    model = tiny_pisco("llama", seed=2, compressor="first-layers:1", dtype=dtype)
    assert set(rotary_buffers(model.compressor).values()) == {torch.float32}
    assert model.compressor.head is None or next(model.compressor.parameters()).dtype == dtype
    a = model.compress(["Short."], queries=["q?"], use_store=False)[0].vectors
    b = model.compress(["Short.", "Longer text here."], queries=["q?", "q?"], use_store=False)
    assert torch.equal(a, b[0].vectors)


@torch.no_grad()
def test_naver_truncation_of_long_documents():
    """long_documents='naver': <ENC>, bos and the first 129 text tokens (no eos), one memory."""
    model = tiny_pisco("llama", seed=4)
    tok = model.tokenizer
    text_ids = tok(LONG_TEXT, add_special_tokens=False)["input_ids"]
    assert len(text_ids) > 200
    (memory,) = model.compress([LONG_TEXT], long_documents="naver", use_store=False)
    ids = [tok.convert_tokens_to_ids("<ENC>"), tok.bos_token_id, *text_ids[:129]]
    ids += model.mem_token_ids
    from pisco_rag.adapters import ENCODER, use_adapter

    use_adapter(model.model, ENCODER)
    hidden = model.model.base_model(input_ids=torch.tensor([ids]))[0]
    torch.testing.assert_close(memory.vectors, hidden[0, -8:], atol=1e-5, rtol=1e-5)
    chunked = model.compress([LONG_TEXT], use_store=False)
    assert len(chunked) > 1 and chunked[0].key != memory.key  # another variant, another key
