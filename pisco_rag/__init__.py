"""pisco-rag: compressed-document RAG (PISCO / OSCAR) on one framework-free core."""

from .compat import DependencyError, check_dependencies

check_dependencies()  # a clear message before transformers or peft fail on a bad pair

from .config import PiscoConfig
from .errors import (
    CheckpointError,
    CorruptMemoryError,
    DocumentTooLongError,
    MemoryMismatchError,
    PiscoError,
    PiscoInputError,
    RerankingUnavailableError,
    TagError,
)
from .memory import Memory, memory_key
from .model import Completion, PiscoModel, RankedDocument, TextStream
from .stores import LanceMemoryStore, LRUMemoryStore, MemoryStore, SQLiteMemoryStore

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "Completion",
    "CorruptMemoryError",
    "DependencyError",
    "DocumentTooLongError",
    "LRUMemoryStore",
    "LanceMemoryStore",
    "Memory",
    "MemoryMismatchError",
    "MemoryStore",
    "PiscoConfig",
    "PiscoError",
    "PiscoInputError",
    "PiscoModel",
    "RankedDocument",
    "RerankingUnavailableError",
    "SQLiteMemoryStore",
    "TagError",
    "TextStream",
    "memory_key",
]
