"""PiscoCompressor: a node postprocessor that replaces retrieved text by PISCO memories."""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from pisco_rag import PiscoModel

from ._common import check_model, compress_nodes
from .nodes import compress_node


class PiscoCompressor(BaseNodePostprocessor):
    """Compress retrieved nodes into PISCO memories (query-independent, 16x by default).

    Put it last in ``node_postprocessors`` and pair it with :class:`~llama_index_pisco.PiscoLLM`
    on the same :class:`~pisco_rag.PiscoModel`::

        query_engine = index.as_query_engine(
            llm=PiscoLLM(model), node_postprocessors=[PiscoCompressor(model)]
        )

    Each node is replaced by a copy (same class, id, score, metadata, relationships) whose
    *LLM-facing* content (``get_content(metadata_mode=MetadataMode.LLM)``) is the memory tags of
    its text: one tag per ``doc_max_length`` tokens, concatenated. Its ``text`` and every other
    content mode stay the original text, so ``response.source_nodes`` show users the passages
    and embeddings are unchanged. Memories come from ``model.store`` when present (for example
    precomputed by :class:`~llama_index_pisco.PiscoMemoryTransform`) and are computed otherwise.

    With an OSCAR model (query-dependent compressor) the memories are made with the query.
    A node without text raises :class:`~pisco_rag.PiscoInputError` naming the node id.
    """

    show_progress: bool = Field(default=False, description="Show a progress bar.")
    batch_size: int = Field(default=16, gt=0, description="Texts per compression batch.")
    include_llm_metadata: bool = Field(
        default=False,
        description=(
            "Put each node's LLM metadata (as text) before its tags. PISCO was trained on "
            "memories alone, so the default gives the LLM the memories only."
        ),
    )

    _model: PiscoModel = PrivateAttr()

    def __init__(self, model: PiscoModel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._model = check_model(model, "PiscoCompressor")

    @classmethod
    def class_name(cls) -> str:
        return "PiscoCompressor"

    @property
    def model(self) -> PiscoModel:
        """The PISCO model whose compressor makes the memories."""
        return self._model

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        if not nodes:
            return []
        groups = compress_nodes(
            self._model,
            [n.node for n in nodes],
            batch_size=self.batch_size,
            show_progress=self.show_progress,
            source="postprocessor",
            query=query_bundle.query_str if query_bundle is not None else None,
        )
        out = []
        for item, memories in zip(nodes, groups):
            tags = "".join(self._model.tag(m) for m in memories)
            node = compress_node(item.node, tags, llm_metadata=self.include_llm_metadata)
            out.append(NodeWithScore(node=node, score=item.score))
        return out


__all__ = ["PiscoCompressor"]
