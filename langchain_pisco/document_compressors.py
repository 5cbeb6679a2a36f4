"""PISCO document compression for LangChain retrieval pipelines."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Literal

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.runnables import run_in_executor
from pydantic import ConfigDict, Field

from pisco_rag import PiscoInputError, PiscoModel
from pisco_rag.tags import TAG_PATTERN, escape_tags

logger = logging.getLogger(__name__)

ORIGINAL_TEXT_KEY = "pisco_original_text"
"""Metadata key of a compressed document that holds its original text."""

MEMORY_COUNT_KEY = "pisco_memories"
"""Metadata key of a compressed document that holds how many memories (chunks) stand for it."""

_ONLY_TAGS = re.compile(f"(?:{TAG_PATTERN.pattern})+")


class PiscoDocumentCompressor(BaseDocumentCompressor):
    """Replaces each retrieved document's text by the PISCO memory tags that stand for it.

    Each document is compressed by ``pisco_model`` (memories are read from, or written to, the
    model's memory store) and comes back with ``page_content`` set to its memory tag; a document
    longer than the model's ``doc_max_length`` is split into chunks and gets one tag per chunk,
    concatenated. The document's id and metadata are kept, and its original text is stored in
    ``metadata["pisco_original_text"]`` (:data:`ORIGINAL_TEXT_KEY`) so that sources can still
    be shown to users. Tags only ever come from this compressor: a document whose content looks
    compressed is compressed again from its original text, and tag-like text in string metadata
    is escaped (:func:`pisco_rag.tags.escape_tags`). Only a :class:`~langchain_pisco.ChatPisco`
    on the same ``PiscoModel`` (or one sharing its memory store) can read the tags.

    PISCO compression does not depend on the query: with a PISCO model ``query`` is ignored.
    An OSCAR model (``pisco_model.config.is_oscar``) compresses each document *for* the query,
    since its memories depend on the question: ``query`` must then be non-empty, and each
    memory's ``query`` is it. Either way the documents keep their order (to rerank them too,
    use :class:`~langchain_pisco.OscarReranker`). Documents whose text is empty are dropped
    (there is nothing to compress).

    Example:
        .. code-block:: python

            from langchain_classic.retrievers import ContextualCompressionRetriever

            pisco = PiscoModel.from_pretrained("embedded")
            retriever = ContextualCompressionRetriever(
                base_compressor=PiscoDocumentCompressor(pisco_model=pisco),
                base_retriever=vector_store.as_retriever(),
            )
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pisco_model: PiscoModel = Field(repr=False, exclude=True)
    """The model that compresses; its ``store`` holds the memories behind the tags."""
    batch_size: int = Field(default=16, gt=0)
    """Chunks compressed per forward pass."""
    long_documents: Literal["chunk", "truncate", "error"] | None = None
    """Policy for documents longer than ``doc_max_length`` tokens (``None``: the model's,
    by default ``"chunk"``)."""
    show_progress: bool = False
    """Show a progress bar while compressing."""

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Return the documents with their text replaced by memory tags (same order, ids and
        metadata, original text in ``metadata["pisco_original_text"]``). ``query`` is used by
        OSCAR models only."""
        todo: list[Document] = []
        texts: list[str] = []
        for i, doc in enumerate(documents):
            if not isinstance(doc, Document):
                raise PiscoInputError(
                    f"documents[{i}] must be a langchain Document, got {type(doc).__name__}"
                )
            text = _source_text(doc)
            if not text.strip():
                logger.warning("dropping document %r: its text is empty", doc.id)
                continue
            todo.append(doc)
            texts.append(text)
        if not todo:
            return []
        queries = None
        if self.pisco_model.config.is_oscar:  # OSCAR memories depend on the question
            if not isinstance(query, str) or not query.strip():
                raise PiscoInputError(
                    "this PiscoDocumentCompressor's model is an OSCAR model, which compresses "
                    f"documents for the query; give a non-empty query, got {query!r}"
                )
            queries = [query] * len(todo)
        memories = self.pisco_model.compress(
            texts,
            queries=queries,
            batch_size=self.batch_size,
            show_progress=self.show_progress,
            long_documents=self.long_documents,
        )
        tags: list[list[str]] = [[] for _ in todo]
        for memory in memories:
            tags[memory.source_index].append(self.pisco_model.tag(memory))
        return [
            Document(
                page_content="".join(doc_tags),
                metadata={
                    **_escaped(doc.metadata),
                    ORIGINAL_TEXT_KEY: text,
                    MEMORY_COUNT_KEY: len(doc_tags),
                },
                id=doc.id,
            )
            for doc, text, doc_tags in zip(todo, texts, tags)
        ]

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents` (runs in the default executor; the model's lock
        serialises it with other model calls)."""
        return await run_in_executor(None, self.compress_documents, documents, query, callbacks)


def _source_text(doc: Document) -> str:
    """The text to compress: a document that went through a PISCO compressor before is
    compressed again from its original text (a store hit, same tags), never passed on as is:
    its ``page_content`` is data, and tags in data are never trusted."""
    original = doc.metadata.get(ORIGINAL_TEXT_KEY)
    if isinstance(original, str) and _ONLY_TAGS.fullmatch(doc.page_content):
        return original
    return doc.page_content


def _escaped(metadata: dict[str, Any]) -> dict[str, Any]:
    # metadata is document data: a prompt that shows it must never resolve a tag from it
    return {k: escape_tags(v) if isinstance(v, str) else v for k, v in metadata.items()}


def original_documents(documents: Sequence[Document]) -> list[Document]:
    """Documents with their original text back in ``page_content`` (for showing sources):
    the inverse of :class:`PiscoDocumentCompressor` for display; no tag is left in them."""
    restored = []
    for doc in documents:
        if ORIGINAL_TEXT_KEY not in doc.metadata:
            restored.append(doc)
            continue
        metadata: dict[str, Any] = {
            k: v for k, v in doc.metadata.items() if k not in (ORIGINAL_TEXT_KEY, MEMORY_COUNT_KEY)
        }
        restored.append(
            Document(page_content=doc.metadata[ORIGINAL_TEXT_KEY], metadata=metadata, id=doc.id)
        )
    return restored
