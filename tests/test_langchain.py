"""LangChain adapters: document compressor, OscarReranker, ChatPisco, byte-store bridge, LCEL
chains, notebook."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import LONG_TEXT, tiny_oscar, tiny_pisco
from langchain_core.callbacks import BaseCallbackHandler, Callbacks
from langchain_core.cross_encoders import BaseCrossEncoder
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import LLMResult
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough
from langchain_core.stores import InMemoryByteStore
from langchain_core.vectorstores import InMemoryVectorStore
from pydantic import ValidationError

from langchain_pisco import (
    MEMORY_COUNT_KEY,
    ORIGINAL_TEXT_KEY,
    RELEVANCE_SCORE_KEY,
    ByteStoreMemoryStore,
    ChatPisco,
    OscarReranker,
    PiscoDocumentCompressor,
    original_documents,
)
from pisco_rag import (
    CorruptMemoryError,
    LRUMemoryStore,
    Memory,
    MemoryMismatchError,
    PiscoInputError,
    PiscoModel,
    RerankingUnavailableError,
    TagError,
)
from pisco_rag.tags import TAG_PATTERN, contains_tag, escape_tags

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "The Elbe river flows through Dresden and Hamburg before reaching the North Sea.",
    "Mount Kilimanjaro, in Tanzania, is the highest mountain in Africa.",
    "The Great Barrier Reef lies off the coast of Queensland, Australia.",
    "Marie Curie won Nobel prizes in both physics and chemistry.",
]
QUESTION = "Which river flows through Dresden?"
PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question from the background documents, briefly."),
        ("human", "Background:\n{context}\n\nQuestion: {question}"),
    ]
)


def split_tags(text: str) -> list[str]:
    """The tags of a compressed document's page_content (which holds nothing else)."""
    tags = TAG_PATTERN.findall(text)
    assert "".join(f"[[pisco:{k}:{m}]]" for k, m in tags) == text
    return [f"[[pisco:{k}:{m}]]" for k, m in tags]


def docs() -> list[Document]:
    return [
        Document(text, id=f"doc-{i}", metadata={"source": f"s{i}"}) for i, text in enumerate(TEXTS)
    ]


def format_docs(documents: Sequence[Document]) -> str:
    return "\n\n".join(d.page_content for d in documents)


class KeepTopK(BaseDocumentCompressor):
    """A plain text compressor (what a text RAG chain has before the swap)."""

    k: int = 2

    def compress_documents(
        self, documents: Sequence[Document], query: str, callbacks: Callbacks | None = None
    ) -> Sequence[Document]:
        return list(documents)[: self.k]


class PromptRecorder(BaseCallbackHandler):
    """Records the messages every chat model receives and the usage of its answers."""

    def __init__(self) -> None:
        self.prompts: list[list[BaseMessage]] = []
        self.usage: list[dict[str, int] | None] = []

    def on_chat_model_start(self, serialized: Any, messages: Any, **kwargs: Any) -> None:
        self.prompts.extend(messages)

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.usage.extend(g.message.usage_metadata for gens in response.generations for g in gens)


def vector_retriever(k: int = 2) -> BaseRetriever:
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=32))
    store.add_documents(docs())
    return store.as_retriever(search_kwargs={"k": k})


def compression_retriever(
    base: BaseRetriever, compressor: BaseDocumentCompressor
) -> Runnable[str, list[Document]]:
    """``ContextualCompressionRetriever`` (langchain-classic), or the same as a Runnable."""
    try:
        from langchain_classic.retrievers import ContextualCompressionRetriever
    except ImportError:  # pragma: no cover - depends on the environment

        def retrieve(query: str) -> list[Document]:
            return list(compressor.compress_documents(base.invoke(query), query))

        return RunnableLambda(retrieve)
    return ContextualCompressionRetriever(base_compressor=compressor, base_retriever=base)


def build_chain(
    base: BaseRetriever, compressor: BaseDocumentCompressor, llm: BaseChatModel
) -> Runnable[str, str]:
    """An ordinary two-stage RAG chain; swapping to PISCO changes only its two arguments."""
    retriever = compression_retriever(base, compressor)
    return (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | PROMPT
        | llm
        | StrOutputParser()
    )


@pytest.fixture(scope="module")
def eos_free(tiny_model: PiscoModel) -> dict[str, Any]:
    """Generation arguments that stop the tiny model from ending early (exact token counts)."""
    ids = {tiny_model.tokenizer.eos_token_id, tiny_model.tokenizer.pad_token_id}
    eos = tiny_model.model.generation_config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos])
    return {"suppress_tokens": sorted(i for i in ids if i is not None)}


# ---------------------------------------------------------------------- compressor
def test_compressor_replaces_text_by_tags_and_keeps_the_rest(tiny_model):
    compressor = PiscoDocumentCompressor(pisco_model=tiny_model)
    inputs = [*docs()[:2], Document(LONG_TEXT, id="long", metadata={"source": "long"})]
    out = compressor.compress_documents(inputs, QUESTION)
    assert [d.id for d in out] == ["doc-0", "doc-1", "long"]
    n_chunks = len(tiny_model.chunk(LONG_TEXT))
    assert n_chunks > 1
    for doc, original in zip(out, inputs, strict=True):
        tags = split_tags(doc.page_content)
        assert len(tags) == doc.metadata[MEMORY_COUNT_KEY]
        assert doc.metadata[ORIGINAL_TEXT_KEY] == original.page_content
        assert doc.metadata["source"] == original.metadata["source"]
        assert not contains_tag(doc.metadata[ORIGINAL_TEXT_KEY])
    assert [d.metadata[MEMORY_COUNT_KEY] for d in out] == [1, 1, n_chunks]
    # the tags stand for the memories of the model's store, chunk after chunk
    expected = tiny_model.compress([LONG_TEXT])
    assert split_tags(out[2].page_content) == [tiny_model.tag(m) for m in expected]
    assert original_documents(out) == inputs  # sources for users: the text, no tag


def test_compressor_empty_inputs(tiny_model):
    compressor = PiscoDocumentCompressor(pisco_model=tiny_model)
    assert compressor.compress_documents([], QUESTION) == []
    assert asyncio.run(compressor.acompress_documents([], QUESTION)) == []
    kept = compressor.compress_documents(
        [Document("  \n", id="blank"), Document(TEXTS[0], id="a")], QUESTION
    )
    assert [d.id for d in kept] == ["a"]  # an empty text has nothing to compress


def test_compressor_async_and_idempotent(tiny_model):
    compressor = PiscoDocumentCompressor(pisco_model=tiny_model)
    sync = compressor.compress_documents(docs(), QUESTION)
    async_ = asyncio.run(compressor.acompress_documents(docs(), "another query"))
    assert [d.page_content for d in async_] == [d.page_content for d in sync]
    assert compressor.compress_documents(sync, QUESTION) == sync  # already compressed


def test_compressor_in_contextual_compression_retriever(tiny_model):
    pytest.importorskip("langchain_classic")
    retriever = compression_retriever(
        vector_retriever(k=3), PiscoDocumentCompressor(pisco_model=tiny_model)
    )
    found = retriever.invoke(QUESTION)
    assert len(found) == 3
    assert all(TAG_PATTERN.fullmatch(d.page_content) for d in found)
    assert {d.metadata[ORIGINAL_TEXT_KEY] for d in found} <= set(TEXTS)
    assert {d.id for d in found} == {
        f"doc-{TEXTS.index(d.metadata[ORIGINAL_TEXT_KEY])}" for d in found
    }
    again = asyncio.run(retriever.ainvoke(QUESTION))
    assert [d.page_content for d in again] == [d.page_content for d in found]


# ---------------------------------------------------------------------- ChatPisco
def test_chat_resolves_tags_like_the_core(tiny_model):
    memory = tiny_model.compress([TEXTS[0]])[0]
    content = f"Background:\n{tiny_model.tag(memory)}\n\nQuestion: {QUESTION}"
    llm = ChatPisco(pisco_model=tiny_model, max_tokens=6)
    message = llm.invoke([SystemMessage("Be brief."), HumanMessage(content)])
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}]
    expected = tiny_model.complete([prompt], max_new_tokens=6)[0]
    assert message.content == expected.text
    rendered = tiny_model.render_prompt(prompt)
    assert [m.key for m in rendered.memories] == [memory.key]  # the tag became a memory slot
    assert message.usage_metadata["input_tokens"] == len(rendered.input_ids)
    assert message.response_metadata["model_name"] == llm.model_name
    assert message.response_metadata["finish_reason"] == expected.finish_reason


def test_chat_usage_stream_batch_and_async_agree(tiny_model, eos_free):
    llm = ChatPisco(pisco_model=tiny_model, max_tokens=7, model_kwargs=eos_free)
    memory = tiny_model.compress([TEXTS[1]])[0]
    prompt = f"{tiny_model.tag(memory)} Where is Kilimanjaro?"
    message = llm.invoke(prompt)
    usage = message.usage_metadata
    assert usage["output_tokens"] == 7
    assert usage["total_tokens"] == usage["input_tokens"] + 7
    assert message.response_metadata["finish_reason"] == "length"

    chunks = list(llm.stream(prompt))
    assert len(chunks) > 1 and chunks[-1].chunk_position == "last"
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert full.content == message.content  # the stream joins to the answer
    assert full.usage_metadata == usage  # exact counts, reported once
    assert full.response_metadata["finish_reason"] == "length"
    assert full.response_metadata["model_name"] == llm.model_name

    streaming = llm.model_copy(update={"streaming": True})
    via_stream = streaming.invoke(prompt)  # invoke streams internally
    assert via_stream.content == message.content and via_stream.usage_metadata == usage

    async def run_async() -> tuple[AIMessage, list[str], list[AIMessage]]:
        one = await llm.ainvoke(prompt)
        pieces = [c.content async for c in llm.astream(prompt)]
        many = await llm.abatch([prompt, "Hello"])
        return one, pieces, many

    one, pieces, many = asyncio.run(run_async())
    assert one.content == message.content
    assert "".join(pieces) == message.content
    assert many[0].content == message.content
    assert [m.content for m in llm.batch([prompt, "Hello"])] == [m.content for m in many]


def spy_on(model: PiscoModel) -> PiscoModel:
    """The model (same weights, store and lock) as a new object that tests may patch freely:
    the session's model stays untouched."""
    return model.with_store(model.store)


@pytest.fixture
def streaming_model(tiny_model) -> tuple[PiscoModel, list[list[Any]]]:
    """The tiny model, recording for each stream opened on it how often it was closed
    (``[stream, closes]``)."""
    model = spy_on(tiny_model)
    opened: list[list[Any]] = []
    real = model.stream_complete

    def spy(prompt, **kwargs):
        stream = real(prompt, **kwargs)
        record = [stream, 0]
        real_close = stream.close

        def close() -> None:
            record[1] += 1
            real_close()

        stream.close = close
        opened.append(record)
        return stream

    model.stream_complete = spy
    return model, opened


@pytest.fixture
def decoding_steps(tiny_model) -> Iterator[list[int]]:
    """Counts the decoder's generation steps (one lm_head call each)."""
    steps: list[int] = []
    handle = tiny_model.model.get_output_embeddings().register_forward_hook(
        lambda *args: steps.append(1)
    )
    yield steps
    handle.remove()


def test_stream_read_to_the_end_is_closed_with_exact_usage(streaming_model, eos_free):
    model, closed_streams = streaming_model
    llm = ChatPisco(pisco_model=model, max_tokens=5, model_kwargs=eos_free)
    message = llm.invoke("Tell me about rivers.")
    chunks = list(llm.stream("Tell me about rivers."))
    (record,) = closed_streams
    stream, closes = record
    assert closes == 1
    # the usage comes from the core's own completion of that stream
    assert stream.completion is not None
    assert chunks[-1].usage_metadata == {
        "input_tokens": stream.completion.prompt_tokens,
        "output_tokens": stream.completion.completion_tokens,
        "total_tokens": stream.completion.prompt_tokens + stream.completion.completion_tokens,
    }
    assert chunks[-1].usage_metadata == message.usage_metadata
    assert "".join(c.content for c in chunks) == message.content == stream.completion.text


def test_stream_abandoned_by_its_consumer_stops_generating(
    streaming_model, eos_free, decoding_steps
):
    model, closed_streams = streaming_model
    max_tokens = 1000  # eos suppressed: an unclosed stream would decode all of them
    llm = ChatPisco(pisco_model=model, max_tokens=max_tokens, model_kwargs=eos_free)
    chunks = llm.stream("Tell me a long story.")
    assert next(chunks).content
    chunks.close()  # the consumer stops reading
    (record,) = closed_streams
    assert record[1] == 1 and record[0].completion is None
    # the next call waits for the model's lock, so the abandoned generation has ended
    assert llm.invoke("hi", max_tokens=1).usage_metadata["output_tokens"] == 1
    assert 0 < len(decoding_steps) - 1 < max_tokens

    async def read_one_and_leave() -> str:
        pieces = llm.astream("Tell me a long story.")
        first = await anext(pieces)
        await pieces.aclose()
        return first.content

    decoding_steps.clear()
    assert asyncio.run(read_one_and_leave())
    assert len(closed_streams) == 2 and closed_streams[1][1] >= 1
    assert closed_streams[1][0].completion is None
    assert llm.invoke("hi", max_tokens=1).usage_metadata["output_tokens"] == 1
    assert 0 < len(decoding_steps) - 1 < max_tokens


def test_chat_standard_parameters_reach_generation(tiny_model):
    calls: list[dict[str, Any]] = []
    model = spy_on(tiny_model)
    real_complete = model.complete

    def spy(prompts, **kwargs):
        calls.append(kwargs)
        return real_complete(prompts, **{**kwargs, "max_new_tokens": 1})

    model.complete = spy
    llm = ChatPisco(
        pisco_model=model,
        temperature=0.7,
        max_tokens=5,
        stop=["\n\n"],
        model_kwargs={"top_k": 3},
        timeout=30,  # hosted-model parameters are accepted and ignored
        max_retries=2,
        api_key="unused",
    )
    llm.invoke("hi", stop=["END"])
    assert calls[-1] == {
        "max_new_tokens": 5,
        "do_sample": True,
        "temperature": 0.7,
        "top_k": 3,
        "stop": ["\n\n", "END"],
    }
    llm.invoke("hi", temperature=0, max_tokens=2)
    assert calls[-1] == {"max_new_tokens": 2, "top_k": 3, "stop": ["\n\n"]}  # greedy
    ChatPisco(pisco_model=model, ground_answers=True).invoke("hi")
    assert calls[-1]["ground_answers"] is True
    params = llm._get_ls_params(stop=["END"])
    assert params["ls_provider"] == "pisco" and params["ls_temperature"] == 0.7
    assert params["ls_max_tokens"] == 5 and params["ls_stop"] == ["\n\n", "END"]
    assert llm._identifying_params["fingerprint"] == tiny_model.fingerprint
    assert llm._llm_type == "pisco"


def test_chat_stop_sequence_cuts_the_answer(tiny_model, eos_free):
    llm = ChatPisco(pisco_model=tiny_model, max_tokens=8, model_kwargs=eos_free)
    full = llm.invoke("Tell me a story.").content
    words = re.findall(r"[A-Za-z]{3,}", full)
    if not words:
        pytest.skip(f"the random model's answer has no word to stop at: {full!r}")
    stop = words[min(1, len(words) - 1)]
    cut = llm.invoke("Tell me a story.", stop=[stop])
    assert stop not in cut.content and len(cut.content) < len(full)
    assert full.startswith(cut.content)
    assert cut.response_metadata["finish_reason"] == "stop"
    # streaming cuts at the same place and reports the same counts
    chunks = list(llm.stream("Tell me a story.", stop=[stop]))
    assert "".join(c.content for c in chunks) == cut.content
    assert chunks[-1].usage_metadata == cut.usage_metadata
    assert chunks[-1].response_metadata["finish_reason"] == "stop"


def test_chat_model_argument_slip_and_defaults(tiny_model):
    llm = ChatPisco(model=tiny_model)  # PiscoModel passed as `model`
    assert llm.pisco_model is tiny_model
    assert llm.model_name and llm.max_tokens == 256 and llm.temperature is None
    named = ChatPisco(pisco_model=tiny_model, model="my-pisco")
    assert named.model_name == "my-pisco"
    with pytest.raises(PiscoInputError, match="serves 'my-pisco'"):
        named.invoke("hi", model="another-model")


# ---------------------------------------------------------------------- bad input
def test_tag_sent_to_another_model_is_text(tiny_model):
    memory = tiny_model.compress([TEXTS[2]])[0]
    prompt = f"Background: {tiny_model.tag(memory)}\nQuestion: where is the reef?"
    # same weights, another store: the tag's secret does not match, so it is only text there
    other_store = tiny_model.with_store(LRUMemoryStore())
    with pytest.warns(UserWarning, match="did not mint"):
        answer = ChatPisco(pisco_model=other_store, max_tokens=2).invoke(prompt)
    assert answer.usage_metadata["output_tokens"] >= 1
    assert other_store.render_prompt(prompt).memories == []
    chunks = list(ChatPisco(pisco_model=other_store, max_tokens=2).stream(prompt))
    assert chunks
    # another model sharing the store: the memory's fingerprint does not match
    other_model = tiny_pisco(seed=7, store=tiny_model.store)
    with pytest.raises(MemoryMismatchError, match="another model"):
        ChatPisco(pisco_model=other_model).invoke(prompt)


@pytest.mark.parametrize(
    "text",
    [
        "[[pisco:not-a-key]]",
        "[[pisco:" + "0" * 32 + ":" + "0" * 16 + "]]",  # forged
        "[[ pisco:" + "a" * 32 + "]]",
    ],
)
def test_tag_like_text_never_fails_a_request(tiny_model, text):
    llm = ChatPisco(pisco_model=tiny_model, max_tokens=2)
    answer = llm.invoke([HumanMessage(f"Background: {text}\nQuestion: ?")])
    assert answer.response_metadata["finish_reason"] in ("stop", "length")
    answer = asyncio.run(llm.ainvoke([AIMessage(text), HumanMessage("go on")]))
    assert answer.usage_metadata["output_tokens"] >= 1


def test_copied_tag_in_document_data_is_never_resolved(tiny_model):
    """A real tag of another document, copied into data, never reaches the LLM as a tag."""
    model = tiny_model.with_store(LRUMemoryStore())
    secret = model.compress(["Tenant B: the vault code is 4471."])[0]
    tag_b = model.tag(secret)
    forged_doc = Document(tag_b, id="x", metadata={ORIGINAL_TEXT_KEY: "innocent text"})
    in_text = Document(f"see {tag_b} here", id="y", metadata={"title": f"copy {tag_b}"})
    out = PiscoDocumentCompressor(pisco_model=model).compress_documents(
        [forged_doc, in_text], QUESTION
    )
    innocent, quoted = model.compress(["innocent text", f"see {tag_b} here"])
    assert split_tags(out[0].page_content) == [model.tag(innocent)]
    assert split_tags(out[1].page_content) == [model.tag(quoted)]
    assert not contains_tag(out[1].metadata["title"])  # metadata is data too: escaped
    chain = (
        {"context": RunnableLambda(lambda _: out) | format_docs, "question": RunnablePassthrough()}
        | PROMPT
        | ChatPisco(pisco_model=model, max_tokens=2)
    )
    recorder = PromptRecorder()
    chain.invoke(QUESTION, config={"callbacks": [recorder]})
    (messages,) = recorder.prompts
    resolved = [m.key for msg in messages for m in model.render_prompt(str(msg.content)).memories]
    assert resolved == [innocent.key, quoted.key] and secret.key not in resolved


def test_escape_tags_keeps_user_text_from_splicing(tiny_model):
    tag = tiny_model.tag(tiny_model.compress([TEXTS[0]])[0])
    question = f"What does {tag} say?"
    chain = {"question": RunnableLambda(escape_tags)} | PROMPT.partial(context="none")
    (_, human) = chain.invoke(question).to_messages()
    assert tiny_model.render_prompt(human.content).memories == []
    assert "pisco:" in human.content  # still there for the model to read, as text


def test_tag_of_a_deleted_memory_is_unknown(tiny_model):
    model = tiny_model.with_store(LRUMemoryStore())
    doc = PiscoDocumentCompressor(pisco_model=model).compress_documents(docs()[:1], QUESTION)[0]
    model.store.delete([TAG_PATTERN.fullmatch(doc.page_content).group(1)])
    with pytest.raises(TagError, match="no longer in the store"):
        ChatPisco(pisco_model=model).invoke(doc.page_content)


def test_unsupported_messages_are_errors(tiny_model):
    llm = ChatPisco(pisco_model=tiny_model, max_tokens=2)
    with pytest.raises(PiscoInputError, match="no tool calling"):
        llm.invoke([HumanMessage("hi"), ToolMessage("42", tool_call_id="1")])
    image = {"type": "image", "url": "https://example.com/a.png"}
    with pytest.raises(PiscoInputError, match="text only"):
        llm.invoke([HumanMessage(content=[{"type": "text", "text": "what is it?"}, image])])
    with pytest.raises(PiscoInputError, match="empty"):
        llm.invoke([])
    blocks = HumanMessage(content=[{"type": "text", "text": "Hello"}, " there"])
    assert llm.invoke([blocks]).usage_metadata["input_tokens"] == len(
        tiny_model.render_prompt("Hello there").input_ids
    )


# ---------------------------------------------------------------------- the swap
def test_swap_changes_only_the_compressor_and_the_model(tiny_model):
    base = vector_retriever(k=2)
    recorder = PromptRecorder()
    text_chain = build_chain(base, KeepTopK(k=2), FakeListChatModel(responses=["Dresden."]))
    assert text_chain.invoke(QUESTION, config={"callbacks": [recorder]}) == "Dresden."
    (text_prompt,) = recorder.prompts
    assert not contains_tag(text_prompt[-1].content)
    sources = [t for t in TEXTS if t in text_prompt[-1].content]
    assert len(sources) == 2  # the LLM read the documents as text

    recorder.prompts.clear()
    pisco_chain = build_chain(  # the swap: these two arguments and nothing else
        base,
        PiscoDocumentCompressor(pisco_model=tiny_model),
        ChatPisco(pisco_model=tiny_model, max_tokens=4),
    )
    answer = pisco_chain.invoke(QUESTION, config={"callbacks": [recorder]})
    assert isinstance(answer, str) and not contains_tag(answer)
    (pisco_prompt,) = recorder.prompts
    human = pisco_prompt[-1].content
    assert len(TAG_PATTERN.findall(human)) == 2  # the same two documents, as memories
    assert not any(t in human for t in TEXTS)
    keys = [k for k, _ in TAG_PATTERN.findall(human)]
    assert sorted(m.text for m in tiny_model.store.get_many(keys)) == sorted(sources)


def test_tiny_chain_sync_async_stream_batch(tiny_model):
    chain = build_chain(
        vector_retriever(k=2),
        PiscoDocumentCompressor(pisco_model=tiny_model),
        ChatPisco(pisco_model=tiny_model, max_tokens=4),
    )
    answer = chain.invoke(QUESTION)
    assert isinstance(answer, str)
    assert "".join(chain.stream(QUESTION)) == answer
    assert chain.batch([QUESTION, QUESTION]) == [answer, answer]

    async def run_async() -> tuple[str, list[str]]:
        return await chain.ainvoke(QUESTION), [p async for p in chain.astream(QUESTION)]

    async_answer, pieces = asyncio.run(run_async())
    assert async_answer == answer and "".join(pieces) == answer


# ---------------------------------------------------------------------- OSCAR
@pytest.fixture(scope="module")
def oscar() -> PiscoModel:
    return tiny_oscar()


def tag_memories(model: PiscoModel, page_content: str) -> list[Memory]:
    """The stored memories behind a compressed document's tags, in order."""
    return [model.store.resolve(key, mac) for key, mac in TAG_PATTERN.findall(page_content)]


class WordOverlap(BaseCrossEncoder):
    """An offline cross-encoder stand-in: scores a pair by the words query and text share."""

    def score(self, text_pairs: list[tuple[str, str]]) -> list[float]:
        def words(text: str) -> set[str]:
            return set(re.findall(r"[a-z]+", text.lower()))

        return [float(len(words(q) & words(t))) for q, t in text_pairs]


def test_compressor_compresses_for_the_query_with_oscar(oscar):
    compressor = PiscoDocumentCompressor(pisco_model=oscar)
    inputs = [*docs(), Document(LONG_TEXT, id="long")]
    texts = [d.page_content for d in inputs]
    out = compressor.compress_documents(inputs, QUESTION)
    assert [d.id for d in out] == [d.id for d in inputs]  # compressing does not rerank
    expected = oscar.compress(texts, queries=[QUESTION] * len(texts))
    got = [m for d in out for m in tag_memories(oscar, d.page_content)]
    assert [m.key for m in got] == [m.key for m in expected]
    assert all(m.query == QUESTION for m in got)
    assert [d.metadata[MEMORY_COUNT_KEY] for d in out] == [1, 1, 1, 1, len(oscar.chunk(LONG_TEXT))]
    # the memories depend on the question: another one gives other memories of the same texts
    other = asyncio.run(compressor.acompress_documents(docs(), "Where is Kilimanjaro?"))
    other_keys = {m.key for d in other for m in tag_memories(oscar, d.page_content)}
    assert not other_keys & {m.key for m in got}
    assert not other_keys & {m.key for m in oscar.compress(TEXTS)}  # nor the query-free ones
    with pytest.raises(PiscoInputError, match=r"OSCAR model.*non-empty query"):
        compressor.compress_documents(docs(), "  ")
    assert compressor.compress_documents([], "") == []


def test_oscar_reranker_ranks_by_head_score_and_compresses_for_the_query(oscar):
    inputs = [*docs(), Document(LONG_TEXT, id="long", metadata={"source": "long"})]
    texts = [d.page_content for d in inputs]
    out = OscarReranker(pisco_model=oscar, top_n=None).compress_documents(inputs, QUESTION)
    expected = oscar.rerank(QUESTION, texts)
    assert [d.id for d in out] == [inputs[r.index].id for r in expected]  # best first
    scores = [d.metadata[RELEVANCE_SCORE_KEY] for d in out]
    assert scores == [r.score for r in expected] and scores == sorted(scores, reverse=True)
    for doc, r in zip(out, expected, strict=True):
        original = inputs[r.index]
        assert split_tags(doc.page_content) == [oscar.tag(m) for m in r.memories]
        memories = tag_memories(oscar, doc.page_content)
        assert [m.text for m in memories] == oscar.chunk(original.page_content)
        assert all(m.query == QUESTION for m in memories)  # query-dependent memories
        assert doc.metadata[ORIGINAL_TEXT_KEY] == original.page_content
        assert doc.metadata[MEMORY_COUNT_KEY] == len(memories)
        assert doc.metadata["source"] == original.metadata["source"]
    long = next(d for d in out if d.id == "long")
    assert long.metadata[MEMORY_COUNT_KEY] > 1
    assert long.metadata[RELEVANCE_SCORE_KEY] == max(
        m.score for m in tag_memories(oscar, long.page_content)
    )  # a chunked text scores as its best chunk
    assert inputs[0].page_content == TEXTS[0] and not inputs[0].metadata.keys() - {"source"}
    restored = original_documents(out)  # sources for users: the text, and the score kept
    assert [d.page_content for d in restored] == [texts[r.index] for r in expected]
    assert [d.metadata[RELEVANCE_SCORE_KEY] for d in restored] == scores


def test_oscar_reranker_top_n_async_and_edge_cases(oscar):
    reranker = OscarReranker(model=oscar)  # `model=`, as CrossEncoderReranker is written
    assert reranker.pisco_model is oscar and reranker.top_n == 3  # CrossEncoderReranker's default
    full = OscarReranker(pisco_model=oscar, top_n=None).compress_documents(docs(), QUESTION)
    top = reranker.compress_documents(docs(), QUESTION)
    assert len(full) == 4 and top == full[:3]
    two = OscarReranker(pisco_model=oscar, top_n=2)
    assert asyncio.run(two.acompress_documents(docs(), QUESTION)) == full[:2]
    assert two.compress_documents([], QUESTION) == []
    assert asyncio.run(two.acompress_documents([], QUESTION)) == []
    kept = two.compress_documents([Document(" \n", id="blank"), *docs()[:1]], QUESTION)
    assert [d.id for d in kept] == ["doc-0"]  # an empty text has nothing to rank
    # documents that went through a PISCO compressor are ranked on their original text
    compressed = PiscoDocumentCompressor(pisco_model=oscar).compress_documents(docs(), QUESTION)
    assert two.compress_documents(compressed, QUESTION) == full[:2]
    assert PiscoDocumentCompressor(pisco_model=oscar).compress_documents(full, QUESTION) == full


def test_oscar_reranker_errors(oscar, tiny_model):
    with pytest.raises(RerankingUnavailableError, match=r"PISCO model.*PiscoDocumentCompressor"):
        OscarReranker(pisco_model=tiny_model)
    headless = tiny_oscar(rerank_head=False, seed=8)
    with pytest.raises(RerankingUnavailableError, match=r"without one.*rerank_head=True"):
        OscarReranker(pisco_model=headless)
    with pytest.raises(ValidationError):
        OscarReranker(pisco_model="not a model")
    with pytest.raises(ValidationError):
        OscarReranker(pisco_model=oscar, top_n=0)
    reranker = OscarReranker(pisco_model=oscar)
    with pytest.raises(PiscoInputError, match="non-empty query"):
        reranker.compress_documents(docs(), "")
    with pytest.raises(PiscoInputError, match="non-empty query"):
        asyncio.run(reranker.acompress_documents(docs(), "   "))
    # what the message suggests instead: a text reranker, then the compressor (for the query)
    classic = pytest.importorskip("langchain_classic.retrievers.document_compressors")
    pipeline = classic.DocumentCompressorPipeline(
        transformers=[
            classic.CrossEncoderReranker(model=WordOverlap(), top_n=2),
            PiscoDocumentCompressor(pisco_model=headless),
        ]
    )
    out = pipeline.compress_documents(docs(), QUESTION)
    assert len(out) == 2 and out[0].metadata[ORIGINAL_TEXT_KEY] == TEXTS[0]
    assert all(m.query == QUESTION for d in out for m in tag_memories(headless, d.page_content))


def test_swap_cross_encoder_reranker_for_oscar_reranker(oscar):
    classic = pytest.importorskip("langchain_classic.retrievers.document_compressors")
    base = vector_retriever(k=4)  # every document: the reranker picks two
    retrieved = base.invoke(QUESTION)
    recorder = PromptRecorder()
    text_chain = build_chain(
        base,
        classic.CrossEncoderReranker(model=WordOverlap(), top_n=2),  # before
        FakeListChatModel(responses=["Dresden."]),
    )
    assert text_chain.invoke(QUESTION, config={"callbacks": [recorder]}) == "Dresden."
    (text_prompt,) = recorder.prompts
    human = text_prompt[-1].content
    overlap = WordOverlap().score([(QUESTION, d.page_content) for d in retrieved])
    best = max(range(4), key=overlap.__getitem__)
    assert retrieved[best].page_content == TEXTS[0] and TEXTS[0] in human
    assert sum(t in human for t in TEXTS) == 2 and not contains_tag(human)

    recorder.prompts.clear()
    pisco_chain = build_chain(  # the swap: the compressor line and the llm line
        base,
        OscarReranker(pisco_model=oscar, top_n=2),
        ChatPisco(pisco_model=oscar, max_tokens=4),
    )
    answer = pisco_chain.invoke(QUESTION, config={"callbacks": [recorder]})
    assert isinstance(answer, str) and not contains_tag(answer)
    (pisco_prompt,) = recorder.prompts
    human = pisco_prompt[-1].content
    assert not any(t in human for t in TEXTS)
    expected = oscar.rerank(QUESTION, [d.page_content for d in retrieved], top_n=2)
    memories = tag_memories(oscar, human)
    assert [m.key for m in memories] == [m.key for r in expected for m in r.memories]
    assert [m.text for m in memories] == [retrieved[r.index].page_content for r in expected]
    assert all(m.query == QUESTION for m in memories)
    rendered = oscar.render_prompt(  # ChatPisco read these memories in its input embeddings
        [{"role": "system", "content": pisco_prompt[0].content}, {"role": "user", "content": human}]
    )
    assert [m.key for m in rendered.memories] == [m.key for m in memories]
    assert recorder.usage[-1]["input_tokens"] == len(rendered.input_ids)


def test_oscar_reranker_in_contextual_compression_retriever(oscar):
    pytest.importorskip("langchain_classic")
    retriever = compression_retriever(
        vector_retriever(k=4), OscarReranker(pisco_model=oscar, top_n=2)
    )
    found = retriever.invoke(QUESTION)
    assert len(found) == 2 and all(RELEVANCE_SCORE_KEY in d.metadata for d in found)
    assert found[0].metadata[RELEVANCE_SCORE_KEY] >= found[1].metadata[RELEVANCE_SCORE_KEY]
    assert [d.id for d in found] == [
        f"doc-{TEXTS.index(d.metadata[ORIGINAL_TEXT_KEY])}" for d in found
    ]
    again = asyncio.run(retriever.ainvoke(QUESTION))
    assert again == found
    answer = build_chain(
        vector_retriever(k=4),
        OscarReranker(pisco_model=oscar, top_n=2),
        ChatPisco(pisco_model=oscar, max_tokens=3),
    )
    text = answer.invoke(QUESTION)
    assert "".join(answer.stream(QUESTION)) == text


# ---------------------------------------------------------------------- byte-store bridge
def test_byte_store_bridge_shares_memories_and_tags(tiny_model, monkeypatch):
    byte_store = InMemoryByteStore()
    writer = tiny_model.with_store(ByteStoreMemoryStore(byte_store))
    reader = tiny_model.with_store(ByteStoreMemoryStore(byte_store))
    assert writer.store.secret == reader.store.secret

    compressed = PiscoDocumentCompressor(pisco_model=writer).compress_documents(docs(), QUESTION)
    n = sum(d.metadata[MEMORY_COUNT_KEY] for d in compressed)
    assert len(reader.store) == n == len(list(reader.store.keys()))
    assert all(k.startswith("pisco/") for k in byte_store.yield_keys())
    assert "pisco/tag_secret" in list(byte_store.yield_keys())

    def no_compute(texts, queries=None, **kwargs):
        raise AssertionError("memories should come from the byte store")

    monkeypatch.setattr(reader, "_compress_batch", no_compute)
    with pytest.raises(AssertionError, match="byte store"):  # the patch is in the way...
        reader.compress(["A text that nobody compressed before."])
    again = PiscoDocumentCompressor(pisco_model=reader).compress_documents(docs(), QUESTION)
    assert [d.page_content for d in again] == [d.page_content for d in compressed]

    prompt = f"Background: {compressed[0].page_content}\nQuestion: {QUESTION}"
    a = ChatPisco(pisco_model=writer, max_tokens=4).invoke(prompt)
    b = ChatPisco(pisco_model=reader, max_tokens=4).invoke(prompt)
    assert a.content == b.content and a.usage_metadata == b.usage_metadata

    key = TAG_PATTERN.fullmatch(compressed[0].page_content).group(1)
    writer.store.delete([key])
    assert key not in reader.store and len(reader.store) == n - 1
    with pytest.raises(TagError, match="no longer in the store"):
        ChatPisco(pisco_model=reader).invoke(prompt)
    # another namespace is another store: its own secret, so the tags of this one are foreign
    other = tiny_model.with_store(ByteStoreMemoryStore(byte_store, namespace="other"))
    assert other.store.secret != writer.store.secret
    prompt = f"{compressed[1].page_content} ?"
    assert other.render_prompt(prompt).memories == []  # read as text there
    assert len(writer.render_prompt(prompt).memories) == 1


def test_local_file_store_is_shared_across_processes(tiny_model, tmp_path):
    storage = pytest.importorskip("langchain_classic.storage")
    first = tiny_model.with_store(ByteStoreMemoryStore(storage.LocalFileStore(tmp_path)))
    doc = PiscoDocumentCompressor(pisco_model=first).compress_documents(docs()[:1], QUESTION)[0]
    reopened = tiny_model.with_store(ByteStoreMemoryStore(storage.LocalFileStore(tmp_path)))
    assert reopened.store.secret == first.store.secret
    prompt = f"{doc.page_content} {QUESTION}"
    assert (
        ChatPisco(pisco_model=reopened, max_tokens=3).invoke(prompt).content
        == ChatPisco(pisco_model=first, max_tokens=3).invoke(prompt).content
    )
    # another process opens the directory and resolves the tag to the same memory
    key, mac = TAG_PATTERN.fullmatch(doc.page_content).groups()
    script = (
        "import sys\n"
        "from langchain_classic.storage import LocalFileStore\n"
        "from langchain_pisco import ByteStoreMemoryStore\n"
        "store = ByteStoreMemoryStore(LocalFileStore(sys.argv[1]))\n"
        "memory = store.resolve(sys.argv[2], sys.argv[3])\n"
        "print(memory.text)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), key, mac],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == TEXTS[0]


def test_byte_store_damaged_entries(tiny_model):
    byte_store = InMemoryByteStore()
    model = tiny_model.with_store(ByteStoreMemoryStore(byte_store))
    memory = model.compress([TEXTS[3]])[0]
    byte_store.mset([(f"pisco/memories/{memory.key}", b"garbage")])
    with pytest.raises(CorruptMemoryError, match=memory.key):
        model.store.get(memory.key)
    recomputed = model.compress([TEXTS[3]])[0]  # the core recomputes and overwrites it
    assert torch.equal(model.store.get(memory.key).vectors, recomputed.vectors)

    byte_store.mset([("bad/tag_secret", b"not a secret")])
    with pytest.raises(ValueError, match="tag secret"):
        ByteStoreMemoryStore(byte_store, namespace="bad")
    with pytest.raises(ValueError, match="namespace"):
        ByteStoreMemoryStore(byte_store, namespace="../escape")


# ---------------------------------------------------------------------- integration
@pytest.fixture(scope="module")
def smollm_chain(smollm: PiscoModel) -> Callable[[], Runnable[str, str]]:
    def make() -> Runnable[str, str]:
        return build_chain(
            vector_retriever(k=2),
            PiscoDocumentCompressor(pisco_model=smollm),
            ChatPisco(pisco_model=smollm, max_tokens=12),
        )

    return make


@pytest.mark.integration
def test_smollm_chain_sync_stream_batch(smollm_chain):
    # The untrained default's answers from memories are not meaningful (often blank): check the
    # mechanics: what the model read, what it generated, and that all paths agree.
    chain = smollm_chain()
    recorder = PromptRecorder()
    config = {"callbacks": [recorder]}
    answer = chain.invoke(QUESTION, config=config)
    assert isinstance(answer, str) and not contains_tag(answer)
    (prompt,) = recorder.prompts
    assert len(TAG_PATTERN.findall(prompt[-1].content)) == 2
    assert not any(t in prompt[-1].content for t in TEXTS)
    usage = recorder.usage[-1]
    assert usage["output_tokens"] > 0 and usage["input_tokens"] > 2 * 9
    pieces = list(chain.stream(QUESTION, config=config))
    assert "".join(pieces) == answer
    assert recorder.usage[-1] == usage  # the stream reports the same counts
    assert chain.batch([QUESTION, QUESTION]) == [answer, answer]


@pytest.mark.integration
def test_smollm_chain_async(smollm_chain):
    chain = smollm_chain()

    async def run() -> tuple[str, str, list[str], list[str]]:
        one = await chain.ainvoke(QUESTION)
        pieces = [p async for p in chain.astream(QUESTION)]
        many = await chain.abatch([QUESTION, "Where is Kilimanjaro?"])
        return chain.invoke(QUESTION), one, pieces, many

    sync, one, pieces, many = asyncio.run(run())
    assert one == sync and not contains_tag(one)
    assert "".join(pieces) == one
    assert len(many) == 2 and many[0] == one and all(isinstance(m, str) for m in many)


@pytest.mark.integration
def test_smollm_chat_reads_memories_not_text(smollm):
    """The same question with the document as a memory and as text renders differently: the
    memory takes n_mem slots, the text its tokens."""
    llm = ChatPisco(pisco_model=smollm, max_tokens=8)
    memory = smollm.compress([TEXTS[0]])[0]
    with_tag = llm.invoke(f"Background: {smollm.tag(memory)}\nQuestion: {QUESTION}")
    with_text = llm.invoke(f"Background: {TEXTS[0]}\nQuestion: {QUESTION}")
    n_text = len(smollm.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"])
    delta = with_text.usage_metadata["input_tokens"] - with_tag.usage_metadata["input_tokens"]
    assert abs(delta - (n_text - (smollm.n_mem + 1))) <= 2  # tokenisation at the seams
    assert with_text.content.strip()


@pytest.mark.integration
def test_quickstart_notebook_runs():
    pytest.importorskip("langchain_classic")
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = ROOT / "examples" / "langchain_quickstart.ipynb"
    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    ).execute()
    outputs = "".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for o in cell.outputs
    )
    assert "ANSWER:" in outputs and "STREAMED:" in outputs
    answers = [line for line in outputs.splitlines() if line.startswith(("ANSWER:", "STREAMED:"))]
    assert answers and not any(contains_tag(line) for line in answers)
