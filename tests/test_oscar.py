"""OSCAR: query-dependent compressors, the reranking head, naver OSCAR checkpoints."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import randomize_lora, tiny_backbone
from peft import LoraConfig
from peft.functional import get_peft_model_state_dict, inject_adapter_in_model
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from pisco_rag import PiscoInputError, PiscoModel, RerankingUnavailableError

DOCS = [
    "The Elbe flows through Hamburg and Dresden.",
    "Mount Fuji is the highest peak in Japan.",
    "The bakery sells rye bread and cardamom buns.",
]
QUERY = "Which river flows through Hamburg?"


def oscar_model(
    compressor="first-layers:1", rerank_head=True, seed=0, path=None, **kwargs
) -> PiscoModel:
    backbone, tok = tiny_backbone("llama", seed)
    if path is not None:  # a saved backbone, so that checkpoints can name it
        backbone.save_pretrained(path)
        tok.save_pretrained(path)
        backbone = str(path)
    model = PiscoModel.from_backbone(
        backbone,
        None if path else tok,
        compressor=compressor,
        rerank_head=rerank_head,
        device="cpu",
        seed=seed,
        **kwargs,
    )
    randomize_lora(model, seed + 1)
    return model


@pytest.fixture(scope="module")
def oscar() -> PiscoModel:
    return oscar_model()


def count_forward_calls(module: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    module.register_forward_hook(lambda m, args, kwargs_or_out, *rest: calls.append(1))
    return calls


def test_memories_depend_on_the_query(oscar):
    a = oscar.compress(DOCS[:1], queries=[QUERY])[0]
    b = oscar.compress(DOCS[:1], queries=["Where is Mount Fuji?"])[0]
    assert tuple(a.vectors.shape) == (8, 64)
    assert a.key != b.key and a.query == QUERY
    assert not torch.allclose(a.vectors, b.vectors)
    plain = oscar.compress(DOCS[:1])[0]  # without a query: document-only layout
    assert plain.query is None and not torch.allclose(plain.vectors, a.vectors)


def test_scores_come_from_the_same_pass_as_memories():
    model = oscar_model(seed=3)
    calls = count_forward_calls(model.compressor)
    ranked = model.rerank(QUERY, DOCS)
    assert len(calls) == 1  # one compressor forward for memories and scores of all documents
    assert sorted(r.index for r in ranked) == [0, 1, 2]
    assert [r.score for r in ranked] == sorted((r.score for r in ranked), reverse=True)
    for r in ranked:
        (memory,) = r.memories
        assert memory.score == pytest.approx(r.score) and memory.text == DOCS[r.index]
    # the head's score is the dense layer on the <RR> token's hidden state of that same pass
    ids, mask = model.compressor.encode_inputs(DOCS, [QUERY] * 3)
    hidden = model.compressor.body(input_ids=ids, attention_mask=mask)[0]
    expected = model.compressor.head(hidden[:, -1]).squeeze(-1)
    by_index = {r.index: r.score for r in ranked}
    assert [by_index[i] for i in range(3)] == pytest.approx(expected.tolist(), abs=1e-5)
    assert len(model.rerank(QUERY, DOCS, top_n=2)) == 2
    assert len(calls) == 1  # the second call was served from the store


def test_reranked_memories_answer_questions(oscar):
    ranked = oscar.rerank(QUERY, DOCS, top_n=2)
    answers = oscar.generate([QUERY], [[m for r in ranked for m in r.memories]], max_new_tokens=4)
    assert len(answers) == 1 and isinstance(answers[0], str)


def test_rerank_token_does_not_change_memories():
    with_head = oscar_model(rerank_head=True, seed=5)
    without = oscar_model(rerank_head=False, seed=5)
    without.compressor.body.load_state_dict(
        {
            k: v[: without.compressor.body.get_input_embeddings().weight.shape[0]]
            if "embed_tokens" in k
            else v
            for k, v in with_head.compressor.body.state_dict().items()
        }
    )
    a = with_head.compress_texts(DOCS, [QUERY] * 3)
    b = without.compress_texts(DOCS, [QUERY] * 3)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_late_interaction_by_hand():
    from pisco_rag.compressors import late_interaction

    # one sequence: 2 query tokens, then 3 document tokens; states already centred (sum 0)
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0], [-1.0, -2.0]]])
    mask = torch.ones(1, 5, dtype=torch.long)
    query = torch.tensor([[1, 1, 0, 0, 0]])
    # query token 0 best matches doc token 3 (cos 1/sqrt2), token 1 too (cos 1/sqrt2)
    expected = (2**-0.5 + 2**-0.5) / 2
    assert float(late_interaction(hidden, mask, query)) == pytest.approx(expected)
    # a left-padded copy (pads masked out) scores the same
    padded = torch.cat([torch.full((1, 2, 2), 7.0), hidden], dim=1)
    pad_mask = torch.cat([torch.zeros(1, 2, dtype=torch.long), mask], dim=1)
    pad_query = torch.cat([torch.zeros(1, 2, dtype=torch.long), query], dim=1)
    assert float(late_interaction(padded, pad_mask, pad_query)) == pytest.approx(expected)


def test_rerank_interaction_term(tmp_path):
    model = oscar_model(seed=7, path=tmp_path / "bb")
    comp = model.compressor
    ids, mask, query = comp.encode_inputs(DOCS, [QUERY] * 3, query_mask=True)
    for row in range(3):  # exactly the query's tokens are marked
        assert comp.tokenizer.decode(ids[row][query[row].bool()]).strip() == QUERY
    before = model.compress(DOCS, queries=[QUERY] * 3)
    fingerprint = model.fingerprint
    model.add_rerank_interaction()
    assert model.config.rerank_interaction and model.fingerprint != fingerprint
    after = model.compress(DOCS, queries=[QUERY] * 3)
    with torch.no_grad():
        hidden = comp.body(input_ids=ids, attention_mask=mask)[0]
        head = comp.head(hidden[:, -1]).squeeze(-1)
    for a, b, h in zip(before, after, head, strict=True):
        torch.testing.assert_close(a.vectors, b.vectors)  # memories unchanged
        assert a.score == pytest.approx(float(h), abs=1e-5)
        assert b.score != pytest.approx(a.score, abs=1e-3)  # head + 20 x interaction
    model.save_pretrained(tmp_path / "ckpt")
    loaded = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.config.rerank_interaction and loaded.fingerprint == model.fingerprint
    again = loaded.compress(DOCS, queries=[QUERY] * 3)
    assert [m.score for m in again] == pytest.approx([m.score for m in after], abs=1e-5)
    assert comp(ids, mask)[1] is None  # no query mask: no score
    with pytest.raises(PiscoInputError, match="first-layers compressor and a reranking head"):
        oscar_model(rerank_head=False).add_rerank_interaction()


def test_separate_model_compressor_with_connector(tmp_path):
    _, tok = tiny_backbone("llama")
    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    small.save_pretrained(tmp_path / "small")
    tok.save_pretrained(tmp_path / "small")
    model = oscar_model(
        compressor=str(tmp_path / "small"), connector_hidden=48, path=tmp_path / "base"
    )
    assert model.info()["compressor"] == "model"
    memories = model.compress(DOCS, queries=[QUERY] * 3)
    assert all(tuple(m.vectors.shape) == (8, 64) for m in memories)
    assert all(m.score is not None for m in memories)
    # a long query never truncates the document: the input grows instead
    ids, _ = model.compressor.encode_inputs([DOCS[0]], ["why " * 200])
    assert model.compressor.tokenizer.decode(ids[0]).count("Hamburg") == 1

    model.save_pretrained(tmp_path / "ckpt")
    loaded = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.fingerprint == model.fingerprint
    again = loaded.compress(DOCS, queries=[QUERY] * 3)
    for a, b in zip(memories, again, strict=True):
        torch.testing.assert_close(a.vectors, b.vectors)
        assert a.score == pytest.approx(b.score, abs=1e-5)


def test_token_mean_memories_with_oscar_scores(tmp_path):
    """memory_source='token-mean': the compressor's pass scores, the memories are exactly those
    of a token-mean PISCO model on the same backbone (whatever the query), and both survive a
    round trip."""
    kwargs = dict(compression_rate=4, memory_source="token-mean", rerank_interaction=True)
    model = oscar_model(seed=5, path=tmp_path / "bb", **kwargs)
    assert model.config.token_mean_memories and model.compressor.n_mem == 32
    assert model.info()["memories"] == "token-mean"
    reader = PiscoModel.from_backbone(
        str(tmp_path / "bb"), compressor="token-mean", compression_rate=4, device="cpu"
    )
    plain = reader.compress(DOCS)
    for query in (QUERY, "Where is Mount Fuji?"):
        memories = model.compress(DOCS, queries=[query] * 3)
        for m, p in zip(memories, plain, strict=True):
            assert tuple(m.vectors.shape) == (32, 64)
            torch.testing.assert_close(m.vectors, p.vectors)
    ids, mask, query_mask = model.compressor.encode_inputs(DOCS, [QUERY] * 3, query_mask=True)
    with torch.no_grad():
        _, scores = model.compressor(ids, mask, query_mask)
    ranked = model.rerank(QUERY, DOCS)
    assert {r.index: r.score for r in ranked} == pytest.approx(dict(enumerate(scores.tolist())))
    answer = model.generate([QUERY], [ranked[0].memories], max_new_tokens=5)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.config.memory_source == "token-mean" and loaded.fingerprint == model.fingerprint
    again = loaded.rerank(QUERY, DOCS)
    assert [r.score for r in again] == pytest.approx([r.score for r in ranked], abs=1e-5)
    assert loaded.generate([QUERY], [again[0].memories], max_new_tokens=5) == answer


def test_memory_source_settings_are_checked():
    from pisco_rag.compressors import build_compressor
    from pisco_rag.config import PiscoConfig

    with pytest.raises(ValueError, match="memory_source must be one of"):
        PiscoConfig(backbone="b", compressor="first-layers", compressor_layers=1, memory_source="x")
    with pytest.raises(ValueError, match="compressor='token-mean'"):
        PiscoConfig(backbone="b", memory_source="token-mean")
    with pytest.raises(ValueError, match="compressor_memory_tokens"):
        PiscoConfig(
            backbone="b", compressor="first-layers", compressor_layers=1, compressor_memory_tokens=8
        )
    # a compressor trained with 8 memory tokens keeps them under 32 token-mean memories
    config = PiscoConfig(
        backbone="b",
        compressor="first-layers",
        compressor_layers=1,
        rerank_head=True,
        compression_rate=4,
        memory_source="token-mean",
        compressor_memory_tokens=8,
    )
    assert config.n_mem_tokens == 32 and config.compressor_n_mem == 8
    backbone, tok = tiny_backbone("llama")
    compressor = build_compressor(config, backbone, tok)
    ids, _ = compressor.encode_inputs(DOCS[:1], [QUERY])
    tail = compressor.tokenizer.convert_ids_to_tokens(ids[0, -9:].tolist())
    assert tail == [f"<MEM{i}>" for i in range(8)] + ["<RR>"]


def test_native_round_trip_with_head(tmp_path):
    oscar = oscar_model(seed=2, path=tmp_path / "base")
    ranked = oscar.rerank(QUERY, DOCS)
    oscar.save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "compressor.safetensors").is_file()
    loaded = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.fingerprint == oscar.fingerprint and loaded.config.rerank_head
    again = loaded.rerank(QUERY, DOCS)
    assert [r.index for r in again] == [r.index for r in ranked]
    for a, b in zip(ranked, again, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        torch.testing.assert_close(a.memories[0].vectors, b.memories[0].vectors)
    answer = oscar.generate([QUERY], [ranked[0].memories], max_new_tokens=5)
    assert loaded.generate([QUERY], [again[0].memories], max_new_tokens=5) == answer


def test_lora_tuned_compressor_is_saved_by_reference_and_in_half_precision(tmp_path):
    from safetensors.torch import load_file

    from pisco_rag.training.trainable import add_compressor_lora

    oscar = oscar_model(seed=3, path=tmp_path / "base")
    add_compressor_lora(oscar)  # as training with compressor_tuning="lora" leaves it
    oscar.compressor.eval()
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in oscar.compressor.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        rows = oscar.compressor.body.get_input_embeddings().weight
        rows[oscar.compressor.mem_token_ids] += 0.5  # trained memory-token rows
    ranked = oscar.rerank(QUERY, DOCS)

    oscar.save_pretrained(tmp_path / "ckpt")
    stored = load_file(tmp_path / "ckpt" / "compressor.safetensors")
    assert not [k for k in stored if k.startswith("body.")]  # base layers by reference
    assert any(k.startswith("lora.") for k in stored) and "token_rows.values" in stored
    loaded = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.config.compressor_lora_r == oscar.config.lora_r
    again = loaded.rerank(QUERY, DOCS)
    assert [r.index for r in again] == [r.index for r in ranked]
    for a, b in zip(ranked, again, strict=True):
        assert a.score == pytest.approx(b.score, abs=1e-4)
        torch.testing.assert_close(a.memories[0].vectors, b.memories[0].vectors, atol=1e-4, rtol=0)

    oscar.save_pretrained(tmp_path / "half", dtype=torch.float16)
    for name in ("adapters", "compressor", "embeddings"):
        full = (tmp_path / "ckpt" / f"{name}.safetensors").stat().st_size
        assert (tmp_path / "half" / f"{name}.safetensors").stat().st_size < 0.6 * full
    half = PiscoModel.from_pretrained(tmp_path / "half", device="cpu")
    assert half.dtype == torch.float32
    halved = half.rerank(QUERY, DOCS)
    for a, b in zip(ranked, halved, strict=True):
        torch.testing.assert_close(a.memories[0].vectors, b.memories[0].vectors, atol=2e-2, rtol=0)


def test_first_layers_compressor_costs_a_fraction():
    backbone, tok = tiny_backbone("llama")
    n_layers = backbone.config.num_hidden_layers
    model = PiscoModel.from_backbone(backbone, tok, compressor="first-layers:1", device="cpu")
    assert len(model.compressor.body.layers) == 1 < n_layers
    assert isinstance(model.compressor.body.norm, torch.nn.Identity)


# ---------------------------------------------------------------------- naver OSCAR layout
class Trimmed(torch.nn.Module):
    """Mirror of the module whose state dict naver saves as compressor/compressor.pth."""

    def __init__(self, lm):
        super().__init__()
        self.custom_model = lm


def build_naver_oscar(root, *, lora: bool, use_mlp: bool):
    decoder, tok = tiny_backbone("llama", seed=21)
    decoder.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    # compressor: the first layer of the backbone, final norm removed, + memory tokens
    ctok = tiny_backbone("llama", seed=21)[1]
    ctok.add_special_tokens({"additional_special_tokens": [f"<MEM{i}>" for i in range(8)]})
    cfg = LlamaConfig.from_dict(decoder.config.to_dict())
    cfg.num_hidden_layers = 1
    clm = AutoModelForCausalLM.from_config(cfg)
    clm.load_state_dict(decoder.state_dict(), strict=False)
    clm.model.norm = torch.nn.Identity()
    clm.resize_token_embeddings(len(ctok))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # training: all weights when full, only embeddings under LoRA
        for n, p in clm.named_parameters():
            if not lora or "embed_tokens" in n:
                p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    mlp = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 64))
    lora_cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    if lora:
        inject_adapter_in_model(model=clm, peft_config=lora_cfg, adapter_name="compr_adapter")
        with torch.no_grad():
            for n, p in clm.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    clm.eval()

    # decoder: tokens, LoRA decoder adapter
    tok.add_special_tokens(
        {"additional_special_tokens": [*(f"<MEM{i}>" for i in range(8)), "<AE>", "<ENC>", "<SEP>"]}
    )
    decoder.resize_token_embeddings(len(tok))
    inject_adapter_in_model(
        model=decoder,
        peft_config=LoraConfig(
            task_type="CAUSAL_LM",
            r=16,
            lora_alpha=32,
            lora_dropout=0.1,
            target_modules="all-linear",
        ),
        adapter_name="decoder_adapter",
    )
    ckpt = root / "ckpt"
    (ckpt / "compressor").mkdir(parents=True)
    torch.save(
        {"decoder_adapter": get_peft_model_state_dict(decoder, adapter_name="decoder_adapter")},
        ckpt / "adapters.pth",
    )
    torch.save(
        {k: v for k, v in decoder.state_dict().items() if "embed_tokens" in k or "lm_head" in k},
        ckpt / "decoder_first_last_layers.pth",
    )
    if use_mlp:
        torch.save(mlp.state_dict(), ckpt / "compressor" / "mlp.pth")
    if lora:
        torch.save(
            {
                k: v
                for k, v in get_peft_model_state_dict(clm, adapter_name="compr_adapter").items()
                if "lora_" in k
            },
            ckpt / "compressor" / "compressor_adapters.pth",
        )
        torch.save(
            {"custom_model.model.embed_tokens.weight": clm.model.embed_tokens.weight.clone()},
            ckpt / "compressor" / "first_layer.pth",
        )
    else:
        torch.save(Trimmed(clm).state_dict(), ckpt / "compressor" / "compressor.pth")
    config = {
        "model_type": "COCOM",
        "decoder_model_name": str(root / "base"),
        "doc_max_length": 128,
        "compr_rate": 16,
        "sep": True,
        "lora": True,
        "lora_r": 16,
        "training_form": "both",
        "different_mem_tokens": True,
        "compr_model_name": "mistral_trimmed",
        "compr_n_layers": 1,
        "compr_every_n_layer": None,
        "compr_rms_norm": False,
        "compr_base_model_name": str(root / "base"),
        "compr_use_mlp": use_mlp,
        "compr_mlp_hidden_dim": 96,
        "lora_compressor": lora,
        "lora_r_compressor": 4,
    }
    (ckpt / "config.json").write_text(json.dumps(config))
    return clm, ctok, mlp if use_mlp else None


@torch.no_grad()
def naver_reference_memories(clm, ctok, mlp, docs, queries):
    texts = ["\nQuery:\n" + q + "Document:\n" + d for d, q in zip(docs, queries, strict=True)]
    enc = ctok(
        texts,
        return_tensors="pt",
        padding="max_length",
        max_length=136,
        truncation=True,
        add_special_tokens=True,
    )
    mem = torch.tensor(ctok.convert_tokens_to_ids([f"<MEM{i}>" for i in range(8)]))
    ids = torch.cat([enc.input_ids, mem.expand(len(docs), -1)], dim=1)
    mask = torch.cat([enc.attention_mask, torch.ones(len(docs), 8, dtype=torch.long)], dim=1)
    hidden = clm.model(ids, mask, output_hidden_states=True).hidden_states[-1]
    selected = hidden[torch.isin(ids, mem)].reshape(len(docs), 8, -1)
    return mlp(selected) if mlp is not None else selected


@pytest.mark.parametrize(("lora", "use_mlp"), [(False, True), (True, False)])
def test_naver_oscar_checkpoint_matches_direct_computation(tmp_path, lora, use_mlp):
    clm, ctok, mlp = build_naver_oscar(tmp_path, lora=lora, use_mlp=use_mlp)
    queries = [QUERY, "Where is Mount Fuji?"]
    expected = naver_reference_memories(clm, ctok, mlp, DOCS[:2], queries)
    model = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert model.config.compressor == "first-layers" and not model.config.rerank_head
    memories = model.compress(DOCS[:2], queries=queries)
    for m, e in zip(memories, expected, strict=True):
        torch.testing.assert_close(m.vectors, e, atol=1e-4, rtol=1e-4)
    with pytest.raises(RerankingUnavailableError, match="no reranking head"):
        model.rerank(QUERY, DOCS)
    model.save_pretrained(tmp_path / "native")  # naver -> native keeps the memories
    native = PiscoModel.from_pretrained(tmp_path / "native", device="cpu")
    for m, e in zip(native.compress(DOCS[:2], queries=queries), expected, strict=True):
        torch.testing.assert_close(m.vectors, e, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("spelled", ["<RR>", "<MEM0>", "<|im_end|>", "<ENC>"])
def test_special_token_strings_in_documents_and_queries_stay_text(oscar, spelled):
    """A document or query that spells a control token must not become one: only the
    appended memory and rerank ids are control tokens, so scores cannot be steered by text."""
    comp = oscar.compressor
    control = {*comp.mem_token_ids, comp.rerank_token_id, *oscar.tokenizer.all_special_ids}
    ids, mask = comp.encode_inputs([f"The Elbe {spelled} flows."], [f"Which {spelled} river?"])
    n_tail = len(comp.mem_token_ids) + 1
    body = [t for t, m in zip(ids[0, :-n_tail].tolist(), mask[0, :-n_tail].tolist()) if m]
    spelled_id = oscar.tokenizer.convert_tokens_to_ids(spelled)
    assert spelled_id not in body
    assert ids[0, -n_tail:].tolist() == [*comp.mem_token_ids, comp.rerank_token_id]
    assert sum(t in control for t in body) <= 2  # at most the tokenizer's own bos/eos


# ---------------------------------------------------------------------- bad input
def test_oscar_bad_input(oscar, tiny_model):
    with pytest.raises(PiscoInputError, match="queries has 1 entries and documents 3"):
        oscar.compress(DOCS, queries=[QUERY])
    with pytest.raises(PiscoInputError, match=r"queries\[1\] must be a non-empty string"):
        oscar.compress(DOCS[:2], queries=[QUERY, "  "])
    with pytest.raises(PiscoInputError, match="query must be a non-empty string"):
        oscar.rerank("", DOCS)
    with pytest.raises(PiscoInputError, match="needs an OSCAR"):
        tiny_model.compress(DOCS, queries=[QUERY] * 3)
    with pytest.raises(RerankingUnavailableError, match=r"no reranking head.*can still compress"):
        tiny_model.rerank(QUERY, DOCS)
    headless = oscar_model(rerank_head=False, seed=8)
    with pytest.raises(RerankingUnavailableError):
        headless.rerank(QUERY, DOCS)
    assert len(headless.compress(DOCS, queries=[QUERY] * 3)) == 3
    with pytest.raises(PiscoInputError, match="first-layers:N"):
        oscar_model(compressor="first-layers:x")


def test_cli_ask_reranks_with_an_oscar_model(tmp_path, capsys):
    from pisco_rag.cli import main

    model = oscar_model(seed=12, path=tmp_path / "base")
    model.save_pretrained(tmp_path / "oscar")
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(DOCS):
        (folder / f"doc{i}.txt").write_text(doc)
    assert (
        main(
            [
                "ask",
                str(folder),
                QUERY,
                "--model",
                str(tmp_path / "oscar"),
                "--top-k",
                "2",
                "--max-new-tokens",
                "3",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "OSCAR, 3 retrieved, 2 reranked" in out
    sources = [line for line in out.splitlines() if line.strip()[:2] in ("1.", "2.", "3.")]
    assert len(sources) == 2
    expected = model.rerank(QUERY, DOCS, top_n=2)
    assert f"doc{expected[0].index}.txt" in sources[0]
    assert (
        main(
            [
                "compress",
                str(folder),
                "--store",
                str(tmp_path / "s.sqlite"),
                "--model",
                str(tmp_path / "oscar"),
            ]
        )
        == 2
    )
    assert "nothing to precompute" in capsys.readouterr().err
