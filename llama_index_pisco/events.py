"""Instrumentation events sent by the pisco adapters (see ``llama_index.core.instrumentation``)."""

from __future__ import annotations

from llama_index.core.instrumentation.events import BaseEvent


class PiscoCompressStartEvent(BaseEvent):
    """Sent before node texts are compressed (query time or ingestion)."""

    num_nodes: int
    source: str  # "postprocessor" or "ingestion"

    @classmethod
    def class_name(cls) -> str:
        return "PiscoCompressStartEvent"


class PiscoCompressEndEvent(BaseEvent):
    """Sent after compression: how many memories the nodes gave (long texts give several)."""

    num_nodes: int
    num_memories: int
    source: str

    @classmethod
    def class_name(cls) -> str:
        return "PiscoCompressEndEvent"


__all__ = ["PiscoCompressEndEvent", "PiscoCompressStartEvent"]
