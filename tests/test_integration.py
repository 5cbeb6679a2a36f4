"""Integration tests on the real SmolLM2-135M-Instruct embedded default."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from pisco_rag import PiscoModel, SQLiteMemoryStore
from pisco_rag.chunking import count_tokens
from pisco_rag.cli import main

pytestmark = pytest.mark.integration

PARIS = "Paris is the capital and largest city of France, on the river Seine."


def test_embedded_default_is_the_shipped_pisco_model(smollm):
    from pisco_rag.defaults import SHIPPED_MODELS, model_notice
    from pisco_rag.model import load_embedded

    assert smollm.config.trained and smollm.config.name == "pisco-smollm2-135m"
    assert smollm.config.backbone == "embedded:smollm2-135m-instruct"
    assert sum(f.stat().st_size for f in SHIPPED_MODELS["embedded"].iterdir()) < 30e6
    notice = model_notice(smollm.config)
    assert notice and "Match" in notice  # says, honestly, how good it is
    with pytest.warns(UserWarning, match="Match"):
        warnings.simplefilter("always")
        load_embedded(device="cpu")


def test_embedded_default_retrieves_with_its_own_retriever_adapter(smollm):
    """The shipped retriever adapter ranks the passage that answers first (the plain backbone's
    mean-pooled states do not: recall@5 0.03 on the evaluation split)."""
    assert smollm.config.retriever and smollm.config.retriever_pooling == "mean"
    passages = [
        "The Elbe flows through Dresden and Hamburg into the North Sea.",
        PARIS,
        "Mount Fuji is the highest mountain in Japan.",
        "Marie Curie won Nobel prizes in physics and chemistry.",
    ]
    questions = ["What is the capital of France?", "Which river flows through Hamburg?"]
    scores = smollm.embed_queries(questions) @ smollm.embed_documents(passages).T
    assert scores.argmax(-1).tolist() == [1, 0]


def test_without_shipped_weights_the_default_is_untrained(monkeypatch, tmp_path):
    from pisco_rag import CheckpointError
    from pisco_rag.defaults import SHIPPED_MODELS
    from pisco_rag.model import load_embedded

    monkeypatch.setitem(SHIPPED_MODELS, "embedded", tmp_path / "none")
    monkeypatch.setitem(SHIPPED_MODELS, "embedded-oscar", tmp_path / "none")
    with pytest.warns(UserWarning, match="UNTRAINED"):
        warnings.simplefilter("always")
        model = load_embedded(device="cpu")
    assert model.config.trained is False
    assert (model.config.compressor, model.n_mem) == ("token-mean", 32)  # the shipped kind
    with pytest.raises(CheckpointError, match="ships no 'embedded-oscar' model"):
        PiscoModel.from_pretrained("embedded-oscar")


def test_embedded_oscar_reranks_and_answers(smollm):
    """The shipped OSCAR model ranks with its compressor's pass and answers from token-mean
    memories, the same memories (and decoder) as the embedded reader."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        oscar = PiscoModel.from_pretrained("embedded-oscar", device="cpu")
    assert oscar.config.rerank_head and oscar.config.compressor == "first-layers"
    assert oscar.config.memory_source == "token-mean"
    docs = ["The bakery sells rye bread.", PARIS, "Mount Fuji is in Japan."]
    ranked = oscar.rerank("What is the capital of France?", docs)
    assert sorted(r.index for r in ranked) == [0, 1, 2]
    assert oscar.config.rerank_interaction and ranked[0].index == 1  # the Paris passage first
    torch.testing.assert_close(ranked[0].memories[0].vectors, smollm.compress([PARIS])[0].vectors)
    (answer,) = oscar.generate(
        ["What is the capital of France?"], [ranked[0].memories], max_new_tokens=4
    )
    assert "Paris" in answer


def test_128_token_chunk_gives_32_by_576_memory(smollm):
    words = " ".join(f"word{i}" for i in range(200))
    chunk = smollm.chunk(words)[0]
    assert count_tokens(smollm.tokenizer, chunk) <= 128
    memories = smollm.compress([chunk])
    assert len(memories) == 1 and tuple(memories[0].vectors.shape) == (32, 576)


def test_embedded_default_answers_from_its_memories(smollm):
    """The shipped reader names the entity its memories hold (the 16x default it replaced
    answered name-like strings from any memories: Match 0.00)."""
    passages = [
        "The Elbe flows through Dresden and Hamburg into the North Sea.",
        "Marie Curie won Nobel prizes in physics and chemistry.",
    ]
    questions = [
        "Which river flows through Hamburg?",
        "Who won Nobel prizes in physics and chemistry?",
    ]
    memories = smollm.compress(passages)
    answers = smollm.generate(questions, [[m] for m in memories], max_new_tokens=12)
    assert "Elbe" in answers[0] and "Curie" in answers[1]


def test_batch_with_0_1_and_7_contexts(smollm):
    memories = smollm.compress([f"Fact {i}: the tower has {i} floors." for i in range(7)])
    answers = smollm.generate(
        ["How many floors?"] * 3, [[], memories[:1], memories], max_new_tokens=8
    )
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)


def test_text_baseline_reads_the_passage(smollm):
    (answer,) = smollm.generate_from_text(
        ["What is the capital of France?"], [[PARIS]], adapter="none", max_new_tokens=16
    )
    assert "Paris" in answer


def test_prompt_level_generation_and_streaming(smollm):
    memories = smollm.compress([PARIS])
    prompt = f"Context: {smollm.tag(memories[0])}\nWhat is the capital of France?"
    (completion,) = smollm.complete([prompt], max_new_tokens=6)
    assert 1 <= completion.completion_tokens <= 6
    pieces = list(smollm.stream_complete("Say the word hello.", max_new_tokens=6))
    assert (
        "".join(pieces).strip()
        == smollm.complete(["Say the word hello."], max_new_tokens=6)[0].text
    )


def test_cli_ask_compress_and_info(tmp_path, capsys):
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "paris.txt").write_text(PARIS)
    (folder / "long.md").write_text(" ".join(f"Line {i} of a long note." for i in range(80)))
    (folder / "empty.txt").write_text("   ")
    store = tmp_path / "store.sqlite"

    assert main(["compress", str(folder), "--store", str(store), "--quiet"]) == 0
    first = capsys.readouterr()
    assert "already stored" in first.out
    n = len(SQLiteMemoryStore(store))
    assert n >= 3  # paris + the long note in several chunks; the empty file is skipped
    assert main(["compress", str(folder), "--store", str(store), "--quiet"]) == 0
    assert f"0 compressed, {n} already stored" in capsys.readouterr().out

    assert (
        main(
            [
                "ask",
                str(folder),
                "What is the capital of France?",
                "--text",
                "--top-k",
                "1",
                "--max-new-tokens",
                "12",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "Paris" in out.split("Sources:")[0] and "paris.txt" in out

    assert (
        main(
            [
                "ask",
                str(folder),
                "What is the capital of France?",
                "--store",
                str(store),
                "--max-new-tokens",
                "4",
            ]
        )
        == 0
    )
    assert "Answer (" in capsys.readouterr().out
    assert len(SQLiteMemoryStore(store)) == n  # asked from stored memories only

    assert main(["info"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (
        info["memory_shape"] == [32, 576]
        and info["fingerprint"] == PiscoModel.from_pretrained("embedded", device="cpu").fingerprint
    )


def test_cli_reports_a_missing_folder(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse, before the model loads
        main(["ask", str(tmp_path / "nope"), "Q?"])
    assert exit_info.value.code == 2
    assert "is not a folder" in capsys.readouterr().err
