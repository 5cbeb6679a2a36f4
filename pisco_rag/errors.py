"""Errors raised by pisco-rag. Each message names the argument at fault and what to do."""

from __future__ import annotations


class PiscoError(Exception):
    """Base class of every pisco-rag error."""


class PiscoInputError(PiscoError, ValueError):
    """An argument has the wrong type, is empty, or does not fit the model."""


class DocumentTooLongError(PiscoInputError):
    """A document is longer than the compressor takes and the policy is ``"error"``."""


class MemoryMismatchError(PiscoInputError):
    """A memory was made by a different model (fingerprint or shape differs)."""


class TagError(PiscoInputError):
    """A memory tag in a prompt is malformed, forged, unknown to the store, or foreign."""


class CorruptMemoryError(PiscoError):
    """A stored memory cannot be decoded or fails its checksum."""


class CheckpointError(PiscoError, OSError):
    """A checkpoint or backbone cannot be found, downloaded or read."""


class RerankingUnavailableError(PiscoError):
    """The model has no reranking head."""
