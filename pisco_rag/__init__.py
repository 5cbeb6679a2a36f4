"""pisco-rag: compressed-document RAG (PISCO / OSCAR) on one framework-free core."""

from .compat import DependencyError, check_dependencies

check_dependencies()  # a clear message before transformers or peft fail on a bad pair

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
from .tags import escape_tags

# The rest imports torch and transformers (seconds): loaded on first use, so that
# `pisco-rag --help` and argument errors answer at once.
_LAZY = {
    "PiscoConfig": "config",
    "Memory": "memory",
    "memory_key": "memory",
    "Completion": "model",
    "PiscoModel": "model",
    "RankedDocument": "model",
    "TextStream": "model",
    "LanceMemoryStore": "stores",
    "LRUMemoryStore": "stores",
    "MemoryStore": "stores",
    "SQLiteMemoryStore": "stores",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    "escape_tags",
    "memory_key",
]
