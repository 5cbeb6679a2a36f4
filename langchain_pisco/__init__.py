"""LangChain adapters for pisco-rag.

- :class:`PiscoDocumentCompressor`: replaces retrieved documents' text by PISCO memory tags
  (compressing for the query with an OSCAR model).
- :class:`OscarReranker`: reranks retrieved documents with an OSCAR model's reranking head and
  compresses them for the query in the same pass (in place of a text reranker such as
  ``CrossEncoderReranker``).
- :class:`ChatPisco`: a chat model that reads the memories behind the tags in its prompt.
- :class:`ByteStoreMemoryStore`: keeps memories in any LangChain ``ByteStore``.
- :class:`PiscoEmbeddings`: the PISCO model's own retriever (one backbone for all three stages).
- :class:`SentenceTransformerEmbeddings`: offline all-MiniLM-L6-v2 embeddings for vector stores.

``escape_tags`` (from pisco_rag) defuses tag-like text in untrusted input such as a question.
"""

from pisco_rag.tags import escape_tags

from .chat_models import ChatPisco, to_pisco_messages
from .document_compressors import (
    MEMORY_COUNT_KEY,
    ORIGINAL_TEXT_KEY,
    PiscoDocumentCompressor,
    original_documents,
)
from .embeddings import PiscoEmbeddings, SentenceTransformerEmbeddings
from .rerankers import RELEVANCE_SCORE_KEY, OscarReranker
from .stores import ByteStoreMemoryStore

__all__ = [
    "MEMORY_COUNT_KEY",
    "ORIGINAL_TEXT_KEY",
    "RELEVANCE_SCORE_KEY",
    "ByteStoreMemoryStore",
    "ChatPisco",
    "OscarReranker",
    "PiscoDocumentCompressor",
    "PiscoEmbeddings",
    "SentenceTransformerEmbeddings",
    "escape_tags",
    "original_documents",
    "to_pisco_messages",
]
