"""Grounded answers: a short answer aligned to the passage span it names."""

from __future__ import annotations

import dataclasses

import pytest

from pisco_rag import PiscoInputError
from pisco_rag.grounding import ground_answer
from pisco_rag.memory import memory_key

PASSAGES = [
    "The father of toxicology is Michael Voltaggio , a Spanish chemist .",
    "Hamburg lies on the Elbe , the river that flows into the North Sea .",
]


def test_a_misspelled_name_becomes_the_passage_span():
    assert ground_answer("Michael Volgio", PASSAGES) == "Michael Voltaggio"
    assert ground_answer("michael voltagio", PASSAGES) == "Michael Voltaggio"
    # punctuation around a span is not part of the answer
    assert ground_answer("Elbe,", PASSAGES) == "Elbe"


def test_answers_that_are_not_names_of_the_passages_stay_as_decoded():
    assert ground_answer("Paris", PASSAGES) == "Paris"  # nothing close enough
    sentence = "The river that flows through Hamburg is the Elbe, into the North Sea."
    assert ground_answer(sentence, PASSAGES) == sentence  # longer than 6 words
    assert ground_answer("Michael Volgio", []) == "Michael Volgio"
    assert ground_answer("", PASSAGES) == ""
    assert ground_answer("...", PASSAGES) == "..."


def test_similarity_threshold():
    assert ground_answer("Michael Volgio", PASSAGES, min_similarity=0.95) == "Michael Volgio"
    assert ground_answer("Michael Volgio", PASSAGES, min_similarity=0.5) == "Michael Voltaggio"
    with pytest.raises(PiscoInputError, match="min_similarity"):
        ground_answer("x", PASSAGES, min_similarity=75)
    with pytest.raises(PiscoInputError, match="answer must be a str"):
        ground_answer(None, PASSAGES)  # type: ignore[arg-type]


def _naming(memory, answer: str):
    """``memory`` with the same vectors and a text that holds ``answer`` with one letter more
    (and the key of that text): a decoder reads only the vectors, so it answers the same and
    grounding has a span to find. Returns (that memory, the span)."""
    span = answer.strip() + "x"
    assert 0 < len(answer.split()) <= 6 and ground_answer(answer, [span]) == span, answer
    text = f"It says {span} here."
    key = memory_key(memory.fingerprint, text)
    return dataclasses.replace(memory, text=text, key=key), span


def test_generate_complete_and_stream_ground_on_the_memories_text(tiny_model):
    question = "Which river?"
    (original,) = tiny_model.compress(["The Elbe flows through Hamburg."])
    (raw,) = tiny_model.generate([question], [[original]], max_new_tokens=4)
    memory, span = _naming(original, raw)
    assert tiny_model.generate([question], [[memory]], max_new_tokens=4) == [raw]
    assert tiny_model.generate([question], [[memory]], max_new_tokens=4, ground_answers=True) == [
        span
    ]
    prompt = f"Background: {tiny_model.tag(memory)}\nQuestion: {question}"
    (plain,) = tiny_model.complete([prompt], max_new_tokens=4)
    (grounded,) = tiny_model.complete([prompt], max_new_tokens=4, ground_answers=True)
    assert grounded.text == ground_answer(plain.text, [memory.text])
    assert (grounded.prompt_tokens, grounded.completion_tokens) == (
        plain.prompt_tokens,
        plain.completion_tokens,
    )
    stream = tiny_model.stream_complete(prompt, max_new_tokens=4, ground_answers=True)
    assert list(stream) == [grounded.text] and stream.completion == grounded
    stream.close()


def test_grounding_needs_the_memories_text(tiny_model):
    (memory,) = tiny_model.compress(["The Elbe flows through Hamburg."])
    vectors_only = dataclasses.replace(memory, text=None)
    with pytest.raises(PiscoInputError, match=r"ground_answers.*contexts\[0\]"):
        tiny_model.generate(["Which river?"], [[vectors_only]], ground_answers=True)
    # without grounding the text is not needed
    assert len(tiny_model.generate(["Which river?"], [[vectors_only]], max_new_tokens=2)) == 1


def test_framework_llms_ground_when_asked(tiny_model):
    """PiscoLLM (LlamaIndex) and ChatPisco (LangChain): ``ground_answers=True`` gives the
    core's grounded answer, in one piece when streamed; off by default."""
    from langchain_core.messages import HumanMessage
    from llama_index.core.llms import ChatMessage

    from langchain_pisco import ChatPisco
    from llama_index_pisco import PiscoLLM

    def prompt_of(memory):
        return f"Background: {tiny_model.tag(memory)}\nQuestion: Which river?"

    (original,) = tiny_model.compress(["The Elbe flows through Hamburg."])
    (plain,) = tiny_model.complete(
        [[{"role": "user", "content": prompt_of(original)}]], max_new_tokens=4
    )
    memory, expected = _naming(original, plain.text)
    prompt = prompt_of(memory)

    llm = PiscoLLM(tiny_model, max_new_tokens=4, ground_answers=True)
    assert llm.chat([ChatMessage(content=prompt)]).message.content == expected
    assert [r.delta for r in llm.stream_chat([ChatMessage(content=prompt)])] == [expected]
    assert (
        PiscoLLM(tiny_model, max_new_tokens=4).chat([ChatMessage(content=prompt)]).message.content
        == plain.text
    )

    chat = ChatPisco(pisco_model=tiny_model, max_tokens=4, ground_answers=True)
    assert chat.invoke([HumanMessage(prompt)]).content == expected
    chunks = list(chat.stream([HumanMessage(prompt)]))
    assert "".join(c.content for c in chunks) == expected
    assert chunks[-1].usage_metadata["output_tokens"] == plain.completion_tokens
    assert (
        ChatPisco(pisco_model=tiny_model, max_tokens=4).invoke([HumanMessage(prompt)]).content
        == plain.text
    )
