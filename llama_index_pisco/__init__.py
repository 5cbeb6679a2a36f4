"""LlamaIndex adapters for pisco-rag: compressed-document RAG in LlamaIndex pipelines.

- :class:`PiscoCompressor` (node postprocessor): retrieved nodes -> PISCO memories; the LLM
  reads memory tags, ``response.source_nodes`` keep the original text.
- :class:`OscarReranker` (node postprocessor): OSCAR models with a reranking head; scores
  retrieved nodes for the query, keeps the ``top_n`` best and compresses them for that query
  in the same pass (a text reranker and ``PiscoCompressor`` in one step).
- :class:`PiscoLLM` (``CustomLLM``): the PISCO decoder; resolves memory tags in prompts and chat
  messages (complete, chat, streaming, async). Plain prompts are plain text generation.
- :class:`PiscoMemoryTransform` (ingestion ``TransformComponent``): precompute memories into a
  persistent store at indexing time; :func:`pisco_sentence_splitter` makes nodes of one
  memory each.
- :data:`PISCO_QA_TEMPLATE` and friends: the prompt layout PISCO was trained on.
- :class:`SentenceTransformerEmbedding`: offline MiniLM retrieval for examples and tests.

Swapping a text RAG pipeline to PISCO is two lines: ``llm=PiscoLLM(model)`` and
``node_postprocessors=[PiscoCompressor(model)]``; with an OSCAR reranking model,
``node_postprocessors=[OscarReranker(model, top_n=5)]`` replaces the text reranker.
"""

from .embedding import PiscoEmbedding, SentenceTransformerEmbedding, embedded_minilm_dir
from .events import PiscoCompressEndEvent, PiscoCompressStartEvent
from .ingestion import PiscoMemoryTransform, pisco_sentence_splitter
from .llm import PiscoLLM
from .nodes import PiscoTextNode, compress_node, compressed_node_class, is_compressed
from .postprocessor import PiscoCompressor
from .prompts import (
    PISCO_CHAT_CONTEXT_TEMPLATE,
    PISCO_QA_PROMPT_TMPL,
    PISCO_QA_TEMPLATE,
    PISCO_QA_TEXT_TEMPLATE,
    PISCO_SYSTEM_PROMPT,
)
from .reranker import OscarReranker

__all__ = [
    "PISCO_CHAT_CONTEXT_TEMPLATE",
    "PISCO_QA_PROMPT_TMPL",
    "PISCO_QA_TEMPLATE",
    "PISCO_QA_TEXT_TEMPLATE",
    "PISCO_SYSTEM_PROMPT",
    "OscarReranker",
    "PiscoCompressEndEvent",
    "PiscoCompressStartEvent",
    "PiscoCompressor",
    "PiscoEmbedding",
    "PiscoLLM",
    "PiscoMemoryTransform",
    "PiscoTextNode",
    "SentenceTransformerEmbedding",
    "compress_node",
    "compressed_node_class",
    "embedded_minilm_dir",
    "is_compressed",
    "pisco_sentence_splitter",
]
