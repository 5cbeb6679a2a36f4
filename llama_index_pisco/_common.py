"""Helpers shared by the postprocessor and the ingestion transform."""

from __future__ import annotations

from collections.abc import Sequence

from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.schema import BaseNode, MetadataMode

from pisco_rag import Memory, PiscoInputError, PiscoModel

from .events import PiscoCompressEndEvent, PiscoCompressStartEvent

dispatcher = get_dispatcher(__name__)


def check_model(model: object, owner: str) -> PiscoModel:
    if not isinstance(model, PiscoModel):
        raise PiscoInputError(
            f"{owner} needs a pisco_rag.PiscoModel (e.g. PiscoModel.from_pretrained('embedded')), "
            f"got {type(model).__name__}"
        )
    return model


def node_texts(nodes: Sequence[BaseNode], where: str = "nodes") -> list[str]:
    """The raw text of each node (no metadata); a node without text is a clear error."""
    texts = []
    for i, node in enumerate(nodes):
        if not isinstance(node, BaseNode):
            raise PiscoInputError(
                f"{where}[{i}] must be a llama_index node, got {type(node).__name__}"
            )
        text = node.get_content(metadata_mode=MetadataMode.NONE)
        if not isinstance(text, str) or not text.strip():
            raise PiscoInputError(
                f"node {node.node_id!r} ({where}[{i}], {type(node).__name__}) has no text to "
                "compress; PISCO compresses text only: drop empty or non-text nodes before this "
                "step"
            )
        texts.append(text)
    return texts


def compress_nodes(
    model: PiscoModel,
    nodes: Sequence[BaseNode],
    *,
    batch_size: int,
    show_progress: bool,
    source: str,
    query: str | None = None,
) -> list[list[Memory]]:
    """Memories of each node, in chunk order (one per ``doc_max_length`` tokens of text).

    Memories already in ``model.store`` (same model, same text) are read, not recomputed.
    An OSCAR model compresses with ``query`` (its memories depend on the question).
    """
    texts = node_texts(nodes)
    dispatcher.event(PiscoCompressStartEvent(num_nodes=len(texts), source=source))
    queries = [query] * len(texts) if model.config.is_oscar and query else None
    memories = model.compress(
        texts, queries=queries, batch_size=batch_size, show_progress=show_progress
    )
    groups: list[list[Memory]] = [[] for _ in texts]
    for memory in memories:
        groups[memory.source_index].append(memory)
    for group in groups:
        group.sort(key=lambda m: m.chunk_index)
    dispatcher.event(
        PiscoCompressEndEvent(num_nodes=len(texts), num_memories=len(memories), source=source)
    )
    return groups
