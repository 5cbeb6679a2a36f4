"""Dense retrieval on the PISCO backbone (the retriever adapter) on tiny random models."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from conftest import tiny_backbone, tiny_pisco
from safetensors.torch import load_file, save_file

from pisco_rag import PiscoInputError, PiscoModel
from pisco_rag.adapters import DECODER, RETRIEVER, active_adapters

PASSAGES = [
    "The Elbe flows through Dresden and Hamburg.",
    "Mount Kilimanjaro is the highest mountain in Africa.",
    "Marie Curie won Nobel prizes in physics and chemistry.",
]


def with_retriever(model: PiscoModel) -> PiscoModel:
    """``model`` with a trained-looking retriever adapter (B != 0)."""
    model.add_retriever()
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if f"lora_B.{RETRIEVER}" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    model.refresh_fingerprint()
    return model


@pytest.fixture(scope="module")
def retriever_model() -> PiscoModel:
    return with_retriever(tiny_pisco(seed=3))


def test_embeddings_are_normalised_deterministic_and_batch_invariant(retriever_model):
    docs = retriever_model.embed_documents(PASSAGES, batch_size=2)
    assert docs.shape == (3, retriever_model.hidden_size) and docs.dtype == torch.float32
    torch.testing.assert_close(docs.norm(dim=-1), torch.ones(3))
    one_by_one = torch.cat([retriever_model.embed_documents([p]) for p in PASSAGES])
    torch.testing.assert_close(docs, one_by_one, atol=1e-5, rtol=1e-5)
    # batches are formed by length; the vectors still come back in the order given
    reordered = retriever_model.embed_documents(PASSAGES[::-1], batch_size=2)
    torch.testing.assert_close(reordered, docs.flip(0), atol=1e-5, rtol=1e-5)
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
    # the retriever has its own file (retraining it leaves the reader's files as they were);
    # a checkpoint of the earlier layout, with it inside adapters.safetensors, still loads
    ckpt = tmp_path / "ckpt"
    reader = load_file(ckpt / "adapters.safetensors")
    retriever = load_file(ckpt / "retriever.safetensors")
    assert retriever and all(k.startswith(f"{RETRIEVER}.") for k in retriever)
    assert not any(k.startswith(f"{RETRIEVER}.") for k in reader)
    save_file({**reader, **retriever}, ckpt / "adapters.safetensors")
    (ckpt / "retriever.safetensors").unlink()
    earlier = PiscoModel.from_pretrained(ckpt, backbone=str(tmp_path / "backbone"), device="cpu")
    torch.testing.assert_close(
        earlier.embed_documents(PASSAGES), retriever_model.embed_documents(PASSAGES)
    )
    earlier.save_pretrained(ckpt)  # rewritten in the current layout
    assert (ckpt / "retriever.safetensors").is_file()
    plain.save_pretrained(ckpt)  # a model without a retriever saved over it: no stale file
    assert not (ckpt / "retriever.safetensors").exists()
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


# ---------------------------------------------------------------------- training
def test_invariance_term_by_hand():
    from pisco_rag.training.retriever import invariance_loss

    q = torch.tensor([[1.0, 0.0]])
    q2 = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0]]), dim=-1)
    cands = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    t = 1.0
    # by hand: drift 1 - cos = 1 - 1/sqrt(2); q ranks with logits (1, 0), q2 with (s, s)
    s = 2**-0.5
    pa = torch.tensor([1.0, 0.0]).softmax(0)
    pb = torch.tensor([s, s]).softmax(0)
    kl_ab = (pa * (pa.log() - pb.log())).sum()
    kl_ba = (pb * (pb.log() - pa.log())).sum()
    expected = (1 - s) + (kl_ab + kl_ba) / 2
    torch.testing.assert_close(invariance_loss(q, q2, cands, t), expected)
    assert float(invariance_loss(q, q, cands, t)) == pytest.approx(0.0, abs=1e-6)
    # with one candidate hidden from the perturbed query, only the drift is left
    keep = torch.tensor([[True, False]])
    torch.testing.assert_close(invariance_loss(q, q2, cands, t, keep), torch.tensor(1 - s))


def test_alignment_and_contrastive_terms():
    from pisco_rag.training.retriever import alignment_loss, contrastive_loss

    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0]]), dim=-1)
    cands = torch.nn.functional.normalize(torch.randn(2, 3, 2), dim=-1)
    student = torch.einsum("bh,bnh->bn", q, cands)
    assert float(alignment_loss(q, cands, student, 0.1)) == pytest.approx(0.0, abs=1e-6)
    assert float(alignment_loss(q, cands, -student, 0.1)) > 0.1
    passages = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    right = contrastive_loss(passages, passages, torch.tensor([0, 1]), 0.05)
    wrong = contrastive_loss(passages, passages, torch.tensor([1, 0]), 0.05)
    assert float(right) < 1e-6 < float(wrong)


def test_length_chunks_group_texts_of_similar_length():
    from pisco_rag.training.retriever import length_chunks

    assert length_chunks([100, 10, 250, 12, 90], max_tokens=256) == [[1, 3], [4, 0], [2]]
    assert length_chunks([300, 5], max_tokens=256) == [[1], [0]]  # one text a pass at least
    assert length_chunks([8] * 5, max_tokens=10**6) == [[0, 1, 2, 3, 4]]


def test_perturbations_keep_the_words():
    import random

    from pisco_rag.training.retriever import perturb

    rng = random.Random(0)
    question = "who played the father on father knows best"
    variants = {perturb(question, rng) for _ in range(40)}
    assert len(variants) > 4 and question.lower() in {v.lower() for v in variants} | {question}
    for v in variants:
        assert set(v.lower().split()) - set(question.split()) <= {
            "question:",
            "please",
            "answer:",
            "find",
            "passages",
            "about",
            "this:",
        }


def retriever_records() -> list[dict]:
    """Six retriever training records over PASSAGES, the gold one first."""
    return [
        {
            "question": f"Which passage is number {i}?",
            "documents": [PASSAGES[i % 3], PASSAGES[(i + 1) % 3], PASSAGES[(i + 2) % 3]],
            "gold_index": 0,
            "retrieval_scores": [0.9, 0.3, 0.1],
        }
        for i in range(6)
    ]


def test_train_retriever_moves_only_the_retriever(tmp_path):
    from pisco_rag.training.retriever import RetrieverConfig, train_retriever

    model = tiny_pisco(seed=6)
    memories_before = model.compress(PASSAGES[:1], use_store=False)[0].vectors
    answer_before = model.generate(["Which river?"], [[]], max_new_tokens=3)
    records = retriever_records()
    result = train_retriever(
        model,
        records,
        RetrieverConfig(
            str(tmp_path), batch_size=3, max_steps=4, lr=1e-2, logging_steps=2, show_progress=False
        ),
    )
    assert [e["step"] for e in result["log"]] == [2, 4]
    assert {"alignment", "contrastive", "invariance", "loss"} <= set(result["log"][0])
    lora_b = [p for n, p in model.model.named_parameters() if f"lora_B.{RETRIEVER}" in n]
    assert any(float(p.abs().sum()) > 0 for p in lora_b)  # the retriever moved
    torch.testing.assert_close(
        model.compress(PASSAGES[:1], use_store=False)[0].vectors, memories_before
    )
    assert model.generate(["Which river?"], [[]], max_new_tokens=3) == answer_before
    saved = json.loads((tmp_path / "final" / "config.json").read_text())
    assert saved["retriever"] is True
    with pytest.raises(PiscoInputError, match="retrieval_scores"):
        train_retriever(
            model, [dict(records[0], retrieval_scores=None)], RetrieverConfig(str(tmp_path))
        )
    with pytest.raises(PiscoInputError, match="lr_schedule must be one of"):
        RetrieverConfig(str(tmp_path), lr_schedule="step")


def test_generation_training_keeps_the_retriever_frozen(tmp_path):
    """The second stage (Invar-RAG's generation fine-tuning): training the reader leaves the
    retriever adapter, and so the embeddings, exactly as they were."""
    from pisco_rag.training import TrainConfig, train

    model = with_retriever(tiny_pisco(seed=8))
    queries_before = model.embed_queries(["Which river?"], show_progress=False)
    passages_before = model.embed_documents(PASSAGES, show_progress=False)
    decoder_before = {
        n: p.detach().clone() for n, p in model.model.named_parameters() if f"lora_B.{DECODER}" in n
    }
    records = [dict(r, answer=r["documents"][0]) for r in retriever_records()]
    train(
        model,
        records,
        config=TrainConfig(
            str(tmp_path), max_steps=2, batch_size=3, decoder_lr=1e-2, show_progress=False
        ),
    )
    assert any(
        not torch.equal(p, decoder_before[n])
        for n, p in model.model.named_parameters()
        if n in decoder_before
    )  # the reader moved
    torch.testing.assert_close(
        model.embed_queries(["Which river?"], show_progress=False), queries_before, rtol=0, atol=0
    )
    torch.testing.assert_close(
        model.embed_documents(PASSAGES, show_progress=False), passages_before, rtol=0, atol=0
    )


@pytest.mark.parametrize(
    ("schedule", "rates"),
    [("constant", [1e-2] * 4), ("linear", [1e-2, 7.5e-3, 5e-3, 2.5e-3])],
)
def test_retriever_training_resumes_where_it_stopped(tmp_path, monkeypatch, schedule, rates):
    """A four-step run interrupted in step 3, resumed by a fresh process, ends where four steps
    in one go end (adapter, optimizer, batch sampling and learning-rate schedule restored); a
    finished run extends."""
    from pisco_rag.training import retriever
    from pisco_rag.training.retriever import CHECKPOINT_FILE, RetrieverConfig, train_retriever

    records = retriever_records()

    def run(out, steps, resume=False):
        model = tiny_pisco(seed=6, lora_dropout=0.0)
        cfg = RetrieverConfig(
            str(out),
            batch_size=2,
            max_steps=steps,
            lr=1e-2,
            lr_schedule=schedule,
            logging_steps=1,
            save_steps=2,
            resume=resume,
            show_progress=False,
        )
        log = train_retriever(model, records, cfg)["log"]
        return model.embed_queries(["Which river?"]), log

    straight, straight_log = run(tmp_path / "a", 4)
    assert [e["lr"] for e in straight_log] == pytest.approx(rates)
    calls, step_loss = [], retriever.retriever_step_loss

    def interrupted_in_step_3(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step_loss(*args)

    with monkeypatch.context() as patch:
        patch.setattr(retriever, "retriever_step_loss", interrupted_in_step_3)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "b", 4)
    assert torch.load(tmp_path / "b" / CHECKPOINT_FILE, weights_only=True)["step"] == 2
    resumed, resumed_log = run(tmp_path / "b", 4, resume=True)
    torch.testing.assert_close(resumed, straight)
    assert [e["step"] for e in resumed_log] == [1, 2, 3, 4]
    assert [e["loss"] for e in resumed_log] == [e["loss"] for e in straight_log]
    assert [e["lr"] for e in resumed_log] == pytest.approx(rates)
    _, extended_log = run(tmp_path / "b", 5, resume=True)  # a finished run extends
    assert [e["step"] for e in extended_log] == [1, 2, 3, 4, 5]
    (tmp_path / "b" / CHECKPOINT_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(PiscoInputError, match="delete it to start over"):
        run(tmp_path / "b", 6, resume=True)


def test_length_chunks_and_checkpointing_train_the_same_retriever(tmp_path):
    """Embedding the batch's texts in forward passes of similar length (little padding) and
    recomputing activations in the backward pass (less memory) give the same steps as one
    padded forward pass; checkpointing is switched off again afterwards."""
    from pisco_rag.training.retriever import RetrieverConfig, train_retriever

    results = []
    for chunk_tokens, checkpointing in ((10**6, False), (1, False), (40, True)):
        model = tiny_pisco(seed=6, lora_dropout=0.0)
        cfg = RetrieverConfig(
            str(tmp_path / f"{chunk_tokens}{checkpointing}"),
            batch_size=3,  # 9 passages: one forward pass, one a pass, a few a pass
            max_steps=3,
            lr=1e-2,
            logging_steps=1,
            chunk_tokens=chunk_tokens,
            gradient_checkpointing=checkpointing,
            show_progress=False,
        )
        log = train_retriever(model, retriever_records(), cfg)["log"]
        assert not model.model.is_activation_checkpointing
        results.append((model.embed_queries(["Which river?"]), [e["loss"] for e in log]))
    (padded, padded_losses), *others = results
    assert padded_losses[0] != padded_losses[-1]  # it trained
    for vectors, losses in others:
        torch.testing.assert_close(vectors, padded, rtol=1e-4, atol=1e-5)
        assert losses == pytest.approx(padded_losses, rel=1e-3)


def test_cli_train_stage_retriever(tmp_path):
    from pisco_rag.cli import main

    backbone, tok = tiny_backbone("llama", 2)
    backbone.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"r{i}",
                    "split": "train",
                    "question": f"Which passage {i}?",
                    "documents": PASSAGES,
                    "gold_index": i % 3,
                    "retrieval_scores": [0.5, 0.4, 0.3],
                    "answer": "x",
                }
            )
            + "\n"
            for i in range(4)
        )
    )
    argv = [
        "train",
        str(data),
        "--output",
        str(tmp_path / "run"),
        "--from-backbone",
        str(tmp_path / "base"),
        "--stage",
        "retriever",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--logging-steps",
        "1",
        "--max-passage-tokens",
        "16",
        "--lr-schedule",
        "linear",
        "--decoder-lr",
        "1e-3",
        "--quiet",
        "--device",
        "cpu",
    ]
    assert main(argv) == 0
    report = json.loads((tmp_path / "run" / "retriever_log.json").read_text())
    assert [e["step"] for e in report["log"]] == [1, 2]
    assert [e["lr"] for e in report["log"]] == pytest.approx([1e-3, 5e-4])
    assert report["config"]["max_passage_tokens"] == 16
    model = PiscoModel.from_pretrained(tmp_path / "run" / "final", device="cpu")
    assert model.config.retriever and model.embed_queries(["Which passage?"]).shape[0] == 1
