"""OscarReranker: rerank retrieved documents with OSCAR's head and compress them for the query."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from langchain_core.callbacks import Callbacks
from langchain_core.documents import BaseDocumentCompressor, Document
from langchain_core.runnables import run_in_executor
from pydantic import ConfigDict, Field, model_validator

from pisco_rag import PiscoInputError, PiscoModel, RerankingUnavailableError

from .document_compressors import MEMORY_COUNT_KEY, ORIGINAL_TEXT_KEY, _escaped, _source_text

logger = logging.getLogger(__name__)

RELEVANCE_SCORE_KEY = "relevance_score"
"""Metadata key of a reranked document that holds its reranking-head score (the key other
LangChain rerankers use)."""


def check_reranking_model(model: PiscoModel) -> PiscoModel:
    """``model`` if it has an OSCAR compressor with a reranking head, else a clear error."""
    config = model.config
    name = config.name or config.backbone
    if not config.is_oscar:
        raise RerankingUnavailableError(
            f"OscarReranker needs an OSCAR model with a reranking head; the model {name!r} is a "
            "PISCO model (compressor='pisco': query-independent memories, no relevance scores). "
            "Use a text reranker (e.g. CrossEncoderReranker) followed by "
            "PiscoDocumentCompressor(pisco_model=model) in a DocumentCompressorPipeline, or load "
            "an OSCAR checkpoint whose compressor has a reranking head (rerank_head=True)."
        )
    if not config.rerank_head:
        raise RerankingUnavailableError(
            f"OscarReranker needs a reranking head; the model {name!r} has an OSCAR compressor "
            f"(compressor={config.compressor!r}) without one: it can compress for a query but "
            "cannot score. Load a checkpoint trained and saved with rerank_head=True, or use a "
            "text reranker followed by PiscoDocumentCompressor(pisco_model=model) (which "
            "compresses for the query with an OSCAR model)."
        )
    return model


class OscarReranker(BaseDocumentCompressor):
    """Reranks retrieved documents with OSCAR's reranking head and compresses them for the query.

    One pass of the OSCAR compressor over ``(query, document text)`` gives both the relevance
    score (the reranking head) and the *query-dependent* memories of each document. The reranker
    keeps the ``top_n`` best documents, best first, and returns them compressed: it replaces a
    text reranker (``CrossEncoderReranker``, ``CohereRerank``...) *and*
    :class:`~langchain_pisco.PiscoDocumentCompressor`. Pair it with
    :class:`~langchain_pisco.ChatPisco` on the same :class:`~pisco_rag.PiscoModel`.

    Each returned document keeps its id and metadata; ``page_content`` is the tags of its
    query-dependent memories (one per ``doc_max_length`` tokens, in text order, concatenated),
    ``metadata["pisco_original_text"]`` (:data:`~langchain_pisco.ORIGINAL_TEXT_KEY`) its text,
    ``metadata["pisco_memories"]`` the number of memories and ``metadata["relevance_score"]``
    (:data:`RELEVANCE_SCORE_KEY`) the head's score (a chunked text scores as its best chunk).
    Documents that already went through a PISCO compressor are reranked on their original
    text. Documents whose text is empty are dropped. The input documents are not modified.

    The model needs an OSCAR compressor with a reranking head
    (:class:`~pisco_rag.RerankingUnavailableError` at construction otherwise); an empty query
    raises :class:`~pisco_rag.PiscoInputError`. Put no ``PiscoDocumentCompressor`` after it
    (it would keep these documents as they are anyway).

    Example:
        .. code-block:: python

            from langchain_classic.retrievers import ContextualCompressionRetriever

            oscar = PiscoModel.from_pretrained("path/to/oscar-checkpoint")
            retriever = ContextualCompressionRetriever(
                base_compressor=OscarReranker(pisco_model=oscar, top_n=3),
                base_retriever=vector_store.as_retriever(search_kwargs={"k": 20}),
            )
            llm = ChatPisco(pisco_model=oscar)
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    pisco_model: PiscoModel = Field(repr=False, exclude=True)
    """The OSCAR model that scores and compresses; its ``store`` holds the memories behind the
    tags. ``model=`` is accepted too (as for ``CrossEncoderReranker``)."""
    top_n: int | None = Field(default=3, gt=0)
    """Number of documents to return, best first (``None``: all of them, reordered)."""
    batch_size: int = Field(default=16, gt=0)
    """Chunks scored and compressed per forward pass."""
    show_progress: bool = False
    """Show a progress bar while compressing."""

    @model_validator(mode="before")
    @classmethod
    def _model_alias(cls, values: Any) -> Any:
        # OscarReranker(model=oscar), as CrossEncoderReranker(model=...) is written.
        if isinstance(values, dict) and "model" in values and "pisco_model" not in values:
            values = dict(values)
            values["pisco_model"] = values.pop("model")
        return values

    @model_validator(mode="after")
    def _check_model(self) -> OscarReranker:
        check_reranking_model(self.pisco_model)
        return self

    def compress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Return the ``top_n`` documents most relevant to ``query``, best first, with their
        text replaced by the tags of their query-dependent memories and their score in
        ``metadata["relevance_score"]``."""
        if not isinstance(query, str) or not query.strip():
            raise PiscoInputError(
                f"OscarReranker needs a non-empty query to rank and compress for, got {query!r}"
            )
        kept: list[tuple[Document, str]] = []
        for doc in documents:
            text = _source_text(doc)
            if text.strip():
                kept.append((doc, text))
            else:
                logger.warning("dropping document %r: its text is empty", doc.id)
        if not kept:
            return []
        ranked = self.pisco_model.rerank(
            query,
            [text for _, text in kept],
            top_n=self.top_n,
            batch_size=self.batch_size,
            show_progress=self.show_progress,
        )
        out = []
        for r in ranked:
            doc, text = kept[r.index]
            out.append(
                Document(
                    page_content="".join(self.pisco_model.tag(m) for m in r.memories),
                    metadata={
                        **_escaped(doc.metadata),
                        ORIGINAL_TEXT_KEY: text,
                        MEMORY_COUNT_KEY: len(r.memories),
                        RELEVANCE_SCORE_KEY: r.score,
                    },
                    id=doc.id,
                )
            )
        return out

    async def acompress_documents(
        self,
        documents: Sequence[Document],
        query: str,
        callbacks: Callbacks | None = None,
    ) -> Sequence[Document]:
        """Async :meth:`compress_documents` (runs in the default executor; the model's lock
        serialises it with other model calls)."""
        return await run_in_executor(None, self.compress_documents, documents, query, callbacks)


__all__ = ["RELEVANCE_SCORE_KEY", "OscarReranker", "check_reranking_model"]
