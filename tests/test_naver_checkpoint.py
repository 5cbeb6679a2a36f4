"""A tiny checkpoint in naver's COCOM layout (DESIGN section 5) loads natively and reproduces
memories and greedy answers computed directly from the same weights."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_backbone
from peft import LoraConfig
from peft.functional import get_peft_model_state_dict, inject_adapter_in_model, set_adapter
from transformers import LlamaConfig, LlamaForCausalLM

from pisco_rag import CheckpointError, PiscoModel

SYSTEM = (
    "You are a helpful assistant. Your task is to extract relevant information from provided "
    "documents and to answer to questions as briefly as possible."
)
DOCS = ["The Elbe flows through Hamburg and Dresden.", "Mount Fuji is the highest peak in Japan."]
QUESTION = "Which river flows through Hamburg?"


def build_naver_checkpoint(root):
    """Write base/ and ckpt/ exactly as naver's PISCO release lays them out; return the
    reference (model, tokenizer) that produced the files."""
    base, tok = tiny_backbone("mistral", seed=11)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")

    mem_tokens = [f"<MEM{i}>" for i in range(8)]
    tok.add_special_tokens({"additional_special_tokens": [*mem_tokens, "<AE>", "<ENC>", "<SEP>"]})
    tok.padding_side = "left"
    base.resize_token_embeddings(len(tok))
    lora = LoraConfig(
        task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear"
    )
    inject_adapter_in_model(model=base, peft_config=lora, adapter_name="decoder_adapter")
    inject_adapter_in_model(model=base, peft_config=lora, adapter_name="encoder_adapter")
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in base.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        emb = base.get_input_embeddings().weight
        emb[-11:] = torch.randn(emb[-11:].shape, generator=gen)  # trained special tokens
        emb[100] += 0.5  # a base row the training changed too
    base.eval()

    ckpt = root / "ckpt"
    ckpt.mkdir()
    torch.save(
        {
            n: get_peft_model_state_dict(base, adapter_name=n)
            for n in ("decoder_adapter", "encoder_adapter")
        },
        ckpt / "adapters.pth",
    )
    first_last = {
        k: v
        for k, v in base.state_dict().items()
        if "embed_tokens.weight" in k or "lm_head.weight" in k
    }
    torch.save(first_last, ckpt / "decoder_first_last_layers.pth")
    config = {
        "model_type": "COCOM",
        "decoder_model_name": str(root / "base"),
        "doc_max_length": 128,
        "compr_rate": 16,
        "sep": True,
        "lora": True,
        "lora_r": 16,
        "training_form": "both_separately",
        "different_mem_tokens": True,
        "optimize_mem_tokens": True,
        "compr_model_name": None,
        "lora_compressor": False,
        "quantization": "no",
        "attn_implementation": None,
        "device_map": None,
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    return base, tok


@torch.no_grad()
def reference_memories(base, tok, docs):
    set_adapter(base, "encoder_adapter")
    texts = ["<ENC>" + tok.bos_token + d + tok.eos_token for d in docs]
    enc = tok(
        texts,
        return_tensors="pt",
        padding="max_length",  # naver pads every document to the same width
        truncation=True,
        max_length=131,
        add_special_tokens=False,
    )
    mem_ids = torch.tensor(tok.convert_tokens_to_ids([f"<MEM{i}>" for i in range(8)]))
    ids = torch.cat([enc.input_ids, mem_ids.expand(len(docs), -1)], dim=1)
    mask = torch.cat([enc.attention_mask, torch.ones(len(docs), 8, dtype=torch.long)], dim=1)
    hidden = base(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    return hidden[:, -8:]


@torch.no_grad()
def reference_answer(base, tok, memories, question, max_new_tokens=8):
    set_adapter(base, "decoder_adapter")
    slots = "".join(f"<MEM{i}>" for i in range(8)) + "<SEP>"
    user = f"Background:\n{slots * len(memories)}\n\nQuestion:{question}"
    prompt = tok.apply_chat_template(
        [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    embeds = base.get_input_embeddings()(ids)
    mem_ids = tok.convert_tokens_to_ids([f"<MEM{i}>" for i in range(8)])
    positions = [i for i, t in enumerate(ids[0].tolist()) if t in mem_ids]
    flat = torch.cat(list(memories))
    for n, pos in enumerate(positions):  # the plain loop the library vectorises
        embeds[0, pos] = flat[n]
    out = base.generate(
        inputs_embeds=embeds,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
    )
    return tok.decode(out[0], skip_special_tokens=True).strip()


def test_naver_checkpoint_matches_direct_computation(tmp_path):
    base, tok = build_naver_checkpoint(tmp_path)
    expected = reference_memories(base, tok, DOCS)
    expected_answer = reference_answer(base, tok, expected, QUESTION)

    model = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert model.config.trained and model.config.backbone == str(tmp_path / "base")
    memories = model.compress(DOCS)
    for m, e in zip(memories, expected, strict=True):
        torch.testing.assert_close(m.vectors, e, atol=1e-5, rtol=1e-5)
    assert model.generate([QUESTION], [memories], max_new_tokens=8) == [expected_answer]
    assert 100 in model.extra_embedding_rows  # the changed base row is tracked

    # converting to the native format keeps every changed row and the same behaviour
    model.save_pretrained(tmp_path / "native")
    native = PiscoModel.from_pretrained(tmp_path / "native", device="cpu")
    assert native.fingerprint == model.fingerprint
    assert native.generate([QUESTION], [native.compress(DOCS)], max_new_tokens=8) == [
        expected_answer
    ]


def test_missing_naver_file_is_named(tmp_path):
    build_naver_checkpoint(tmp_path)
    (tmp_path / "ckpt" / "adapters.pth").unlink()
    with pytest.raises(CheckpointError, match=r"missing adapters\.pth"):
        PiscoModel.from_pretrained(tmp_path / "ckpt")


def test_wrong_backbone_is_reported(tmp_path):
    build_naver_checkpoint(tmp_path)
    _, tok = tiny_backbone("llama")
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    other.save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(CheckpointError, match="right backbone"):
        PiscoModel.from_pretrained(tmp_path / "ckpt", backbone=str(tmp_path / "other"))


def test_oscar_config_without_compressor_files_names_them(tmp_path):
    build_naver_checkpoint(tmp_path)
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg.update(compr_model_name="mistral_trimmed", compr_n_layers=1, compr_use_mlp=False)
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"OSCAR compressor.*missing compressor\.pth"):
        PiscoModel.from_pretrained(tmp_path / "ckpt")


def test_hub_id_without_network_gives_instructions(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match=r"naver/pisco-mistral.*hf download"):
        PiscoModel.from_pretrained("naver/pisco-mistral", local_files_only=True)


def test_missing_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        PiscoModel.from_pretrained(tmp_path / "nothing-here")
