"""PiscoModel on tiny random models: compression, chunking, generation, splicing, round trips."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, LONG_TEXT, randomize_lora, tiny_backbone, tiny_pisco

from pisco_rag import DocumentTooLongError, PiscoInputError, PiscoModel
from pisco_rag.adapters import ENCODER, active_adapters
from pisco_rag.chunking import count_tokens

QUESTION = "Which river flows through the city?"


def test_short_document_is_one_memory_of_n_mem_vectors(tiny_model):
    (memory,) = tiny_model.compress(["The Elbe flows through Hamburg."])
    assert tuple(memory.vectors.shape) == (8, 64)
    assert memory.fingerprint == tiny_model.fingerprint
    assert memory.source_index == 0 and memory.chunk_index == 0
    assert memory.text == "The Elbe flows through Hamburg."


def test_long_document_is_chunked_without_losing_text(tiny_model):
    n_tokens = count_tokens(tiny_model.tokenizer, LONG_TEXT)
    memories = tiny_model.compress(["short one", LONG_TEXT])
    chunks = [m for m in memories if m.source_index == 1]
    assert len(chunks) >= -(-n_tokens // 128) > 1
    assert [m.chunk_index for m in chunks] == list(range(len(chunks)))
    for m in chunks:
        assert count_tokens(tiny_model.tokenizer, m.text) <= 128
        assert m.text in LONG_TEXT
    assert " ".join(m.text for m in chunks).split() == LONG_TEXT.split()


def test_long_document_policies(tiny_model):
    with pytest.warns(UserWarning, match=r"documents\[0\] is longer than 128 tokens"):
        memories = tiny_model.compress([LONG_TEXT], long_documents="truncate")
    assert len(memories) == 1 and LONG_TEXT.startswith(memories[0].text)
    with pytest.raises(DocumentTooLongError, match=r"documents\[0\] has \d+ tokens"):
        tiny_model.compress([LONG_TEXT], long_documents="error")


def test_compress_reuses_the_store(tiny_model):
    calls = []
    original = tiny_model._compress_batch

    def counting(texts, queries, **kwargs):
        calls.append(len(texts))
        return original(texts, queries, **kwargs)

    tiny_model._compress_batch = counting
    try:
        first = tiny_model.compress(["A fresh text about the Rhine.", "Another about the Oder."])
        second = tiny_model.compress(["A fresh text about the Rhine.", "Another about the Oder."])
    finally:
        del tiny_model._compress_batch
    assert calls == [2]
    for a, b in zip(first, second, strict=True):
        assert a.key == b.key and torch.equal(a.vectors, b.vectors)


def test_batched_compression_equals_one_by_one(tiny_model):
    texts = ["Short.", "A somewhat longer text about rivers and the cities on them.", "Mid text."]
    together = tiny_model.compress_texts(texts)
    for i, t in enumerate(texts):
        alone = tiny_model.compress_texts([t])[0]
        torch.testing.assert_close(together[i], alone, atol=1e-4, rtol=1e-4)


def test_questions_with_0_1_and_7_contexts_in_one_batch(tiny_model):
    memories = tiny_model.compress([f"Document {i} mentions river {i}." for i in range(7)])
    answers = tiny_model.generate([QUESTION] * 3, [[], memories[:1], memories], max_new_tokens=5)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    # batching with left padding gives the same greedy answers as one at a time
    for ctx, batched in zip([[], memories[:1], memories], answers, strict=True):
        assert tiny_model.generate([QUESTION], [ctx], max_new_tokens=5) == [batched]


def test_text_and_memories_mixed_in_one_prompt(tiny_model):
    (memory,) = tiny_model.compress(["The Elbe flows through Hamburg."])
    (prompt,) = tiny_model._pisco_prompts([QUESTION], [[memory, "Plain passage text.", memory]])
    assert prompt.memories == [memory, memory]
    assert prompt.input_ids.count(tiny_model.mem_token_ids[0]) == 2
    text = tiny_model.tokenizer.decode(prompt.input_ids)
    assert "Plain passage text." in text and "Question:" + QUESTION in text
    assert len(tiny_model.generate([QUESTION], [[memory, "Plain passage text."]])) == 1


def test_splicing_writes_each_memory_at_its_slots(tiny_model):
    memories = tiny_model.compress([f"Doc {i} about lakes." for i in range(3)])
    prompts = tiny_model._pisco_prompts([QUESTION, QUESTION], [memories, memories[2:]])
    embeds, mask = tiny_model._embed(prompts)
    mem_ids = torch.tensor(tiny_model.mem_token_ids)
    for row, prompt in enumerate(prompts):
        width = len(prompt.input_ids)
        ids = torch.tensor(prompt.input_ids)
        assert mask[row, -width:].all() and not mask[row, :-width].any()
        slots = torch.nonzero(torch.isin(ids, mem_ids)).flatten() + embeds.shape[1] - width
        expected = torch.cat([m.vectors for m in prompt.memories])
        torch.testing.assert_close(embeds[row, slots], expected)
        others = torch.ones(embeds.shape[1], dtype=torch.bool)
        others[slots] = False
        plain = tiny_model.model.get_input_embeddings()(
            torch.tensor(prompt.input_ids)[~torch.isin(ids, mem_ids)]
        )
        torch.testing.assert_close(embeds[row, -width:][~torch.isin(ids, mem_ids)], plain)


def test_stream_yields_the_greedy_answer(tiny_model):
    memories = tiny_model.compress(["The Elbe flows through Hamburg."])
    pieces = list(tiny_model.stream(QUESTION, memories, max_new_tokens=8))
    assert (
        pieces
        and "".join(pieces).strip()
        == tiny_model.generate([QUESTION], [memories], max_new_tokens=8)[0]
    )


def test_generate_from_text_adapter_choice(tiny_model):
    docs = [["The Elbe flows through Hamburg."]]
    with_decoder = tiny_model.generate_from_text([QUESTION], docs, max_new_tokens=6)
    plain = tiny_model.generate_from_text([QUESTION], docs, max_new_tokens=6, adapter="none")
    assert len(with_decoder) == len(plain) == 1
    # the adapter state is restored after a plain-backbone call
    assert tiny_model.generate_from_text([QUESTION], docs, max_new_tokens=6) == with_decoder
    assert active_adapters(tiny_model.model) == ["decoder_adapter"]


def test_concurrent_calls_do_not_mix_adapters(tiny_model):
    texts = [f"Thread text {i} about a harbour." for i in range(4)]
    expected_mem = tiny_model.compress_texts(texts)
    expected_ans = tiny_model.generate_from_text([QUESTION], [texts[:2]], max_new_tokens=4)
    results: dict[str, list] = {"mem": [], "ans": []}

    def compress():
        for _ in range(3):
            results["mem"].append(tiny_model.compress_texts(texts))

    def answer():
        for _ in range(3):
            results["ans"].append(
                tiny_model.generate_from_text([QUESTION], [texts[:2]], max_new_tokens=4)
            )

    threads = [threading.Thread(target=f) for f in (compress, answer, compress, answer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results["mem"]) == 6 and len(results["ans"]) == 6
    for m in results["mem"]:
        torch.testing.assert_close(m, expected_mem)
    assert all(a == expected_ans for a in results["ans"])


def test_threads_tokenise_prompts_and_documents_with_their_own_settings(tiny_model):
    """A fast tokenizer's split_special_tokens is state that every call sets: a document read
    with special-token strings split and a prompt whose slots must stay slots, tokenised at
    once from several threads, each come out as they do alone (this failed ~4% of the time
    before every call took the tokenizer lock)."""
    from pisco_rag.prompting import text_ids

    renderer, tok = tiny_model.renderer, tiny_model.tokenizer
    turns = renderer.pisco_turns(
        QUESTION, ["a passage that spells <MEM0>"], tiny_model.config.system_prompt
    )
    prompt = renderer.render(turns).input_ids
    document = "A passage that spells <MEM0> and <|im_end|>. " * 20
    document_ids = text_ids(tok, document)
    assert document_ids != tok(document, add_special_tokens=False)["input_ids"]
    wrong: list[str] = []

    def read_documents():
        wrong.extend("document" for _ in range(200) if text_ids(tok, document) != document_ids)

    def render_prompts():
        wrong.extend("prompt" for _ in range(200) if renderer.render(turns).input_ids != prompt)

    threads = [threading.Thread(target=f) for f in (read_documents, render_prompts) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_untrained_model_fingerprint_is_deterministic():
    a = PiscoModel.from_backbone(tiny_backbone("llama")[0], tiny_backbone("llama")[1], seed=3)
    b = PiscoModel.from_backbone(tiny_backbone("llama")[0], tiny_backbone("llama")[1], seed=3)
    assert a.fingerprint == b.fingerprint
    randomize_lora(b, 7)
    assert a.fingerprint != b.fingerprint


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architectures_compress_generate_and_round_trip(arch, tmp_path):
    backbone, tok = tiny_backbone(arch)
    backbone.save_pretrained(tmp_path / "backbone")
    tok.save_pretrained(tmp_path / "backbone")
    model = PiscoModel.from_backbone(str(tmp_path / "backbone"), device="cpu")
    randomize_lora(model)
    memories = model.compress(["The Elbe flows through Hamburg.", LONG_TEXT])
    answers = model.generate([QUESTION, QUESTION], [memories[:1], memories], max_new_tokens=6)

    model.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "adapters.safetensors",
        "config.json",
        "embeddings.safetensors",
    ]
    loaded = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.fingerprint == model.fingerprint
    again = loaded.compress(["The Elbe flows through Hamburg.", LONG_TEXT])
    for a, b in zip(memories, again, strict=True):
        torch.testing.assert_close(a.vectors, b.vectors)
    assert loaded.generate([QUESTION, QUESTION], [again[:1], again], max_new_tokens=6) == answers


def test_dtype_and_device_arguments():
    model = tiny_pisco("llama", dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    (memory,) = model.compress(["Bfloat text."])
    assert memory.vectors.dtype == torch.bfloat16
    assert len(model.generate([QUESTION], [[memory]], max_new_tokens=3)) == 1


def test_stream_reports_its_completion_and_stops_when_closed(tiny_model):
    memories = tiny_model.compress(["The Elbe flows through Hamburg."])
    prompt = f"Context: {tiny_model.tag(memories[0])} Which river?"
    (expected,) = tiny_model.complete([prompt], max_new_tokens=12)
    stream = tiny_model.stream_complete(prompt, max_new_tokens=12)
    assert stream.completion is None
    assert "".join(stream) == expected.text
    assert stream.completion == expected
    # a consumer that stops early ends the generation: far fewer than 200 steps run
    from transformers import StoppingCriteria

    class CountSteps(StoppingCriteria):
        steps = 0

        def __call__(self, input_ids, scores, **kwargs):
            CountSteps.steps += 1
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    stream = tiny_model.stream_complete(
        prompt, max_new_tokens=200, min_new_tokens=200, stopping_criteria=[CountSteps()]
    )
    next(stream, None)
    stream.close()
    assert tiny_model._lock.acquire(timeout=120)  # the generation thread has finished
    tiny_model._lock.release()
    assert 1 <= CountSteps.steps < 200


def test_a_process_that_leaves_a_stream_early_exits_cleanly(tmp_path):
    """A stream abandoned without close() is stopped and joined at exit (it used to abort
    the interpreter with 'terminate called without an active exception', code 134)."""
    script = tmp_path / "leave_stream.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from conftest import tiny_pisco\n"
        "for piece in tiny_pisco().stream_complete('Tell a long story', max_new_tokens=2000):\n"
        "    break\n"
        "print('left the stream')\n"
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "left the stream"
    assert "terminate called" not in result.stderr


def test_prompt_beyond_the_context_is_refused_before_generating(tiny_model):
    window = tiny_model.context_window
    long_question = "word " * window
    with pytest.raises(PiscoInputError, match="beyond the backbone's context"):
        tiny_model.complete([long_question], max_new_tokens=4)
    with pytest.raises(PiscoInputError, match="lower max_new_tokens"):
        tiny_model.stream_complete("hi", max_new_tokens=window)
    assert tiny_model._lock.acquire(blocking=False)  # nothing was left holding the model
    tiny_model._lock.release()


@pytest.mark.parametrize("bad", [None, "5", 2.5, True, 0, -1])
def test_max_new_tokens_must_be_a_positive_int(tiny_model, bad):
    with pytest.raises(PiscoInputError, match="max_new_tokens must be"):
        tiny_model.complete(["hi"], max_new_tokens=bad)


def test_chunks_count_special_token_strings_as_text(tiny_model):
    """A document that spells control tokens is chunked by the tokens the compressor reads
    (special tokens split), so no chunk overflows doc_max_length once encoded."""
    text = " ".join(["<MEM0><SEP><|im_end|> river"] * 60)
    chunks = tiny_model.chunk(text)
    limit = tiny_model.config.doc_max_length
    assert len(chunks) > 1 and "".join(chunks).replace(" ", "") == text.replace(" ", "")
    assert all(
        len(
            tiny_model.tokenizer(c, add_special_tokens=False, split_special_tokens=True)[
                "input_ids"
            ]
        )
        <= limit
        for c in chunks
    )
    assert len(tiny_model.compress([text])) == len(chunks)


@pytest.mark.parametrize("kind", ["pisco", "oscar"])
def test_calibrated_memories_are_standardised_and_survive_save_load(kind, tmp_path):
    backbone, tok = tiny_backbone("llama")
    backbone.save_pretrained(tmp_path / "backbone")
    tok.save_pretrained(tmp_path / "backbone")
    oscar = {"compressor": "first-layers:1", "rerank_head": True} if kind == "oscar" else {}
    model = PiscoModel.from_backbone(str(tmp_path / "backbone"), device="cpu", **oscar)
    randomize_lora(model)
    texts = [
        f"Harbour {i} was rebuilt in {1800 + 7 * i} after storm number {i}." for i in range(24)
    ]
    queries = ["Which harbour was rebuilt?"] * len(texts) if kind == "oscar" else None
    raw = model.compress_texts(texts[:4], queries and queries[:4])
    before = model.fingerprint
    model.calibrate_memories(texts, queries)
    assert model.fingerprint != before  # new memories: memories of the raw model do not mix
    got = model.compress_texts(texts, queries).reshape(-1, model.hidden_size)
    # centred per dimension on the calibration texts, at the norm of the token embeddings
    assert got.mean(0).abs().max() < 1e-3
    table = model._input_embeddings.weight[: min(model._added_token_ids())]
    target = float(table.norm(dim=-1).mean())
    assert float(got.norm(dim=-1).mean()) == pytest.approx(target, rel=1e-3)
    assert not torch.allclose(model.compress_texts(texts[:4], queries and queries[:4]), raw)

    model.save_pretrained(tmp_path / "m")
    loaded = PiscoModel.from_pretrained(tmp_path / "m", device="cpu")
    assert loaded.fingerprint == model.fingerprint
    torch.testing.assert_close(
        loaded.compress_texts(texts[:4], queries and queries[:4]),
        model.compress_texts(texts[:4], queries and queries[:4]),
    )


def test_training_reads_calibrated_memories(tmp_path):
    """The trainer's differentiable compression gives the memories inference gives."""
    from pisco_rag.training import DistillationCollator, StudentModule, train

    model = tiny_pisco("llama")
    records = [
        {
            "question": f"When was harbour {i} rebuilt?",
            "documents": [f"Harbour {i} was rebuilt in {1800 + i}."],
            "answer": str(1800 + i),
        }
        for i in range(6)
    ]
    train(
        model,
        records,
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        batch_size=2,
        calibrate_memories=True,
        show_progress=False,
    )
    assert model.config.memory_shift is not None
    batch = DistillationCollator(model, "answer")(records[:2])
    student = StudentModule(model).eval()
    with torch.no_grad():
        memories, _ = student.compress(batch["enc_input_ids"], batch["enc_attention_mask"])
    expected = model.compress_texts([r["documents"][0] for r in records[:2]])
    torch.testing.assert_close(memories, expected, atol=1e-4, rtol=1e-4)


def test_memory_shift_without_gain_is_refused():
    from pisco_rag.config import PiscoConfig

    with pytest.raises(ValueError, match="memory_shift and memory_gain"):
        PiscoConfig(backbone="x", memory_shift=[0.0, 1.0])


def test_token_mean_memories_are_rescaled_segment_means_and_round_trip(tmp_path):
    """The parameter-free compressor: memory i is the mean input embedding of the i-th of
    n_mem segments of the chunk's tokens, at the embeddings' mean norm. The model keeps only
    the decoder adapter; the trainer's compression is the same; save/load keeps it."""
    from pisco_rag.training import DistillationCollator, StudentModule, train

    backbone, tok = tiny_backbone("llama")
    backbone.save_pretrained(tmp_path / "backbone")
    tok.save_pretrained(tmp_path / "backbone")
    model = PiscoModel.from_backbone(
        str(tmp_path / "backbone"), compressor="token-mean", compression_rate=4, device="cpu"
    )
    randomize_lora(model)
    assert model.n_mem == 32 and not model.config.is_oscar
    text = "The Elbe flows through Hamburg and Dresden before it reaches the North Sea."
    (memory,) = model.compress([text], use_store=False)
    table = model._input_embeddings.weight.detach()
    ids = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < 32  # a short text: some tokens carry two memories
    expected = []
    for i in range(32):
        a, b = i * len(ids) // 32, (i + 1) * len(ids) // 32
        vector = table[ids[a : max(a + 1, b)]].mean(0)
        expected.append(vector / vector.norm() * table.norm(dim=-1).mean())
    torch.testing.assert_close(memory.vectors, torch.stack(expected))
    long_memories = model.compress([LONG_TEXT], use_store=False)
    assert len(long_memories) > 1  # chunked, never truncated

    records = [
        {
            "question": f"When was harbour {i} rebuilt?",
            "documents": [f"Harbour {i}: {1800 + i}."],
            "answer": str(1800 + i),
        }
        for i in range(4)
    ]
    batch = DistillationCollator(model, "answer")(records[:2])
    with torch.no_grad():
        trained_view, _ = (
            StudentModule(model)
            .eval()
            .compress(batch["enc_input_ids"], batch["enc_attention_mask"])
        )
    torch.testing.assert_close(
        trained_view, model.compress_texts(["Harbour 0: 1800.", "Harbour 1: 1801."])
    )
    train(
        model,
        records,
        output_dir=str(tmp_path / "run"),
        max_steps=2,
        batch_size=2,
        decoder_lr=1e-2,
        show_progress=False,
    )
    (after,) = model.compress([text], use_store=False)  # a new fingerprint, the same vectors
    torch.testing.assert_close(after.vectors, memory.vectors)
    memory = after
    answer = model.generate([QUESTION], [[memory]], max_new_tokens=4)

    model.save_pretrained(tmp_path / "ckpt")
    from safetensors.torch import load_file

    adapters = load_file(tmp_path / "ckpt" / "adapters.safetensors")
    assert adapters and not [k for k in adapters if ENCODER in k]
    loaded = PiscoModel.from_pretrained(tmp_path / "ckpt", device="cpu")
    assert loaded.config.compressor == "token-mean" and loaded.fingerprint == model.fingerprint
    torch.testing.assert_close(loaded.compress([text])[0].vectors, memory.vectors)
    assert loaded.generate([QUESTION], [[memory]], max_new_tokens=4) == answer
    with pytest.raises(ValueError, match="reranking head needs an OSCAR"):
        tiny_pisco("llama", compressor="token-mean", rerank_head=True)
    with pytest.raises(PiscoInputError, match="queries= needs an OSCAR"):
        model.compress([text], queries=[QUESTION])
