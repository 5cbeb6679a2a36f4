"""A bridge that keeps PISCO memories in any LangChain ``ByteStore``."""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Iterable, Iterator, Sequence

from langchain_core.stores import ByteStore

from pisco_rag import Memory, MemoryStore
from pisco_rag.tags import make_tag

_NAMESPACE = re.compile(r"^[A-Za-z0-9_.\-]+(?:/[A-Za-z0-9_.\-]+)*$")
_SECRET_HEX = re.compile(r"^[0-9a-f]{64}$")


class ByteStoreMemoryStore(MemoryStore):
    """A :class:`pisco_rag.MemoryStore` on top of a LangChain ``ByteStore``
    (``InMemoryByteStore``, ``LocalFileStore``, Redis, ...).

    Each memory is stored as its safetensors bytes (:meth:`pisco_rag.Memory.to_bytes`, with a
    checksum) under ``"<namespace>/memories/<key>"``. The secret that signs memory tags is kept
    under the reserved key ``"<namespace>/tag_secret"``: it is created by the first store opened on
    an empty byte store and read by every later one, so another process that opens the same
    ``LocalFileStore`` directory resolves the same tags. Keys are content-derived, so it also
    finds the same memories instead of computing them again.

    Give it to a model with ``PiscoModel.from_pretrained(..., store=ByteStoreMemoryStore(bs))``.

    Note: byte stores have no atomic "set if absent"; open the store once (for example before
    starting worker processes) so that concurrent first opens cannot mint two secrets. Writes are
    as crash-safe as the byte store's (``LocalFileStore`` writes files in place); for a
    crash-safe on-disk store use :class:`pisco_rag.SQLiteMemoryStore`.
    """

    def __init__(self, byte_store: ByteStore, *, namespace: str = "pisco") -> None:
        if not _NAMESPACE.fullmatch(namespace) or {".", ".."} & set(namespace.split("/")):
            raise ValueError(
                f"namespace must be letters, digits, '_', '.', '-' and '/' separators, "
                f"got {namespace!r}"
            )
        self.byte_store = byte_store
        self.namespace = namespace
        self._prefix = f"{namespace}/memories/"
        self._secret_key = f"{namespace}/tag_secret"
        self._secret = self._load_or_create_secret()

    # ------------------------------------------------------------------ secret
    def _read_secret(self) -> bytes | None:
        raw = self.byte_store.mget([self._secret_key])[0]
        if raw is None:
            return None
        text = raw.decode("ascii", errors="replace").strip()
        if not _SECRET_HEX.fullmatch(text):
            return b""  # being written by another process, or damaged
        return bytes.fromhex(text)

    def _load_or_create_secret(self) -> bytes:
        secret = self._read_secret()
        if secret is None:
            self.byte_store.mset([(self._secret_key, secrets.token_hex(32).encode("ascii"))])
            secret = self._read_secret()  # adopt what is stored if another process won the race
        for _ in range(20):
            if secret:
                return secret
            time.sleep(0.05)
            secret = self._read_secret()
        raise ValueError(
            f"the byte store's entry {self._secret_key!r} does not hold a pisco-rag tag secret "
            "(64 hex digits); it is damaged or the namespace is used by something else: pick "
            "another namespace, or delete the entry (tags minted before become invalid)"
        )

    @property
    def secret(self) -> bytes:
        return self._secret

    # ------------------------------------------------------------------ MemoryStore
    def _store_key(self, key: str) -> str:
        return self._prefix + key

    def get_many(self, keys: Sequence[str]) -> list[Memory | None]:
        keys = list(keys)
        raw = self.byte_store.mget([self._store_key(k) for k in keys])
        return [Memory.from_bytes(d, key=k) if d is not None else None for k, d in zip(keys, raw)]

    def put_many(self, memories: Iterable[Memory]) -> None:
        pairs = [(self._store_key(m.key), m.to_bytes()) for m in memories]
        if pairs:
            self.byte_store.mset(pairs)

    def delete(self, keys: Iterable[str]) -> None:
        keys = [self._store_key(k) for k in keys]
        if keys:
            self.byte_store.mdelete(keys)

    def keys(self) -> Iterator[str]:
        """The memory keys held in the byte store (under this namespace)."""
        for key in self.byte_store.yield_keys(prefix=self._prefix):
            key = str(key).replace("\\", "/")  # LocalFileStore on Windows
            if key.startswith(self._prefix):
                yield key[len(self._prefix) :]

    def __len__(self) -> int:
        return sum(1 for _ in self.keys())

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return self.byte_store.mget([self._store_key(key)])[0] is not None

    def tag(self, memory: Memory) -> str:
        """Store ``memory`` unless its key is present, and return its tag."""
        if memory.key not in self:
            self.put(memory)
        return make_tag(self.secret, memory.key)
