"""PiscoMemoryTransform: precompute PISCO memories while indexing (offline PISCO)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.node_parser import SentenceSplitter
from llama_index.core.schema import BaseNode, TransformComponent

from pisco_rag import PiscoInputError, PiscoModel

from ._common import check_model, compress_nodes


def _store_id(model: PiscoModel) -> str:
    """Stable for one persistent store across processes, different for each in-memory store."""
    return hashlib.sha256(b"pisco-store-id\x00" + model.store.secret).hexdigest()[:16]


class PiscoMemoryTransform(TransformComponent):
    """An ``IngestionPipeline`` step that compresses every node into ``model.store``.

    With a persistent store (``SQLiteMemoryStore``) the collection is compressed once, at
    indexing time; at query time :class:`~llama_index_pisco.PiscoCompressor` on the same model
    finds every memory in the store (keys are derived from the model fingerprint and the text)
    and computes nothing. Nodes are returned unchanged except, when ``metadata_key`` is set, a
    comma-separated list of their memory keys in that metadata entry (excluded from the
    embedding and LLM metadata). Put it after the node parser, so it sees the final node texts::

        pipeline = IngestionPipeline(
            transformations=[SentenceSplitter(), PiscoMemoryTransform(model), embed_model]
        )

    The model fingerprint and the store identity are part of the component's fields, so an
    ``IngestionCache`` never skips compression for another model or another store.
    """

    batch_size: int = Field(default=16, gt=0, description="Texts per compression batch.")
    show_progress: bool = Field(default=False, description="Show a progress bar.")
    metadata_key: str | None = Field(
        default="pisco_memory_keys",
        description="Metadata entry for the nodes' memory keys; None to leave metadata alone.",
    )
    model_fingerprint: str = Field(default="", description="Set from the model (cache key).")
    store_id: str = Field(default="", description="Set from the model's store (cache key).")

    _model: PiscoModel = PrivateAttr()

    def __init__(self, model: PiscoModel, **kwargs: Any) -> None:
        model = check_model(model, "PiscoMemoryTransform")
        kwargs["model_fingerprint"] = model.fingerprint
        kwargs["store_id"] = _store_id(model)
        super().__init__(**kwargs)
        self._model = model

    @classmethod
    def class_name(cls) -> str:
        return "PiscoMemoryTransform"

    @property
    def model(self) -> PiscoModel:
        """The PISCO model whose compressor makes the memories."""
        return self._model

    def __call__(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Compress ``nodes`` into the store (reusing stored memories); return the nodes."""
        nodes = list(nodes)
        if not nodes:
            return nodes
        model = getattr(self, "_model", None)
        if model is None:  # pickled into a worker process: the model does not travel
            raise PiscoInputError(
                "this PiscoMemoryTransform has no model (it was pickled, e.g. into an "
                "IngestionPipeline worker process); run the pipeline with num_workers=1"
            )
        groups = compress_nodes(
            model,
            nodes,
            batch_size=self.batch_size,
            show_progress=bool(kwargs.get("show_progress", self.show_progress)),
            source="ingestion",
        )
        if self.metadata_key:
            key = self.metadata_key
            for node, memories in zip(nodes, groups):
                node.metadata[key] = ",".join(m.key for m in memories)
                for excluded in (
                    node.excluded_embed_metadata_keys,
                    node.excluded_llm_metadata_keys,
                ):
                    if key not in excluded:
                        excluded.append(key)
        return nodes

    async def acall(self, nodes: Sequence[BaseNode], **kwargs: Any) -> Sequence[BaseNode]:
        """Like ``__call__``, in a worker thread."""
        return await asyncio.to_thread(self.__call__, nodes, **kwargs)


def pisco_sentence_splitter(
    model: PiscoModel, *, chunk_overlap: int = 16, **kwargs: Any
) -> SentenceSplitter:
    """A ``SentenceSplitter`` whose nodes fit one memory each: ``chunk_size`` is the model's
    ``doc_max_length`` counted with the backbone's tokenizer (metadata included, as LlamaIndex
    counts it), so no node is split again by the compressor."""
    model = check_model(model, "pisco_sentence_splitter")
    kwargs.setdefault("chunk_size", model.config.doc_max_length)
    return SentenceSplitter(
        chunk_overlap=chunk_overlap, tokenizer=model.tokenizer.tokenize, **kwargs
    )


__all__ = ["PiscoMemoryTransform", "pisco_sentence_splitter"]
