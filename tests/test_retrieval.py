"""Dense retrieval on the PISCO backbone (the retriever adapter) on tiny random models."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_backbone, tiny_pisco

from pisco_rag import PiscoInputError, PiscoModel
from pisco_rag.adapters import DECODER, RETRIEVER, active_adapters

PASSAGES = [
    "The Elbe flows through Dresden and Hamburg.",
    "Mount Kilimanjaro is the highest mountain in Africa.",
    "Marie Curie won Nobel prizes in physics and chemistry.",
]


@pytest.fixture(scope="module")
def retriever_model() -> PiscoModel:
    model = tiny_pisco(seed=3)
    model.add_retriever()
    with torch.no_grad():  # a trained-looking retriever: B != 0
        for name, p in model.model.named_parameters():
            if f"lora_B.{RETRIEVER}" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.refresh_fingerprint()
    return model


def test_embeddings_are_normalised_deterministic_and_batch_invariant(retriever_model):
    docs = retriever_model.embed_documents(PASSAGES, batch_size=2)
    assert docs.shape == (3, retriever_model.hidden_size) and docs.dtype == torch.float32
    torch.testing.assert_close(docs.norm(dim=-1), torch.ones(3))
    one_by_one = torch.cat([retriever_model.embed_documents([p]) for p in PASSAGES])
    torch.testing.assert_close(docs, one_by_one, atol=1e-5, rtol=1e-5)
    queries = retriever_model.embed_queries(["Which river?"])
    # the query prefix makes a question embed differently from the same text as a passage
    assert not torch.allclose(queries, retriever_model.embed_documents(["Which river?"]))
    assert active_adapters(retriever_model.model) == [DECODER]


def test_embeddings_survive_compression_and_generation_in_between(retriever_model):
    before = retriever_model.embed_documents(PASSAGES)
    memories = retriever_model.compress(PASSAGES[:1])
    retriever_model.generate(["Which river?"], [memories], max_new_tokens=3)
    torch.testing.assert_close(retriever_model.embed_documents(PASSAGES), before)


def test_retriever_adapter_round_trip_and_the_fingerprint(retriever_model, tmp_path):
    plain = tiny_pisco(seed=3)
    # retrieval never changes memories or answers: same fingerprint with or without it
    assert plain.fingerprint == retriever_model.fingerprint
    assert tiny_pisco(seed=3, retriever=True).config.retriever
    backbone, tok = tiny_backbone("llama", 3)  # the same weights tiny_pisco(seed=3) starts from
    backbone.save_pretrained(tmp_path / "backbone")
    tok.save_pretrained(tmp_path / "backbone")
    retriever_model.save_pretrained(tmp_path / "ckpt")
    loaded = PiscoModel.from_pretrained(
        tmp_path / "ckpt", backbone=str(tmp_path / "backbone"), device="cpu"
    )
    assert loaded.config.retriever
    torch.testing.assert_close(
        loaded.embed_documents(PASSAGES), retriever_model.embed_documents(PASSAGES)
    )
    # an older checkpoint without a retriever still loads, and can get one
    plain.save_pretrained(tmp_path / "old")
    old = PiscoModel.from_pretrained(
        tmp_path / "old", backbone=str(tmp_path / "backbone"), device="cpu"
    )
    assert not old.config.retriever
    baseline = old.embed_documents(PASSAGES)  # the plain backbone's embeddings
    fingerprint = old.fingerprint
    old.add_retriever()
    assert old.config.retriever and old.refresh_fingerprint() == fingerprint
    torch.testing.assert_close(old.embed_documents(PASSAGES), baseline)  # identity at first


def test_last_token_pooling_and_threads(retriever_model):
    retriever_model.config.retriever_pooling = "last"
    try:
        last = retriever_model.embed_documents(PASSAGES)
    finally:
        retriever_model.config.retriever_pooling = "mean"
    assert not torch.allclose(last, retriever_model.embed_documents(PASSAGES))
    expected = retriever_model.embed_queries(["Which river?"])
    results, errors = [], []

    def work():
        try:
            results.append(retriever_model.embed_queries(["Which river?"]))
            retriever_model.generate(["Which river?"], [[]], max_new_tokens=2)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(torch.allclose(r, expected, atol=1e-5) for r in results)


@pytest.mark.parametrize(
    ("texts", "match"),
    [("one text", "list of strings"), ([""], "non-empty string"), ([3], "non-empty string")],
)
def test_bad_texts_are_clear_errors(retriever_model, texts, match):
    with pytest.raises(PiscoInputError, match=match):
        retriever_model.embed_documents(texts)


def test_llama_index_vector_index_retrieves_with_the_pisco_embedding(retriever_model):
    from llama_index.core import Document, VectorStoreIndex

    from llama_index_pisco import PiscoEmbedding

    embed = PiscoEmbedding(retriever_model, embed_batch_size=2)
    vector = embed.get_query_embedding("Which river?")
    expected = retriever_model.embed_queries(["Which river?"])[0]
    torch.testing.assert_close(torch.tensor(vector), expected)
    index = VectorStoreIndex.from_documents([Document(text=p) for p in PASSAGES], embed_model=embed)
    nodes = index.as_retriever(similarity_top_k=3).retrieve("Which river?")
    docs = retriever_model.embed_documents(PASSAGES)
    order = (docs @ expected).argsort(descending=True).tolist()
    assert [n.node.text for n in nodes] == [PASSAGES[i] for i in order]
    import asyncio

    many = asyncio.run(embed.aget_text_embedding_batch(PASSAGES))
    torch.testing.assert_close(torch.tensor(many), docs)


def test_langchain_vector_store_retrieves_with_the_pisco_embeddings(retriever_model):
    import asyncio

    from langchain_core.vectorstores import InMemoryVectorStore

    from langchain_pisco import PiscoEmbeddings

    embeddings = PiscoEmbeddings(retriever_model, batch_size=2)
    store = InMemoryVectorStore(embeddings)
    store.add_texts(PASSAGES)
    hits = store.similarity_search("Which river?", k=3)
    expected = retriever_model.embed_queries(["Which river?"])[0]
    docs = retriever_model.embed_documents(PASSAGES)
    order = (docs @ expected).argsort(descending=True).tolist()
    assert [h.page_content for h in hits] == [PASSAGES[i] for i in order]
    assert asyncio.run(embeddings.aembed_query("Which river?")) == pytest.approx(
        expected.tolist(), abs=1e-5
    )
    assert embeddings.embed_documents([]) == []
    with pytest.raises(PiscoInputError, match=r"needs a pisco_rag\.PiscoModel"):
        PiscoEmbeddings("not a model")


def test_cli_ask_retrieves_with_the_model_itself(tmp_path, capsys):
    from pisco_rag.cli import main

    backbone, tok = tiny_backbone("llama", 5)
    backbone.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model = PiscoModel.from_backbone(str(tmp_path / "base"), retriever=True, device="cpu")
    model.save_pretrained(tmp_path / "ckpt")
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, text in enumerate(PASSAGES):
        (folder / f"doc{i}.txt").write_text(text)
    argv = ["ask", str(folder), "Which river?", "--model", str(tmp_path / "ckpt"), "--top-k", "2"]
    assert main([*argv, "--retriever", "pisco", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    loaded = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    scores = loaded.embed_documents(PASSAGES) @ loaded.embed_queries(["Which river?"])[0]
    best = [f"doc{i}.txt" for i in scores.argsort(descending=True).tolist()[:2]]
    sources = [line for line in out.splitlines() if ".txt" in line]
    assert len(sources) == 2 and all(b in s for b, s in zip(best, sources))
