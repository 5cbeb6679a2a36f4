"""Memory stores: key -> Memory. An in-process LRU bounded by bytes and a SQLite store on disk."""

from __future__ import annotations

import os
import secrets
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import TagError
from .memory import Memory
from .tags import make_tag, verify_tag


class MemoryStore(ABC):
    """Maps content-derived keys to memories, and mints the tags that stand for them in prompts.

    Subclasses implement :meth:`get_many`, :meth:`put_many`, :meth:`delete`, ``__len__`` and
    :attr:`secret`; everything else is built on those.
    """

    @property
    @abstractmethod
    def secret(self) -> bytes:
        """Key of the HMAC in tags; every process that opens the same store sees the same one."""

    @abstractmethod
    def get_many(self, keys: Sequence[str]) -> list[Memory | None]:
        """Memories for ``keys`` in order; ``None`` where a key is absent."""

    @abstractmethod
    def put_many(self, memories: Iterable[Memory]) -> None:
        """Store memories under their keys (replacing any previous entry)."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None:
        """Remove entries; absent keys are ignored."""

    @abstractmethod
    def __len__(self) -> int: ...

    def get(self, key: str) -> Memory | None:
        return self.get_many([key])[0]

    def put(self, memory: Memory) -> None:
        self.put_many([memory])

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.get(key) is not None

    def tag(self, memory: Memory) -> str:
        """Store ``memory`` (if it is not yet) and return the tag that stands for it in prompts."""
        if self.get(memory.key) is None:
            self.put(memory)
        return make_tag(self.secret, memory.key)

    def resolve(self, key: str, mac: str) -> Memory:
        """The memory behind a parsed tag; :class:`TagError` if forged or no longer stored."""
        if not verify_tag(self.secret, key, mac):
            raise TagError(
                f"the prompt holds a memory tag ([[pisco:{key}:{mac}]]) that this model's memory "
                "store did not mint: it was made by another store, or it is text that only looks "
                "like a tag. Compress the documents with the same PiscoModel (or give both the "
                "same persistent store) before sending the prompt."
            )
        memory = self.get(key)
        if memory is None:
            raise TagError(
                f"memory tag for key {key!r} is valid but the memory is no longer in the store "
                "(an in-memory store evicts its oldest entries when full). Compress the documents "
                "again, raise the store's max_bytes, or use a persistent SQLiteMemoryStore."
            )
        return memory


class LRUMemoryStore(MemoryStore):
    """In-process store that evicts least-recently-used memories beyond ``max_bytes``."""

    def __init__(self, max_bytes: int = 1 << 30) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Memory] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._secret = secrets.token_bytes(32)

    @property
    def secret(self) -> bytes:
        return self._secret

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get_many(self, keys: Sequence[str]) -> list[Memory | None]:
        with self._lock:
            out = []
            for key in keys:
                memory = self._items.get(key)
                if memory is not None:
                    self._items.move_to_end(key)
                out.append(memory)
            return out

    def put_many(self, memories: Iterable[Memory]) -> None:
        with self._lock:
            for memory in memories:
                old = self._items.pop(memory.key, None)
                if old is not None:
                    self._bytes -= old.nbytes
                self._items[memory.key] = memory
                self._bytes += memory.nbytes
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def delete(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                old = self._items.pop(key, None)
                if old is not None:
                    self._bytes -= old.nbytes

    def __len__(self) -> int:
        return len(self._items)


class SQLiteMemoryStore(MemoryStore):
    """Persistent store in one SQLite file (WAL mode): crash-safe writes, concurrent readers.

    Safe to share between threads and processes. Each entry holds the memory's safetensors
    bytes with a checksum, so a damaged entry is reported by key rather than read as garbage.
    """

    _BULK = 500  # keys per SELECT ... IN (...)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"path {str(self.path)!r} is a directory; give a file name")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        conn = self._conn()
        with conn:
            conn.execute(
                "CREATE TABLE IF NOT EXISTS memories ("
                "key TEXT PRIMARY KEY, fingerprint TEXT NOT NULL, data BLOB NOT NULL)"
            )
            conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value BLOB)")
            conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('tag_secret', ?)", (secrets.token_bytes(32),)
            )
        self._secret = bytes(
            conn.execute("SELECT value FROM meta WHERE name = 'tag_secret'").fetchone()[0]
        )

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            try:
                conn = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.DatabaseError as e:
                raise ValueError(
                    f"{str(self.path)!r} is not a pisco-rag SQLite memory store ({e}); "
                    "give another path"
                ) from None
            self._local.conn = conn
        return conn

    @property
    def secret(self) -> bytes:
        return self._secret

    def get_many(self, keys: Sequence[str]) -> list[Memory | None]:
        keys = list(keys)
        found: dict[str, bytes] = {}
        conn = self._conn()
        for start in range(0, len(keys), self._BULK):
            chunk = keys[start : start + self._BULK]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(f"SELECT key, data FROM memories WHERE key IN ({marks})", chunk)
            found.update((k, bytes(d)) for k, d in rows)
        return [Memory.from_bytes(found[k], key=k) if k in found else None for k in keys]

    def put_many(self, memories: Iterable[Memory]) -> None:
        rows = [(m.key, m.fingerprint, m.to_bytes()) for m in memories]
        if not rows:
            return
        conn = self._conn()
        with conn:  # one transaction: all or nothing
            conn.executemany("INSERT OR REPLACE INTO memories VALUES (?, ?, ?)", rows)

    def delete(self, keys: Iterable[str]) -> None:
        conn = self._conn()
        with conn:
            conn.executemany("DELETE FROM memories WHERE key = ?", [(k,) for k in keys])

    def keys(self) -> list[str]:
        return [k for (k,) in self._conn().execute("SELECT key FROM memories")]

    def __contains__(self, key: object) -> bool:
        row = self._conn().execute("SELECT 1 FROM memories WHERE key = ?", (key,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM memories").fetchone()[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
