"""The llama.cpp decoding backend against the torch path, on tiny random models (adapters
randomised, so merging the decoder adapter matters). Needs llama-cpp-python (the
``llama-cpp`` extra, built from source): skipped without it."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_oscar, tiny_pisco

from pisco_rag import PiscoInputError

pytest.importorskip("llama_cpp")

QUESTIONS = ["Which river flows through Hamburg?", "Where does the ferry leave from?"]
DOCS = ["The Elbe flows through Hamburg.", "The ferry to Vallmo leaves from the north pier."]


@pytest.fixture(scope="module")
def model(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("PISCO_RAG_CACHE", str(tmp_path_factory.mktemp("cache")))
    return tiny_pisco("llama")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def answers(model, backend: str, **kwargs) -> list:
    model.set_decoding_backend(backend)
    memories = model.compress(DOCS, use_store=False)
    contexts = [[memories[0]], [memories[1], "a plain text passage about piers"]]
    return model.generate(QUESTIONS, contexts, max_new_tokens=12, **kwargs)


def test_llamacpp_answers_are_the_torch_answers(model):
    reference = answers(model, "torch", min_new_tokens=12)
    assert answers(model, "llama.cpp", min_new_tokens=12) == reference
    assert model.decoding_backend == "llama.cpp"
    model.set_decoding_backend("torch")
    assert model.decoding_backend == "torch"


def test_llamacpp_first_logits_match_torch(model):
    """The merged decoder in llama.cpp computes what the torch decoder computes."""
    import numpy as np

    model.set_decoding_backend("llama.cpp")
    memories = model.compress(DOCS[:1], use_store=False)
    (prompt,) = model._pisco_prompts(QUESTIONS[:1], [memories])
    decoder = model._llamacpp
    with torch.no_grad():
        model._activate_decoder("decoder")  # compress left the encoder adapter on
        embeds, mask = model._embed([prompt])
        expected = model.model(inputs_embeds=embeds, attention_mask=mask).logits[0, -1]
        next(decoder.stream_ids(embeds[0], 1, eos_ids=[]))
    api = decoder._api
    got = np.ctypeslib.as_array(api.llama_get_logits_ith(decoder.llm.ctx, -1), (decoder.n_vocab,))
    torch.testing.assert_close(
        torch.from_numpy(got.copy()), expected[: decoder.n_vocab].float(), atol=1e-3, rtol=1e-3
    )
    model.set_decoding_backend("torch")


def test_llamacpp_stream_and_stop_strings_match_torch(model):
    memories = model.compress(DOCS[:1], use_store=False)
    model.set_decoding_backend("torch")
    streamed = "".join(model.stream(QUESTIONS[0], memories, max_new_tokens=10))
    model.set_decoding_backend("llama.cpp")
    assert "".join(model.stream(QUESTIONS[0], memories, max_new_tokens=10)) == streamed
    model.set_decoding_backend("torch")
    prompt = [f"Context: {DOCS[1]} Question: {QUESTIONS[1]}"]
    full = model.complete(prompt, max_new_tokens=10)[0].text
    words = full.split()
    assert len(words) > 2  # a random model rambles on: there is a second word to stop at
    stop = [words[1]]
    reference = model.complete(prompt, max_new_tokens=10, stop=stop)
    model.set_decoding_backend("llama.cpp")
    assert model.complete(prompt, max_new_tokens=10, stop=stop) == reference
    assert reference[0].finish_reason == "stop"
    model.set_decoding_backend("torch")


def test_llamacpp_refuses_sampling_and_rewrites_after_training(model):
    model.set_decoding_backend("llama.cpp")
    memories = model.compress(DOCS[:1], use_store=False)
    with pytest.raises(PiscoInputError, match="greedily"):
        model.generate(QUESTIONS[:1], [memories], max_new_tokens=4, do_sample=True)
    old = model._llamacpp.path
    with torch.no_grad():  # "training": the decoder adapter changes
        for name, p in model.model.named_parameters():
            if "lora_B.decoder_adapter" in name:
                p.mul_(2.0)
    model.refresh_fingerprint()
    model.set_decoding_backend("torch")
    memories = model.compress(DOCS[:1], use_store=False)
    reference = model.generate(QUESTIONS[:1], [memories], max_new_tokens=8, min_new_tokens=8)
    model.set_decoding_backend("llama.cpp")
    assert model._llamacpp.path != old
    assert model.generate(QUESTIONS[:1], [memories], max_new_tokens=8, min_new_tokens=8) == (
        reference
    )
    model.set_decoding_backend("torch")


def test_llamacpp_oscar_compresses_in_torch_and_decodes_in_llamacpp(monkeypatch, tmp_path):
    monkeypatch.setenv("PISCO_RAG_CACHE", str(tmp_path))
    oscar = tiny_oscar()
    memories = oscar.compress(DOCS, queries=[QUESTIONS[0]] * 2, use_store=False)
    reference = oscar.generate(QUESTIONS[:1], [memories], max_new_tokens=8, min_new_tokens=8)
    oscar.set_decoding_backend("llama.cpp")
    assert oscar.generate(QUESTIONS[:1], [memories], max_new_tokens=8, min_new_tokens=8) == (
        reference
    )


def test_llamacpp_unsupported_backbone_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PISCO_RAG_CACHE", str(tmp_path))
    with pytest.raises(PiscoInputError, match="plain Llama"):
        tiny_pisco("qwen2").set_decoding_backend("llama.cpp")
    with pytest.raises(PiscoInputError, match=r"'torch' or 'llama\.cpp'"):
        tiny_pisco("llama").set_decoding_backend("vllm")


def test_llamacpp_weights_and_context_are_checked(monkeypatch, tmp_path):
    monkeypatch.setenv("PISCO_RAG_CACHE", str(tmp_path))
    model = tiny_pisco("llama")
    with pytest.raises(PiscoInputError, match="weights must be one of"):
        model.set_decoding_backend("llama.cpp", weights="q2_k")
    model.set_decoding_backend("llama.cpp", n_ctx=32)
    memories = model.compress(DOCS, use_store=False)
    with pytest.raises(PiscoInputError, match="n_ctx"):
        model.generate(QUESTIONS[:1], [memories], max_new_tokens=8)
