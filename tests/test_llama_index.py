"""LlamaIndex adapters: PiscoCompressor, PiscoLLM, PiscoMemoryTransform, templates, notebook.

Unit tests run on the tiny random model (``tiny_model``) with real LlamaIndex classes; the
``integration`` tests use the embedded SmolLM2 default (``smollm``, untrained: they check
structure and behaviour, never answer quality) with MiniLM retrieval.
"""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path

import pytest
from conftest import LONG_TEXT, tiny_backbone, tiny_oscar
from llama_index.core import Document, VectorStoreIndex
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    CompletionResponse,
    ImageBlock,
    MessageRole,
    TextBlock,
)
from llama_index.core.base.response.schema import (
    AsyncStreamingResponse,
    Response,
    StreamingResponse,
)
from llama_index.core.bridge.pydantic import ValidationError
from llama_index.core.callbacks import (
    CallbackManager,
    CBEventType,
    EventPayload,
    LlamaDebugHandler,
    TokenCountingHandler,
)
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.ingestion import IngestionPipeline
from llama_index.core.ingestion.pipeline import get_transformation_hash
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.llms import MockLLM
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.postprocessor import LLMRerank
from llama_index.core.schema import (
    IndexNode,
    MetadataMode,
    NodeWithScore,
    QueryBundle,
    TextNode,
)

from llama_index_pisco import (
    PISCO_CHAT_CONTEXT_TEMPLATE,
    PISCO_QA_TEMPLATE,
    PISCO_SYSTEM_PROMPT,
    OscarReranker,
    PiscoCompressEndEvent,
    PiscoCompressor,
    PiscoLLM,
    PiscoMemoryTransform,
    PiscoTextNode,
    is_compressed,
    pisco_sentence_splitter,
)
from pisco_rag import (
    PiscoInputError,
    PiscoModel,
    RerankingUnavailableError,
    SQLiteMemoryStore,
)
from pisco_rag.tags import TAG_PATTERN, contains_tag

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Which river flows through Hamburg?"
TEXTS = {
    "elbe": "The Elbe is a river in Central Europe. It rises in the Krkonose mountains and "
    "flows through Dresden and Hamburg into the North Sea.",
    "danube": "The Danube is Europe's second-longest river. It flows through Vienna, "
    "Bratislava, Budapest and Belgrade to the Black Sea.",
    "everest": "Mount Everest is Earth's highest mountain above sea level, located in the "
    "Mahalangur Himal sub-range of the Himalayas.",
}


def text_nodes() -> list[TextNode]:
    return [
        TextNode(text=text, id_=name, metadata={"title": name.title()})
        for name, text in TEXTS.items()
    ]


def scored(nodes, start: float = 0.9) -> list[NodeWithScore]:
    return [NodeWithScore(node=n, score=start - 0.1 * i) for i, n in enumerate(nodes)]


def no_tag(text: str) -> bool:
    return not contains_tag(text)


@pytest.fixture
def recorded(monkeypatch):
    """Patch a model's ``complete``/``stream_complete`` to record the prompts it receives."""

    def install(model: PiscoModel) -> list:
        prompts: list = []
        complete, stream = model.complete, model.stream_complete

        def spy_complete(batch, **kwargs):
            prompts.extend(batch)
            return complete(batch, **kwargs)

        def spy_stream(prompt, **kwargs):
            prompts.append(prompt)
            return stream(prompt, **kwargs)

        monkeypatch.setattr(model, "complete", spy_complete)
        monkeypatch.setattr(model, "stream_complete", spy_stream)
        return prompts

    return install


@pytest.fixture
def compress_calls(monkeypatch):
    """Count the texts a model actually encodes (store hits are not counted)."""

    def install(model: PiscoModel) -> list[int]:
        calls: list[int] = []
        original = model.compress_texts

        def counting(texts):
            calls.append(len(texts))
            return original(texts)

        monkeypatch.setattr(model, "compress_texts", counting)
        return calls

    return install


def prompt_text(prompt) -> str:
    """All text of a recorded prompt (a string or role/content dicts)."""
    if isinstance(prompt, str):
        return prompt
    return "\n".join(m["content"] for m in prompt)


# ---------------------------------------------------------------------- PiscoCompressor
def test_compressor_llm_sees_tags_users_see_text(tiny_model):
    nodes = [*text_nodes(), TextNode(text=LONG_TEXT, id_="long", metadata={"title": "Long"})]
    out = PiscoCompressor(tiny_model).postprocess_nodes(scored(nodes), query_str=QUESTION)

    assert [n.node.node_id for n in out] == [n.node_id for n in nodes]
    assert [n.score for n in out] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    for item, original in zip(out, nodes):
        node = item.node
        assert isinstance(node, TextNode) and isinstance(node, PiscoTextNode)
        assert is_compressed(node) and not is_compressed(original)
        assert node.metadata == original.metadata
        # user-facing and embedding content: the original text
        assert node.text == original.text
        assert node.get_content() == original.text
        assert node.get_content(MetadataMode.EMBED) == original.get_content(MetadataMode.EMBED)
        assert no_tag(str(item)) and no_tag(repr(item)) and no_tag(node.to_json())
        # LLM-facing content: only the tags, one per chunk of the text
        llm_text = node.get_content(MetadataMode.LLM)
        tags = TAG_PATTERN.findall(llm_text)
        assert TAG_PATTERN.sub("", llm_text) == ""
        chunks = tiny_model.chunk(original.text)
        assert len(tags) == len(chunks)
        memories = [tiny_model.store.resolve(key, mac) for key, mac in tags]
        assert [m.text for m in memories] == chunks
        (block,) = node.get_content_blocks(MetadataMode.LLM)
        assert block.text == llm_text
    assert len(TAG_PATTERN.findall(out[-1].node.get_content(MetadataMode.LLM))) > 1
    # the input nodes are left untouched
    assert all(type(n) is TextNode and no_tag(n.get_content(MetadataMode.LLM)) for n in nodes)


def test_compressor_keeps_node_class_and_optional_metadata(tiny_model):
    node = IndexNode(text=TEXTS["elbe"], index_id="rivers", metadata={"title": "Elbe"})
    plain, with_meta = (
        PiscoCompressor(tiny_model, include_llm_metadata=flag).postprocess_nodes(scored([node]))
        for flag in (False, True)
    )
    assert isinstance(plain[0].node, IndexNode) and plain[0].node.index_id == "rivers"
    assert plain[0].node.get_content(MetadataMode.LLM).startswith("[[pisco:")
    llm_text = with_meta[0].node.get_content(MetadataMode.LLM)
    assert llm_text.startswith("title: Elbe") and TAG_PATTERN.search(llm_text)
    assert TEXTS["elbe"] not in llm_text


def test_compressor_empty_and_bad_input(tiny_model):
    compressor = PiscoCompressor(tiny_model)
    assert compressor.postprocess_nodes([]) == []
    bad = [*scored(text_nodes()[:1]), NodeWithScore(node=TextNode(text="  ", id_="blank-7"))]
    with pytest.raises(PiscoInputError, match=r"node 'blank-7' \(nodes\[1\].*no text"):
        compressor.postprocess_nodes(bad)
    with pytest.raises(PiscoInputError, match=r"needs a pisco_rag\.PiscoModel"):
        PiscoCompressor("not a model")  # type: ignore[arg-type]


async def test_compressor_async_and_events(tiny_model):
    events = []

    class Collect(BaseEventHandler):
        def handle(self, event, **kwargs) -> None:
            if isinstance(event, PiscoCompressEndEvent):
                events.append(event)

    handler = Collect()
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        out = await PiscoCompressor(tiny_model).apostprocess_nodes(
            scored(text_nodes()), query_bundle=QueryBundle(QUESTION)
        )
    finally:
        root.event_handlers.remove(handler)
    assert all(is_compressed(n.node) for n in out)
    assert [(e.num_nodes, e.num_memories, e.source) for e in events] == [(3, 3, "postprocessor")]


# ---------------------------------------------------------------------- PiscoLLM
def test_llm_metadata_is_honest(tiny_model):
    llm = PiscoLLM(tiny_model, max_new_tokens=7)
    meta = llm.metadata
    assert meta.context_window == tiny_model.model.config.max_position_embeddings == 2048
    assert meta.num_output == 7
    assert meta.is_chat_model and not meta.is_function_calling_model
    assert meta.model_name == (tiny_model.config.name or tiny_model.config.backbone)
    named = PiscoLLM(tiny_model, model_name="x", context_window=512).metadata
    assert (named.model_name, named.context_window) == ("x", 512)


def test_llm_complete_chat_and_streams(tiny_model):
    llm = PiscoLLM(tiny_model, max_new_tokens=6)
    done = llm.complete("Name a river.")
    assert isinstance(done, CompletionResponse)
    usage = done.raw["usage"]
    assert 1 <= usage["completion_tokens"] <= 6
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert done.raw["finish_reason"] in ("stop", "length")

    pieces = list(llm.stream_complete("Name a river."))
    assert pieces and "".join(p.delta for p in pieces).strip() == pieces[-1].text.strip()
    assert pieces[-1].text.strip() == done.text  # greedy: streaming gives the same text

    messages = [ChatMessage(role="system", content="Be short."), ChatMessage(content="Hi")]
    reply = llm.chat(messages)
    assert isinstance(reply, ChatResponse) and reply.message.role == MessageRole.ASSISTANT
    assert reply.raw["usage"]["completion_tokens"] <= 6
    chunks = list(llm.stream_chat(messages))
    assert chunks[-1].message.content.strip() == reply.message.content
    assert "".join(c.delta for c in chunks) == chunks[-1].message.content


async def test_llm_streams_an_empty_answer(tiny_model):
    """A stop string at the very start gives an empty answer: the streams end with one empty
    response instead of failing in LlamaIndex's end-of-stream event."""
    first = PiscoLLM(tiny_model, max_new_tokens=4).complete("Name a river.").text[:1]
    llm = PiscoLLM(tiny_model, max_new_tokens=4, stop=[first] if first else None)
    assert llm.complete("Name a river.").text == ""
    (only,) = list(llm.stream_complete("Name a river."))
    assert only.text == "" and only.delta == ""
    (chat,) = list(llm.stream_chat([ChatMessage(content="Name a river.")]))
    assert chat.message.content == ""
    pieces = [p async for p in await llm.astream_complete("Name a river.")]
    assert [p.text for p in pieces] == [""]
    pieces = [p async for p in await llm.astream_chat([ChatMessage(content="Name a river.")])]
    assert [p.message.content for p in pieces] == [""]


async def test_llm_async_variants(tiny_model):
    llm = PiscoLLM(tiny_model, max_new_tokens=5)
    messages = [ChatMessage(content="Name a river.")]
    expected_chat = llm.chat(messages).message.content
    expected = llm.complete("Name a river.").text

    done, reply = await asyncio.gather(llm.acomplete("Name a river."), llm.achat(messages))
    assert done.text == expected and reply.message.content == expected_chat

    stream = await llm.astream_complete("Name a river.")
    pieces = [p async for p in stream]
    assert pieces[-1].text.strip() == expected
    chat_stream = await llm.astream_chat(messages)
    chunks = [c async for c in chat_stream]
    assert chunks[-1].message.content.strip() == expected_chat


def test_llm_resolves_tags_in_any_message(tiny_model, recorded):
    (memory,) = tiny_model.compress([TEXTS["elbe"]])
    tag = tiny_model.tag(memory)
    prompts = recorded(tiny_model)
    llm = PiscoLLM(tiny_model, max_new_tokens=3)
    messages = [
        ChatMessage(role="system", content=f"Background:\n{tag}"),
        ChatMessage(role="user", content=QUESTION),
    ]
    reply = llm.chat(messages)
    sent = [
        {"role": "system", "content": f"Background:\n{tag}"},
        {"role": "user", "content": QUESTION},
    ]
    assert prompts == [sent]
    rendered = tiny_model.render_prompt(sent)
    assert [m.key for m in rendered.memories] == [memory.key]
    # the decoder read n_mem slot tokens, not the tag's text
    assert reply.raw["usage"]["prompt_tokens"] == len(rendered.input_ids)
    text_len = len(tiny_model.tokenizer(tag, add_special_tokens=False)["input_ids"])
    assert text_len > tiny_model.n_mem + 1

    # complete(): one user turn; the LLM's system_prompt is added unless formatted=True
    llm_sys = PiscoLLM(tiny_model, max_new_tokens=3, system_prompt="Be brief.")
    llm_sys.complete(tag)
    llm_sys.complete(tag, formatted=True)
    assert prompts[-2] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": tag},
    ]
    assert prompts[-1] == [{"role": "user", "content": tag}]


def test_llm_generation_settings(tiny_model, monkeypatch):
    captured = {}
    original = tiny_model.complete

    def capture(batch, **kwargs):
        captured.update(kwargs)
        return original(batch, **kwargs)

    monkeypatch.setattr(tiny_model, "complete", capture)
    llm = PiscoLLM(tiny_model, max_new_tokens=4, stop=["\n"], generate_kwargs={"top_k": 5})
    llm.complete("Hi")
    assert captured["max_new_tokens"] == 4 and captured["stop"] == ["\n"]
    assert captured["do_sample"] is False and captured["top_k"] == 5
    llm.complete("Hi", max_tokens=2, temperature=0.7, top_p=0.9)
    assert captured["max_new_tokens"] == 2 and captured["do_sample"] is True
    assert captured["temperature"] == 0.7 and captured["top_p"] == 0.9


def test_llm_reports_token_usage_to_callbacks(tiny_model, recorded):
    prompts = recorded(tiny_model)
    counter = TokenCountingHandler()
    llm = PiscoLLM(tiny_model, max_new_tokens=4, callback_manager=CallbackManager([counter]))
    reply = llm.chat([ChatMessage(content=QUESTION)])
    (event,) = counter.llm_token_counts
    assert event.prompt_token_count == len(tiny_model.render_prompt(prompts[-1]).input_ids)
    assert event.completion_token_count == reply.raw["usage"]["completion_tokens"] <= 4


def test_llm_bad_input(tiny_model):
    llm = PiscoLLM(tiny_model, max_new_tokens=2)
    with pytest.raises(PiscoInputError, match="messages is empty"):
        llm.chat([])
    image = ChatMessage(blocks=[TextBlock(text="see"), ImageBlock(url="http://x/y.png")])
    with pytest.raises(PiscoInputError, match=r"messages\[0\] holds ImageBlock"):
        llm.chat([image])
    with pytest.raises(PiscoInputError, match=r"needs a pisco_rag\.PiscoModel"):
        PiscoLLM(None)  # type: ignore[arg-type]


def test_tag_of_another_store_is_text(tiny_model):
    (memory,) = tiny_model.compress([TEXTS["danube"]])
    tag = tiny_model.tag(memory)
    # Same weights, another store: its tags are not this store's to resolve, so they are text.
    other = PiscoModel(tiny_model.model, tiny_model.tokenizer, tiny_model.config)
    llm = PiscoLLM(other, max_new_tokens=2)
    with pytest.warns(UserWarning, match="did not mint"):
        response = llm.complete(f"Background:\n{tag}\n\nQuestion:{QUESTION}")
    assert response.raw["usage"]["completion_tokens"] >= 1
    assert list(llm.stream_chat([ChatMessage(content=tag)]))
    forged = tag[:-6] + "0000]]"
    assert isinstance(
        PiscoLLM(tiny_model, max_new_tokens=2).complete(f"{forged} [[pisco:x]]").text, str
    )


def test_copied_tag_in_node_metadata_is_never_resolved(tiny_model, recorded):
    prompts = recorded(tiny_model)
    secret = tiny_model.compress(["Tenant B: the vault code is 4471."])[0]
    tag_b = tiny_model.tag(secret)
    node = TextNode(text="sunny", id_="n1", metadata={"title": f"see {tag_b}"})
    (out,) = PiscoCompressor(tiny_model, include_llm_metadata=True).postprocess_nodes(
        scored([node])
    )
    llm_text = out.node.get_content(MetadataMode.LLM)
    assert "title: see [ [pisco:" in llm_text  # the metadata is there, as text
    (sunny,) = tiny_model.compress(["sunny"])
    assert [m.key for m in tiny_model.render_prompt(llm_text).memories] == [sunny.key]
    # and through a query engine, with the tag also pasted into the question
    index = VectorStoreIndex([node], embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(
        llm=PiscoLLM(tiny_model, max_new_tokens=2),
        node_postprocessors=[PiscoCompressor(tiny_model, include_llm_metadata=True)],
    )
    engine.query(f"What does {tag_b} say?")
    (prompt,) = prompts
    assert [m.key for m in tiny_model.render_prompt(prompt).memories] == [sunny.key]


# ---------------------------------------------------------------------- query engines
def mock_index(nodes=None) -> VectorStoreIndex:
    return VectorStoreIndex(nodes or text_nodes(), embed_model=MockEmbedding(embed_dim=8))


def test_query_engine_user_facing_strings_hold_no_tags(tiny_model, recorded):
    prompts = recorded(tiny_model)
    index = mock_index()
    llm = PiscoLLM(tiny_model, max_new_tokens=4)
    engine = index.as_query_engine(
        llm=llm, node_postprocessors=[PiscoCompressor(tiny_model)], similarity_top_k=3
    )
    response = engine.query(QUESTION)

    (prompt,) = prompts
    sent = prompt_text(prompt)
    assert len(TAG_PATTERN.findall(sent)) == 3
    assert not any(text in sent for text in TEXTS.values())  # the LLM never saw the text
    assert QUESTION in sent
    assert no_tag(response.response) and no_tag(str(response))
    assert no_tag(response.get_formatted_sources(length=10_000))
    assert {n.node.node_id for n in response.source_nodes} == set(TEXTS)
    for source in response.source_nodes:
        assert source.node.text == TEXTS[source.node.node_id]
        assert no_tag(source.node.get_content()) and no_tag(str(source))


def test_swap_is_two_lines(tiny_model, recorded):
    index = mock_index()

    def build(llm, postprocessors):
        return index.as_query_engine(
            llm=llm, node_postprocessors=postprocessors, similarity_top_k=2
        )

    # a text LLM (MockLLM echoes its prompt): the retrieved text reaches the LLM
    text = build(MockLLM(), []).query(QUESTION)
    assert any(t in text.response for t in TEXTS.values()) and no_tag(text.response)

    # PiscoLLM as a plain text LLM: no tags, the passages as text
    prompts = recorded(tiny_model)
    build(PiscoLLM(tiny_model, max_new_tokens=3), []).query(QUESTION)
    assert no_tag(prompt_text(prompts[-1]))
    assert any(t in prompt_text(prompts[-1]) for t in TEXTS.values())

    # PISCO: the same construction with the two lines changed
    pisco = build(PiscoLLM(tiny_model, max_new_tokens=3), [PiscoCompressor(tiny_model)])
    response = pisco.query(QUESTION)
    assert len(TAG_PATTERN.findall(prompt_text(prompts[-1]))) == 2
    assert not any(t in prompt_text(prompts[-1]) for t in TEXTS.values())
    assert [n.node.node_id for n in response.source_nodes] == [
        n.node.node_id for n in text.source_nodes
    ]
    assert [n.node.text for n in response.source_nodes] == [n.node.text for n in text.source_nodes]


def test_query_engine_streaming_and_async(tiny_model):
    llm = PiscoLLM(tiny_model, max_new_tokens=4)
    engine = mock_index().as_query_engine(
        llm=llm, node_postprocessors=[PiscoCompressor(tiny_model)], streaming=True
    )
    response = engine.query(QUESTION)
    assert isinstance(response, StreamingResponse)
    text = "".join(response.response_gen)
    assert no_tag(text) and all(no_tag(n.node.text) for n in response.source_nodes)

    plain = mock_index().as_query_engine(llm=llm, node_postprocessors=[PiscoCompressor(tiny_model)])
    answer = plain.query(QUESTION)
    assert no_tag(answer.response)

    async def run():
        done = await plain.aquery(QUESTION)
        streamed = await engine.aquery(QUESTION)
        assert isinstance(streamed, AsyncStreamingResponse)
        pieces = [p async for p in streamed.async_response_gen()]
        return done, "".join(pieces)

    done, streamed_text = asyncio.run(run())
    assert done.response == answer.response  # greedy and deterministic
    assert streamed_text.strip() == text.strip()


@pytest.mark.parametrize("mode", ["context", "condense_plus_context"])
def test_chat_engines(tiny_model, recorded, mode):
    prompts = recorded(tiny_model)
    kwargs = {
        "context_template" if mode == "context" else "context_prompt": PISCO_CHAT_CONTEXT_TEMPLATE
    }
    engine = mock_index().as_chat_engine(
        chat_mode=mode,
        llm=PiscoLLM(tiny_model, max_new_tokens=3),
        node_postprocessors=[PiscoCompressor(tiny_model)],
        similarity_top_k=2,
        **kwargs,
    )
    first = engine.chat(QUESTION)
    second = engine.chat("And which one reaches the Black Sea?")
    assert no_tag(first.response) and no_tag(second.response)
    assert all(no_tag(n.node.text) for n in second.source_nodes)
    assert second.sources and all(no_tag(str(tool.content)) for tool in second.sources)
    assert len(TAG_PATTERN.findall(prompt_text(prompts[-1]))) == 2
    assert PISCO_SYSTEM_PROMPT in prompt_text(prompts[-1])
    streamed = engine.stream_chat("Where does it end?")
    text = "".join(streamed.response_gen)
    assert no_tag(text) and TAG_PATTERN.search(prompt_text(prompts[-1]))
    # the chat history keeps what users said and saw, never tags
    assert len(engine.chat_history) == 6
    assert all(no_tag(m.content or "") for m in engine.chat_history)


# ---------------------------------------------------------------------- templates
def test_pisco_qa_template_reproduces_the_pisco_prompt(tiny_model):
    messages = PISCO_QA_TEMPLATE.format_messages(context_str="CTX", query_str="Q?")
    assert [(m.role, m.content) for m in messages] == [
        (MessageRole.SYSTEM, PISCO_SYSTEM_PROMPT),
        (MessageRole.USER, "Background:\nCTX\n\nQuestion:Q?"),
    ]
    # With one compressed node, the prompt PiscoLLM renders is token for token the PISCO prompt.
    (memory,) = tiny_model.compress([TEXTS["elbe"]])
    messages = PISCO_QA_TEMPLATE.format_messages(
        context_str=tiny_model.tag(memory), query_str=QUESTION
    )
    rendered = tiny_model.render_prompt(PiscoLLM._chat_messages(messages))
    renderer = tiny_model.renderer
    reference = renderer.render(
        renderer.pisco_turns(QUESTION, [memory], tiny_model.config.system_prompt)
    )
    assert rendered.input_ids == reference.input_ids
    assert [m.key for m in rendered.memories] == [memory.key]


def test_pisco_qa_template_in_a_query_engine(tiny_model, recorded):
    prompts = recorded(tiny_model)
    engine = mock_index().as_query_engine(
        llm=PiscoLLM(tiny_model, max_new_tokens=3),
        node_postprocessors=[PiscoCompressor(tiny_model)],
        text_qa_template=PISCO_QA_TEMPLATE,
        similarity_top_k=1,
    )
    engine.query(QUESTION)
    system, user = prompts[-1]
    assert system == {"role": "system", "content": PISCO_SYSTEM_PROMPT}
    assert TAG_PATTERN.fullmatch(
        user["content"].removeprefix("Background:\n").removesuffix(f"\n\nQuestion:{QUESTION}")
    )


# ---------------------------------------------------------------------- ingestion
def test_ingestion_precomputes_memories_for_the_query_path(
    tiny_model, tmp_path, monkeypatch, compress_calls
):
    path = tmp_path / "memories.sqlite"
    monkeypatch.setattr(tiny_model, "store", SQLiteMemoryStore(path))
    documents = [Document(text=t, metadata={"title": k}) for k, t in TEXTS.items()]
    documents.append(Document(text=LONG_TEXT, metadata={"title": "long"}))
    embed = MockEmbedding(embed_dim=8)
    pipeline = IngestionPipeline(
        transformations=[
            SentenceSplitter(chunk_size=512, chunk_overlap=0),
            PiscoMemoryTransform(tiny_model),
            embed,
        ]
    )
    nodes = pipeline.run(documents=documents)
    expected = sum(len(tiny_model.chunk(n.text)) for n in nodes)
    assert len(tiny_model.store) == expected > len(nodes)
    for node in nodes:
        keys = node.metadata["pisco_memory_keys"].split(",")
        assert len(keys) == len(tiny_model.chunk(node.text))
        assert all(key in tiny_model.store for key in keys)
        assert "pisco_memory_keys" not in node.get_content(MetadataMode.EMBED)
        assert "pisco_memory_keys" not in node.get_content(MetadataMode.LLM)

    # Query time, in "another process": a fresh store object on the same file.
    monkeypatch.setattr(tiny_model, "store", SQLiteMemoryStore(path))
    calls = compress_calls(tiny_model)
    engine = VectorStoreIndex(nodes, embed_model=embed).as_query_engine(
        llm=PiscoLLM(tiny_model, max_new_tokens=2),
        node_postprocessors=[PiscoCompressor(tiny_model)],
        similarity_top_k=len(nodes),
    )
    response = engine.query(QUESTION)
    assert len(response.source_nodes) == len(nodes)
    assert calls == []  # every memory came from the store
    assert len(tiny_model.store) == expected


def test_ingestion_transform_details(tiny_model, compress_calls):
    transform = PiscoMemoryTransform(tiny_model, metadata_key=None)
    nodes = text_nodes()
    assert transform(nodes) == nodes and all(n.metadata.keys() == {"title"} for n in nodes)
    calls = compress_calls(tiny_model)
    assert asyncio.run(transform.acall(nodes)) == nodes and calls == []  # already stored
    assert transform([]) == []
    with pytest.raises(PiscoInputError, match="num_workers=1"):
        pickle.loads(pickle.dumps(transform))(nodes)  # as in an ingestion worker process
    with pytest.raises(PiscoInputError, match="node 'empty'"):
        transform([TextNode(text="", id_="empty")])
    # The ingestion cache key changes with the model's store (and fingerprint).
    other = PiscoModel(tiny_model.model, tiny_model.tokenizer, tiny_model.config)
    same = PiscoMemoryTransform(tiny_model, metadata_key=None)
    assert get_transformation_hash(nodes, transform) == get_transformation_hash(nodes, same)
    assert get_transformation_hash(nodes, transform) != get_transformation_hash(
        nodes, PiscoMemoryTransform(other, metadata_key=None)
    )


def test_pisco_sentence_splitter_makes_one_memory_per_node(tiny_model):
    splitter = pisco_sentence_splitter(tiny_model)
    documents = [Document(text=LONG_TEXT * 2, metadata={"title": "long"})]
    nodes = splitter.get_nodes_from_documents(documents)
    assert len(nodes) > 2 and splitter.chunk_size == tiny_model.config.doc_max_length
    assert all(len(tiny_model.chunk(n.text)) == 1 for n in nodes)
    groups = PiscoCompressor(tiny_model).postprocess_nodes(scored(nodes, start=1.0))
    assert all(len(TAG_PATTERN.findall(g.node.get_content(MetadataMode.LLM))) == 1 for g in groups)


# ---------------------------------------------------------------------- OscarReranker
@pytest.fixture(scope="module")
def oscar() -> PiscoModel:
    return tiny_oscar()


def rerank_nodes() -> list[TextNode]:
    """The three passages and a long one (several chunks, so several memories)."""
    return [*text_nodes(), TextNode(text=LONG_TEXT, id_="long", metadata={"title": "Long"})]


def llm_memories(model: PiscoModel, node) -> list:
    """The memories behind the tags that are a node's whole LLM-facing content."""
    llm_text = node.get_content(MetadataMode.LLM)
    assert TAG_PATTERN.sub("", llm_text) == ""
    return [model.store.resolve(key, mac) for key, mac in TAG_PATTERN.findall(llm_text)]


def test_reranker_orders_by_head_score_and_compresses_for_the_query(oscar):
    nodes = rerank_nodes()
    out = OscarReranker(oscar, top_n=None).postprocess_nodes(scored(nodes), query_str=QUESTION)

    expected = oscar.rerank(QUESTION, [n.text for n in nodes])
    assert [n.node.node_id for n in out] == [nodes[r.index].node_id for r in expected]
    assert [n.score for n in out] == pytest.approx([r.score for r in expected])
    assert [n.score for n in out] == sorted((n.score for n in out), reverse=True)
    by_id = {n.node_id: n for n in nodes}
    for item, ranked in zip(out, expected, strict=True):
        node, original = item.node, by_id[item.node.node_id]
        assert isinstance(node, PiscoTextNode) and is_compressed(node)
        # the user sees the original node
        assert node.metadata == original.metadata and node.text == original.text
        assert node.get_content() == original.text
        assert node.get_content(MetadataMode.EMBED) == original.get_content(MetadataMode.EMBED)
        assert no_tag(str(item)) and no_tag(node.to_json())
        # the LLM reads the query-dependent memories of the scoring pass, in text order
        memories = llm_memories(oscar, node)
        assert [m.key for m in memories] == [m.key for m in ranked.memories]
        assert [m.text for m in memories] == oscar.chunk(original.text)
        assert all(m.query == QUESTION for m in memories)
        assert item.score == pytest.approx(max(m.score for m in memories))
    long = next(n for n in out if n.node.node_id == "long")
    assert len(llm_memories(oscar, long.node)) > 1
    # the input nodes are left untouched
    assert all(type(n) is TextNode and no_tag(n.get_content(MetadataMode.LLM)) for n in nodes)

    # other query, other memories; PiscoCompressor on the same model: document-only memories
    other = OscarReranker(oscar, top_n=None).postprocess_nodes(
        scored(nodes), query_str="How high is Mount Everest?"
    )
    plain = PiscoCompressor(oscar).postprocess_nodes(scored(nodes))
    keys = {n.node.node_id: {m.key for m in llm_memories(oscar, n.node)} for n in out}
    for item in [*other, *plain]:
        assert not keys[item.node.node_id] & {m.key for m in llm_memories(oscar, item.node)}
    assert all(m.query is None for n in plain for m in llm_memories(oscar, n.node))


async def test_reranker_top_n_retrieval_score_and_async(oscar):
    nodes = rerank_nodes()
    assert OscarReranker(oscar).top_n == 5
    full = OscarReranker(oscar, top_n=None).postprocess_nodes(scored(nodes), query_str=QUESTION)
    assert len(full) == 4
    assert len(OscarReranker(oscar).postprocess_nodes(scored(nodes), query_str=QUESTION)) == 4

    reranker = OscarReranker(oscar, top_n=2, keep_retrieval_score=True)
    inputs = scored(nodes)
    top = reranker.postprocess_nodes(inputs, query_bundle=QueryBundle(QUESTION))
    assert [n.node.node_id for n in top] == [n.node.node_id for n in full[:2]]
    assert [n.score for n in top] == pytest.approx([n.score for n in full[:2]])
    retrieval = {n.node.node_id: n.score for n in inputs}
    for item in top:
        assert item.node.metadata["retrieval_score"] == pytest.approx(retrieval[item.node.node_id])
    # the inputs keep their scores and metadata
    assert [n.score for n in inputs] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert all("retrieval_score" not in n.node.metadata for n in inputs)

    again = await reranker.apostprocess_nodes(scored(nodes), query_bundle=QueryBundle(QUESTION))
    assert [(n.node.node_id, n.score) for n in again] == [(n.node.node_id, n.score) for n in top]

    (first,) = OscarReranker(oscar, top_n=1, include_llm_metadata=True).postprocess_nodes(
        scored(nodes), query_str=QUESTION
    )
    llm_text = first.node.get_content(MetadataMode.LLM)
    assert llm_text.startswith(f"title: {first.node.metadata['title']}")
    assert TAG_PATTERN.search(llm_text) and first.node.text not in llm_text


async def test_reranker_events_and_callbacks(oscar):
    events: list = []

    class Collect(BaseEventHandler):
        def handle(self, event, **kwargs) -> None:
            if isinstance(event, ReRankStartEvent | ReRankEndEvent):
                events.append(event)

    debug = LlamaDebugHandler()
    reranker = OscarReranker(oscar, top_n=2, callback_manager=CallbackManager([debug]))
    inputs = scored(rerank_nodes())
    handler = Collect()
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        out = reranker.postprocess_nodes(inputs, query_bundle=QueryBundle(QUESTION))
        out_async = await reranker.apostprocess_nodes(inputs, query_bundle=QueryBundle(QUESTION))
    finally:
        root.event_handlers.remove(handler)

    name = oscar.config.name or oscar.config.backbone
    assert reranker.model_name == name
    assert [type(e) for e in events] == [ReRankStartEvent, ReRankEndEvent] * 2
    for start, end, result in ((events[0], events[1], out), (events[2], events[3], out_async)):
        assert (start.top_n, start.model_name) == (2, name)
        assert start.query.query_str == QUESTION
        assert [n.node.node_id for n in start.nodes] == [n.node.node_id for n in inputs]
        assert [(n.node.node_id, n.score) for n in end.nodes] == [
            (n.node.node_id, n.score) for n in result
        ]

    pairs = debug.get_event_pairs(CBEventType.RERANKING)
    assert len(pairs) == 2
    for (begin, finish), result in zip(pairs, (out, out_async), strict=True):
        assert begin.payload[EventPayload.QUERY_STR] == QUESTION
        assert begin.payload[EventPayload.TOP_K] == 2
        assert begin.payload[EventPayload.MODEL_NAME] == name
        assert begin.payload[EventPayload.NODES] == inputs
        assert [n.node.node_id for n in finish.payload[EventPayload.NODES]] == [
            n.node.node_id for n in result
        ]


def test_query_engine_with_oscar_reranker(oscar, recorded):
    prompts = recorded(oscar)
    nodes = rerank_nodes()
    engine = mock_index(nodes).as_query_engine(
        similarity_top_k=4,
        node_postprocessors=[OscarReranker(oscar, top_n=2)],
        llm=PiscoLLM(oscar, max_new_tokens=4),
    )
    response = engine.query(QUESTION)

    assert isinstance(response, Response)
    expected = oscar.rerank(QUESTION, [n.text for n in nodes], top_n=2)
    assert [n.node.node_id for n in response.source_nodes] == [
        nodes[r.index].node_id for r in expected
    ]
    assert [n.score for n in response.source_nodes] == pytest.approx([r.score for r in expected])
    for source, ranked in zip(response.source_nodes, expected, strict=True):
        assert source.node.text == nodes[ranked.index].text
        assert no_tag(source.node.get_content()) and no_tag(str(source))
    assert no_tag(response.response) and no_tag(str(response))
    assert no_tag(response.get_formatted_sources(length=10_000))

    # the LLM read the query-dependent memories of the two best nodes, never their text
    (prompt,) = prompts
    sent = prompt_text(prompt)
    assert QUESTION in sent and not any(n.text in sent for n in nodes)
    rendered = oscar.render_prompt(prompt)  # the tags resolve, as PiscoLLM resolved them
    assert [m.key for m in rendered.memories] == [m.key for r in expected for m in r.memories]
    assert all(m.query == QUESTION for m in rendered.memories)


def test_swap_text_reranker_for_oscar_reranker(oscar, recorded):
    index = mock_index()
    retrieved = index.as_retriever(similarity_top_k=3).retrieve(QUESTION)

    def build(llm, reranker):
        return index.as_query_engine(similarity_top_k=3, node_postprocessors=[reranker], llm=llm)

    # text RAG with a text reranker: LLMRerank on a MockLLM, standing in for
    # SentenceTransformerRerank (offline); it ranks the retrieved passages in reverse order
    def reverse(answer: str, n: int) -> tuple[list[int], list[float]]:
        return list(range(n, 0, -1)), [float(i) for i in range(n, 0, -1)]

    text_reranker = LLMRerank(llm=MockLLM(), top_n=2, parse_choice_select_answer_fn=reverse)
    text = build(MockLLM(), text_reranker).query(QUESTION)
    assert [n.node.node_id for n in text.source_nodes] == [
        n.node.node_id for n in retrieved[::-1][:2]
    ]
    assert any(t in text.response for t in TEXTS.values()) and no_tag(text.response)

    # OSCAR: the same construction with the two lines changed
    prompts = recorded(oscar)
    response = build(PiscoLLM(oscar, max_new_tokens=3), OscarReranker(oscar, top_n=2)).query(
        QUESTION
    )
    expected = oscar.rerank(QUESTION, [n.node.text for n in retrieved], top_n=2)
    assert [n.node.node_id for n in response.source_nodes] == [
        retrieved[r.index].node.node_id for r in expected
    ]
    assert [n.score for n in response.source_nodes] == pytest.approx([r.score for r in expected])
    assert [n.node.text for n in response.source_nodes] == [
        retrieved[r.index].node.text for r in expected
    ]
    sent = prompt_text(prompts[-1])
    assert len(TAG_PATTERN.findall(sent)) == 2
    assert not any(t in sent for t in TEXTS.values())
    assert no_tag(response.response)


def test_reranker_errors(oscar, tiny_model):
    with pytest.raises(
        RerankingUnavailableError, match=r"needs an OSCAR model.*PISCO model.*PiscoCompressor"
    ):
        OscarReranker(tiny_model)
    headless = tiny_oscar(rerank_head=False, seed=8)
    with pytest.raises(RerankingUnavailableError, match=r"needs a reranking head.*rerank_head"):
        OscarReranker(headless)
    with pytest.raises(PiscoInputError, match=r"needs a pisco_rag\.PiscoModel"):
        OscarReranker("not a model")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="top_n"):
        OscarReranker(oscar, top_n=0)

    reranker = OscarReranker(oscar)
    with pytest.raises(PiscoInputError, match="OscarReranker needs the query"):
        reranker.postprocess_nodes(scored(text_nodes()))
    assert reranker.postprocess_nodes([], query_str=QUESTION) == []
    bad = [*scored(text_nodes()[:1]), NodeWithScore(node=TextNode(text="  ", id_="blank-7"))]
    with pytest.raises(PiscoInputError, match=r"node 'blank-7' \(nodes\[1\].*no text"):
        reranker.postprocess_nodes(bad, query_str=QUESTION)


# ---------------------------------------------------------------------- integration
@pytest.fixture(scope="session")
def minilm():
    from llama_index_pisco import SentenceTransformerEmbedding

    return SentenceTransformerEmbedding()


@pytest.fixture(scope="session")
def smollm_index(minilm):
    documents = [Document(text=t, metadata={"title": k}) for k, t in TEXTS.items()]
    return VectorStoreIndex.from_documents(documents, embed_model=minilm)


@pytest.mark.integration
def test_minilm_retrieves_the_relevant_passage(smollm_index):
    (hit,) = smollm_index.as_retriever(similarity_top_k=1).retrieve(QUESTION)
    assert hit.node.text == TEXTS["elbe"]


@pytest.mark.integration
def test_smollm_query_engine_sync_stream_and_async(smollm, smollm_index, recorded):
    prompts = recorded(smollm)
    llm = PiscoLLM(smollm, max_new_tokens=4)
    compressor = PiscoCompressor(smollm)
    engine = smollm_index.as_query_engine(
        llm=llm, node_postprocessors=[compressor], similarity_top_k=2
    )
    response = engine.query(QUESTION)
    assert isinstance(response.response, str) and no_tag(response.response)
    assert response.source_nodes[0].node.text == TEXTS["elbe"]
    assert len(TAG_PATTERN.findall(prompt_text(prompts[-1]))) == 2

    streaming = smollm_index.as_query_engine(
        llm=llm,
        node_postprocessors=[compressor],
        text_qa_template=PISCO_QA_TEMPLATE,
        similarity_top_k=2,
        streaming=True,
    )
    streamed = streaming.query(QUESTION)
    text = "".join(streamed.response_gen)
    assert no_tag(text) and no_tag(streamed.get_formatted_sources())
    assert prompts[-1][0]["content"] == PISCO_SYSTEM_PROMPT

    async def run():
        done = await engine.aquery(QUESTION)
        stream = await streaming.aquery(QUESTION)
        return done, "".join([p async for p in stream.async_response_gen()])

    done, async_text = asyncio.run(run())
    assert done.response == response.response  # greedy: the same answer
    assert async_text.strip() == text.strip()
    assert [n.node.node_id for n in done.source_nodes] == [
        n.node.node_id for n in response.source_nodes
    ]


@pytest.mark.integration
def test_smollm_chat_engine_and_swap(smollm, smollm_index, recorded):
    prompts = recorded(smollm)
    llm = PiscoLLM(smollm, max_new_tokens=4)

    def build(postprocessors):
        return smollm_index.as_query_engine(
            llm=llm, node_postprocessors=postprocessors, similarity_top_k=2
        )

    text = build([]).query(QUESTION)
    text_prompt = prompts[-1]
    pisco = build([PiscoCompressor(smollm)]).query(QUESTION)
    pisco_prompt = prompts[-1]
    assert TEXTS["elbe"] in prompt_text(text_prompt) and no_tag(prompt_text(text_prompt))
    assert TEXTS["elbe"] not in prompt_text(pisco_prompt)
    assert [n.node.text for n in pisco.source_nodes] == [n.node.text for n in text.source_nodes]
    # compression: the decoder reads fewer prompt tokens with memories than with text
    text_tokens = len(smollm.render_prompt(text_prompt).input_ids)
    pisco_tokens = len(smollm.render_prompt(pisco_prompt).input_ids)
    assert pisco_tokens < text_tokens

    chat = smollm_index.as_chat_engine(
        chat_mode="condense_plus_context",
        llm=llm,
        node_postprocessors=[PiscoCompressor(smollm)],
        similarity_top_k=2,
    )
    reply = chat.chat(QUESTION)
    follow = asyncio.run(chat.achat("Where does it end?"))
    assert no_tag(reply.response) and no_tag(follow.response)
    assert TAG_PATTERN.search(prompt_text(prompts[-1]))
    assert all(no_tag(n.node.text) for n in follow.source_nodes)


@pytest.mark.integration
def test_quickstart_notebook_runs():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "examples" / "llamaindex_quickstart.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
    )
    client.execute()
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", [])
    )
    assert "4 nodes, 4 memories in the store" in outputs
    assert "Elbe: " + TEXTS["elbe"] in outputs  # the top source, shown as text


def test_pisco_compressor_uses_the_query_with_an_tiny_oscar():
    from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode

    from llama_index_pisco import PiscoCompressor
    from pisco_rag import PiscoModel

    backbone, tok = tiny_backbone("llama", seed=4)
    oscar = PiscoModel.from_backbone(backbone, tok, compressor="first-layers:1", device="cpu")
    nodes = [NodeWithScore(node=TextNode(text="The Elbe flows through Hamburg.", id_="n1"))]
    compressor = PiscoCompressor(oscar)
    (out,) = compressor.postprocess_nodes(nodes, QueryBundle("Which river?"))
    (memory,) = oscar.render_prompt(out.node.get_content(MetadataMode.LLM)).memories
    assert memory.query == "Which river?"
    expected = oscar.compress(["The Elbe flows through Hamburg."], queries=["Which river?"])[0]
    assert memory.key == expected.key
