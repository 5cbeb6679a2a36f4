"""Memory: the compressed form of one text chunk, and its byte encoding for stores."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import CorruptMemoryError, PiscoInputError


def memory_key(fingerprint: str, text: str, query: str | None = None, variant: str = "") -> str:
    """Content-derived store key: the same model, query and text give the same key anywhere.
    ``variant`` names another way of compressing the same text (e.g. naver's truncation)."""
    h = hashlib.sha256()
    for part in (fingerprint, query or "", text, *([variant] if variant else [])):
        h.update(part.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()[:32]


def _checksum(t: torch.Tensor, *metadata: str) -> str:
    """sha256 of the vectors' bytes and, from format 2 on, of the metadata strings too."""
    h = hashlib.sha256(t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes())
    for part in metadata:
        h.update(b"\x00")
        h.update(part.encode("utf-8"))
    return h.hexdigest()[:16]


@dataclass(frozen=True, eq=False)
class Memory:
    """The compressed form of one chunk of text.

    ``vectors`` is ``[n_mem, hidden]`` (``[8, hidden]`` for 128-token chunks at rate 16). A memory
    can only be read by a decoder whose :attr:`PiscoModel.fingerprint` equals ``fingerprint``.
    ``source_index`` and ``chunk_index`` say which document of a ``compress`` call, and which
    128-token chunk of it, this memory stands for.
    """

    vectors: torch.Tensor
    fingerprint: str
    key: str
    text: str | None = None
    query: str | None = None
    score: float | None = None
    source_index: int | None = None
    chunk_index: int = 0

    def __post_init__(self) -> None:
        v = self.vectors
        packed = isinstance(v, torch.Tensor) and v.dtype == torch.int8  # a store's int8 form
        if not isinstance(v, torch.Tensor) or v.ndim != 2 or not (v.is_floating_point() or packed):
            raise PiscoInputError(
                f"Memory.vectors must be a 2-D float tensor [n_mem, hidden], got "
                f"{getattr(v, 'shape', type(v).__name__)}"
            )
        if not packed and not bool(torch.isfinite(v).all()):
            raise PiscoInputError(f"memory {self.key} holds NaN or infinite values")
        if v.untyped_storage().nbytes() > v.numel() * v.element_size() or not v.is_contiguous():
            # a view into a batch's hidden states would keep the whole batch alive
            object.__setattr__(
                self, "vectors", v.detach().clone(memory_format=torch.contiguous_format)
            )

    @property
    def n_mem(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes this memory holds: its vectors and its text and query."""
        text = sum(len(t.encode("utf-8")) for t in (self.text, self.query) if t)
        return self.vectors.untyped_storage().nbytes() + text

    def with_source(self, source_index: int | None, chunk_index: int = 0) -> Memory:
        return replace(self, source_index=source_index, chunk_index=chunk_index)

    def to_bytes(self) -> bytes:
        """safetensors bytes with the metadata and a checksum of the vectors."""
        vectors = self.vectors.detach().contiguous().cpu()
        extra = json.dumps({"text": self.text, "query": self.query, "score": self.score})
        meta = {
            "fingerprint": self.fingerprint,
            "key": self.key,
            "extra": extra,
            "format": "2",
            "checksum": _checksum(vectors, self.fingerprint, self.key, extra),
        }
        return st_save({"vectors": vectors}, metadata=meta)

    @classmethod
    def from_bytes(cls, data: bytes, *, key: str | None = None) -> Memory:
        """Decode :meth:`to_bytes` output; a damaged entry raises :class:`CorruptMemoryError`."""
        where = f"stored memory {key!r}" if key else "memory bytes"
        try:
            tensors = st_load(data)
            meta = _read_metadata(data)
            vectors = tensors["vectors"]
            extra = json.loads(meta["extra"])
            # format 2 covers the metadata too; entries written before it, the vectors only
            covered = (
                (meta["fingerprint"], meta["key"], meta["extra"]) if meta.get("format") else ()
            )
            if _checksum(vectors, *covered) != meta["checksum"]:
                raise CorruptMemoryError(f"{where} fails its checksum")
            if key is not None and meta["key"] != key:
                raise CorruptMemoryError(f"{where} holds the memory of key {meta['key']!r}")
            return cls(
                vectors=vectors,
                fingerprint=meta["fingerprint"],
                key=meta["key"],
                text=extra.get("text"),
                query=extra.get("query"),
                score=extra.get("score"),
            )
        except CorruptMemoryError as e:
            raise CorruptMemoryError(
                f"{e}: delete the entry (store.delete([{key!r}])) and compress the text again"
            ) from None
        except (SafetensorError, KeyError, ValueError, TypeError, PiscoInputError) as e:
            raise CorruptMemoryError(
                f"{where} cannot be decoded ({e}); delete the entry "
                f"(store.delete([{key!r}])) and compress the text again"
            ) from None


def _read_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return header["__metadata__"]
