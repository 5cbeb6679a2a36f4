"""LangChain adapters for pisco-rag: a PISCO document compressor, a chat model that reads memory
tags, and a bridge that keeps memories in any LangChain ``ByteStore``.

The OSCAR reranking compressor will come with OSCAR support in the core.
"""

from .chat_models import ChatPisco, to_pisco_messages
from .document_compressors import (
    MEMORY_COUNT_KEY,
    ORIGINAL_TEXT_KEY,
    PiscoDocumentCompressor,
    original_documents,
)
from .stores import ByteStoreMemoryStore

__all__ = [
    "MEMORY_COUNT_KEY",
    "ORIGINAL_TEXT_KEY",
    "ByteStoreMemoryStore",
    "ChatPisco",
    "PiscoDocumentCompressor",
    "original_documents",
    "to_pisco_messages",
]
