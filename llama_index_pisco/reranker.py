"""OscarReranker: rerank retrieved nodes with OSCAR's head and compress them for the query."""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.callbacks import CBEventType, EventPayload
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent
from llama_index.core.postprocessor.types import BaseNodePostprocessor
from llama_index.core.schema import NodeWithScore, QueryBundle

from pisco_rag import PiscoInputError, PiscoModel, RerankingUnavailableError

from ._common import check_model, node_texts
from .nodes import compress_node

dispatcher = get_dispatcher(__name__)


def check_reranking_model(model: object, owner: str) -> PiscoModel:
    """``model`` as a PiscoModel with an OSCAR compressor and a reranking head, or a clear error."""
    model = check_model(model, owner)
    config = model.config
    name = config.name or config.backbone
    if not config.is_oscar:
        raise RerankingUnavailableError(
            f"{owner} needs an OSCAR model with a reranking head; the model {name!r} is a PISCO "
            "model (compressor='pisco': query-independent memories, no relevance scores). Use "
            "a LlamaIndex reranker followed by PiscoCompressor(model) with it, or load an OSCAR "
            "checkpoint whose compressor has a reranking head (rerank_head=True)."
        )
    if not config.rerank_head:
        raise RerankingUnavailableError(
            f"{owner} needs a reranking head; the model {name!r} has an OSCAR compressor "
            f"(compressor={config.compressor!r}) without one: it can compress for a query but "
            "cannot score. Load a checkpoint trained and saved with rerank_head=True, or use a "
            "LlamaIndex reranker followed by PiscoCompressor(model) (which compresses without "
            "the query)."
        )
    return model


class OscarReranker(BaseNodePostprocessor):
    """Rerank retrieved nodes with OSCAR's reranking head and compress them for the query.

    One pass of the OSCAR compressor over ``(query, node text)`` gives both the relevance score
    (the reranking head) and the *query-dependent* memories of each node. The reranker keeps
    the ``top_n`` best nodes, best first, and returns them compressed: it replaces a text
    reranker *and* :class:`~llama_index_pisco.PiscoCompressor`. Pair it with
    :class:`~llama_index_pisco.PiscoLLM` on the same :class:`~pisco_rag.PiscoModel`::

        query_engine = index.as_query_engine(
            similarity_top_k=20,
            node_postprocessors=[OscarReranker(model, top_n=5)],
            llm=PiscoLLM(model),
        )

    in place of ``node_postprocessors=[SentenceTransformerRerank(top_n=5)], llm=my_llm``.

    Each returned node is a copy of the retrieved node (same class, id, metadata,
    relationships) with ``score`` = the head's score (a chunked text scores as its best chunk).
    Its *LLM-facing* content (``get_content(metadata_mode=MetadataMode.LLM)``) is the tags of
    its query-dependent memories, one per ``doc_max_length`` tokens, in text order; its
    ``text`` and every other content mode stay the original text, so
    ``response.source_nodes`` show users the passages. The input nodes are not modified.

    The model needs an OSCAR compressor with a reranking head
    (:class:`~pisco_rag.RerankingUnavailableError` at construction otherwise). A missing
    query bundle, or a node without text, raises :class:`~pisco_rag.PiscoInputError`.
    Put no compressor after it: :class:`PiscoCompressor` would replace the query-dependent
    memories by query-independent ones.
    """

    top_n: int | None = Field(
        default=5, gt=0, description="Nodes to return, best first (None: all, reordered)."
    )
    show_progress: bool = Field(default=False, description="Show a progress bar.")
    batch_size: int = Field(default=16, gt=0, description="Texts per compressor batch.")
    keep_retrieval_score: bool = Field(
        default=False,
        description="Keep the retrieval score in the returned node's metadata ('retrieval_score').",
    )
    include_llm_metadata: bool = Field(
        default=False,
        description=(
            "Put each node's LLM metadata (as text) before its tags. PISCO/OSCAR were trained on "
            "memories alone, so the default gives the LLM the memories only."
        ),
    )

    _model: PiscoModel = PrivateAttr()

    def __init__(self, model: PiscoModel, **kwargs: Any) -> None:
        model = check_reranking_model(model, "OscarReranker")
        super().__init__(**kwargs)
        self._model = model

    @classmethod
    def class_name(cls) -> str:
        return "OscarReranker"

    @property
    def model(self) -> PiscoModel:
        """The OSCAR model whose compressor scores and compresses the nodes."""
        return self._model

    @property
    def model_name(self) -> str:
        """The name reported in reranking events (the model's name, else its backbone)."""
        return str(self._model.config.name or self._model.config.backbone)

    def _postprocess_nodes(
        self,
        nodes: list[NodeWithScore],
        query_bundle: QueryBundle | None = None,
    ) -> list[NodeWithScore]:
        top_n = self.top_n if self.top_n is not None else len(nodes)
        dispatcher.event(
            ReRankStartEvent(
                query=query_bundle, nodes=nodes, top_n=top_n, model_name=self.model_name
            )
        )
        if query_bundle is None:
            raise PiscoInputError(
                "OscarReranker needs the query: call postprocess_nodes(nodes, "
                "query_bundle=QueryBundle(query)) or query_str=..., or use it in a query or "
                "chat engine, which passes the query"
            )
        if not nodes:
            dispatcher.event(ReRankEndEvent(nodes=[]))
            return []
        texts = node_texts([n.node for n in nodes])
        query_str = query_bundle.query_str

        with self.callback_manager.event(
            CBEventType.RERANKING,
            payload={
                EventPayload.NODES: nodes,
                EventPayload.MODEL_NAME: self.model_name,
                EventPayload.QUERY_STR: query_str,
                EventPayload.TOP_K: self.top_n,
            },
        ) as event:
            ranked = self._model.rerank(
                query_str,
                texts,
                top_n=self.top_n,
                batch_size=self.batch_size,
                show_progress=self.show_progress,
            )
            new_nodes = []
            for r in ranked:
                item = nodes[r.index]
                tags = "".join(self._model.tag(m) for m in r.memories)
                node = compress_node(item.node, tags, llm_metadata=self.include_llm_metadata)
                if self.keep_retrieval_score:
                    node.metadata["retrieval_score"] = item.score
                new_nodes.append(NodeWithScore(node=node, score=r.score))
            event.on_end(payload={EventPayload.NODES: new_nodes})

        dispatcher.event(ReRankEndEvent(nodes=new_nodes))
        return new_nodes


__all__ = ["OscarReranker"]
