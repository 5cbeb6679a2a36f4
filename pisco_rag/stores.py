"""Memory stores: key -> Memory. An in-process LRU bounded by bytes, a SQLite store on disk,
and a LanceDB table that keeps memories beside the retrieval vectors of the same chunks."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import torch

from .errors import PiscoInputError, TagError
from .memory import Memory
from .tags import TAG_KEY, make_tag, verify_tag
from .verbosity import warn_once

logger = logging.getLogger(__name__)

StoreDType = Literal["float32", "float16", "bfloat16", "int8"]
"""How a persistent store keeps vectors: as computed (``None``), float32, float16, bfloat16, or
int8 with one float32 scale per memory row (symmetric, ``max|x| / 127``)."""

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _check_dtype(dtype: object) -> StoreDType | None:
    if dtype is None or dtype in get_args(StoreDType):
        return dtype  # type: ignore[return-value]
    raise ValueError(f"dtype must be one of {get_args(StoreDType)} or None, got {dtype!r}")


def encode_memory(memory: Memory, dtype: StoreDType | None = None) -> bytes:
    """The bytes a persistent store keeps for ``memory`` (safetensors with a checksum).

    ``dtype`` narrows the vectors first: ``"float16"``/``"bfloat16"`` halve the size,
    ``"int8"`` quarters it (per-row scale, stored as the last 4 bytes of each row). A memory
    that float16 cannot hold (values beyond 65504) is kept in float32, with a warning.
    """
    vectors = memory.vectors.detach().cpu()
    if dtype is None or (dtype != "int8" and vectors.dtype == _TORCH_DTYPES[dtype]):
        return memory.to_bytes()
    if dtype == "int8":
        v = vectors.float()
        scale = (v.abs().amax(dim=1, keepdim=True) / 127.0).clamp_min(1e-30)
        q = torch.round(v / scale).clamp_(-127, 127).to(torch.int8)
        vectors = torch.cat([q, scale.contiguous().view(torch.int8)], dim=1)
    else:
        narrowed = vectors.to(_TORCH_DTYPES[dtype])
        if bool(torch.isfinite(narrowed).all()) or not bool(torch.isfinite(vectors).all()):
            vectors = narrowed
        else:
            logger.warning("memory %s overflows %s; stored in float32", memory.key, dtype)
            vectors = vectors.float()
    narrowed_memory = Memory(
        vectors, memory.fingerprint, memory.key, memory.text, memory.query, memory.score
    )
    return narrowed_memory.to_bytes()


def decode_memory(data: bytes, key: str | None = None, *, widen: bool = False) -> Memory:
    """Inverse of :func:`encode_memory`. int8 vectors come back as float32; float16 and
    bfloat16 ones too with ``widen`` (stores that narrow on write widen on read)."""
    memory = Memory.from_bytes(data, key=key)
    vectors = memory.vectors
    if vectors.dtype == torch.int8:
        q, scale = vectors[:, :-4], vectors[:, -4:].contiguous().view(torch.float32)
        vectors = q.float() * scale
    elif widen and vectors.dtype in (torch.float16, torch.bfloat16):
        vectors = vectors.float()
    else:
        return memory
    return Memory(vectors, memory.fingerprint, memory.key, memory.text, memory.query, memory.score)


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

    def existing(self, keys: Iterable[str]) -> set[str]:
        """The subset of ``keys`` that the store holds (persistent stores answer without
        decoding the entries)."""
        keys = list(keys)
        return {k for k, m in zip(keys, self.get_many(keys)) if m is not None}

    def tag(self, memory: Memory) -> str:
        """Store ``memory`` (if it is not yet) and return the tag that stands for it in prompts."""
        if not TAG_KEY.fullmatch(memory.key):
            raise PiscoInputError(
                f"only memories with a content key (32 lowercase hex digits, see memory_key) can "
                f"be tagged; got key {memory.key!r}"
            )
        if memory.key not in self:
            self.put(memory)
        return make_tag(self.secret, memory.key)

    def resolve(self, key: str, mac: str) -> Memory | None:
        """The memory behind a parsed tag, or None when this store did not mint the tag (it
        is text that only looks like a tag, or a tag of another store: prompts read it as
        text). A tag this store minted whose memory is gone raises :class:`TagError`."""
        if not verify_tag(self.secret, key, mac):
            warn_once(
                "a prompt holds a memory tag that this model's memory store did not mint; it is "
                "read as text. If it came from compressing with another PiscoModel or store, "
                "compress with the same model (or give both the same persistent store)."
            )
            return None
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

    Safe to share between threads and processes (and picklable, so Ray or multiprocessing
    workers can each open it): a connection per thread and process, one transaction per
    :meth:`put_many`, writers wait for each other up to ``timeout`` seconds. Each entry holds
    the memory's safetensors bytes with a checksum, so a damaged entry is reported by key rather
    than read as garbage. ``dtype`` (see :data:`StoreDType`) narrows vectors on write
    (``"float16"`` halves the file; ``"int8"`` quarters it) and reads give float32 back;
    ``None`` (default) keeps them as computed.
    """

    _BULK = 500  # keys per SELECT ... IN (...)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        dtype: StoreDType | None = None,
        timeout: float = 60.0,
        read_only: bool | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"path {str(self.path)!r} is a directory; give a file name")
        self.dtype = _check_dtype(dtype)
        if timeout <= 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.timeout = float(timeout)
        if read_only is None:  # an existing store we may not write opens for reading
            read_only = self.path.is_file() and not (
                os.access(self.path, os.W_OK) and os.access(self.path.parent, os.W_OK)
            )
        self.read_only = read_only
        self._local = threading.local()
        if read_only:
            if not self.path.is_file():
                raise ValueError(f"read-only store {str(self.path)!r} does not exist")
            self._secret = self._read_secret(self._conn())
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(
                f"cannot create the store folder {str(self.path.parent)!r}: {e}"
            ) from None
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
        self._secret = self._read_secret(conn)

    def _read_secret(self, conn: sqlite3.Connection) -> bytes:
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'tag_secret'").fetchone()
        except sqlite3.DatabaseError as e:
            raise ValueError(
                f"{str(self.path)!r} is not a pisco-rag SQLite memory store ({e})"
            ) from None
        if row is None:
            raise ValueError(f"{str(self.path)!r} is not a pisco-rag memory store (no secret)")
        return bytes(row[0])

    def __getstate__(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "dtype": self.dtype,
            "timeout": self.timeout,
            "read_only": self.read_only,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(
            state["path"],
            dtype=state["dtype"],
            timeout=state["timeout"],
            read_only=state.get("read_only"),
        )

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.pid != os.getpid():
            conn = None  # a forked child never reuses its parent's connection
        if conn is None:
            try:
                if self.read_only:  # immutable: no -wal/-shm files in a folder we cannot write
                    uri = f"{self.path.resolve().as_uri()}?mode=ro&immutable=1"
                    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
                else:
                    conn = sqlite3.connect(self.path, timeout=self.timeout, check_same_thread=False)
                    _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"), self.timeout)
                    conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.OperationalError as e:
                raise ValueError(f"cannot open the memory store {str(self.path)!r}: {e}") from None
            except sqlite3.DatabaseError as e:
                raise ValueError(
                    f"{str(self.path)!r} is not a pisco-rag SQLite memory store ({e}); "
                    "give another path"
                ) from None
            self._local.conn = conn
            self._local.pid = os.getpid()
        return conn

    @property
    def secret(self) -> bytes:
        return self._secret

    def get_many(self, keys: Sequence[str]) -> list[Memory | None]:
        found = self.get_encoded(keys)
        widen = self.dtype is not None
        return [decode_memory(found[k], key=k, widen=widen) if k in found else None for k in keys]

    def get_encoded(self, keys: Sequence[str]) -> dict[str, bytes]:
        """``{key: stored bytes}`` for the keys present (no decoding; see :func:`decode_memory`)."""
        keys = list(keys)
        found: dict[str, bytes] = {}
        conn = self._conn()
        for start in range(0, len(keys), self._BULK):
            chunk = keys[start : start + self._BULK]
            marks = ",".join("?" * len(chunk))
            rows = conn.execute(f"SELECT key, data FROM memories WHERE key IN ({marks})", chunk)
            found.update((k, bytes(d)) for k, d in rows)
        return found

    def existing(self, keys: Iterable[str]) -> set[str]:
        keys = list(keys)
        found: set[str] = set()
        conn = self._conn()
        for start in range(0, len(keys), self._BULK):
            chunk = keys[start : start + self._BULK]
            marks = ",".join("?" * len(chunk))
            found.update(
                k
                for (k,) in conn.execute(f"SELECT key FROM memories WHERE key IN ({marks})", chunk)
            )
        return found

    def put_many(self, memories: Iterable[Memory]) -> None:
        self.put_encoded((m.key, m.fingerprint, encode_memory(m, self.dtype)) for m in memories)

    def put_encoded(self, rows: Iterable[tuple[str, str, bytes]]) -> None:
        """Bulk write of ``(key, fingerprint, bytes from encode_memory)`` rows in one
        transaction (all or nothing); the fastest way to load many entries."""
        rows = list(rows)
        if not rows:
            return
        with self._writing() as conn:  # one transaction: all or nothing
            conn.executemany("INSERT OR REPLACE INTO memories VALUES (?, ?, ?)", rows)

    def delete(self, keys: Iterable[str]) -> None:
        with self._writing() as conn:
            conn.executemany("DELETE FROM memories WHERE key = ?", [(k,) for k in keys])

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """A write transaction, or a clear error naming the file when it cannot be written."""
        if self.read_only:
            raise ValueError(
                f"the memory store {str(self.path)!r} is open read-only: it can serve memories "
                "but not store new ones; copy it somewhere writable, or use_store=False"
            )
        conn = self._conn()
        try:
            with conn:
                yield conn
        except sqlite3.OperationalError as e:
            if "readonly" not in str(e) and "read-only" not in str(e):
                raise
            raise ValueError(
                f"cannot write to the memory store {str(self.path)!r} ({e}): make the file and "
                "its folder writable, or open it with read_only=True"
            ) from None

    def keys(self) -> list[str]:
        return [k for (k,) in self._conn().execute("SELECT key FROM memories")]

    def __contains__(self, key: object) -> bool:
        row = self._conn().execute("SELECT 1 FROM memories WHERE key = ?", (key,)).fetchone()
        return row is not None

    def __len__(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM memories").fetchone()[0]

    @property
    def size_on_disk(self) -> int:
        """Bytes the store takes on disk (the database file and its write-ahead log)."""
        return sum(
            p.stat().st_size
            for p in (self.path, self.path.with_name(self.path.name + "-wal"))
            if p.exists()
        )

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


def _retry_locked(fn: Callable[[], Any], timeout: float) -> Any:
    """Run ``fn``, retrying while another process holds the lock (switching a new database to
    WAL mode takes an exclusive lock that SQLite's busy handler does not always wait for)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class LanceMemoryStore(MemoryStore):
    """Memories beside the retrieval vectors of the same chunks, in one LanceDB table: the
    offline PISCO setup where one vector database returns, for a query, the chunks' memories.

    Columns: ``key`` (as :func:`memory_key`, with a B-tree index after :meth:`optimize`),
    ``fingerprint``, ``text``, ``source``, ``chunk_index``, ``memory`` (the same bytes as
    :class:`SQLiteMemoryStore` keeps, see :func:`encode_memory`) and, with an ``embedder``
    (a callable ``texts -> float32 array [n, dim]``, e.g. :class:`~pisco_rag.documents.
    SentenceEmbedder`), ``vector``: the chunk's retrieval vector, searched by :meth:`search`.
    Writes are upserts on ``key`` and may come from many processes. Picklable.
    """

    def __init__(
        self,
        uri: str | os.PathLike[str],
        *,
        table: str = "memories",
        embedder: Callable[[Sequence[str]], Any] | None = None,
        dtype: StoreDType | None = None,
    ) -> None:
        try:
            import lancedb
        except ImportError:
            raise ModuleNotFoundError(
                "LanceMemoryStore needs lancedb: pip install 'pisco-rag[ray]' (or lancedb)"
            ) from None
        import pyarrow as pa

        self.uri = Path(uri)
        if self.uri.exists() and not self.uri.is_dir():
            raise ValueError(f"uri {str(self.uri)!r} is a file; give a directory for LanceDB")
        self.table_name = table
        self.embedder = embedder
        self.dtype = _check_dtype(dtype)
        self.uri.mkdir(parents=True, exist_ok=True)
        self._secret = _shared_secret(self.uri / "pisco_tag_secret")
        fields = [
            pa.field("key", pa.string(), nullable=False),
            pa.field("fingerprint", pa.string()),
            pa.field("text", pa.string()),
            pa.field("source", pa.string()),
            pa.field("chunk_index", pa.int32()),
            pa.field("memory", pa.binary(), nullable=False),
        ]
        if embedder is not None:
            dim = int(getattr(embedder, "dim", 0) or len(embedder(["dimension probe"])[0]))
            fields.append(pa.field("vector", pa.list_(pa.float32(), dim)))
        # every read sees the latest commit of every writer (other processes included)
        db = lancedb.connect(str(self.uri), read_consistency_interval=timedelta(0))
        self._table = db.create_table(table, schema=pa.schema(fields), exist_ok=True)
        names = self._table.schema.names
        if embedder is not None and "vector" not in names:
            raise ValueError(
                f"table {table!r} in {str(self.uri)!r} was made without retrieval vectors; "
                "open it without embedder= or use another table name"
            )
        self._has_vectors = "vector" in names

    def __getstate__(self) -> dict[str, Any]:
        return {
            "uri": self.uri,
            "table": self.table_name,
            "embedder": self.embedder,
            "dtype": self.dtype,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        uri = state.pop("uri")
        self.__init__(uri, **state)

    @property
    def secret(self) -> bytes:
        return self._secret

    @property
    def table(self):
        """The LanceDB table (for queries beyond this class)."""
        return self._table

    def _where_keys(self, keys: Sequence[str]) -> str:
        quoted = ",".join("'" + k.replace("'", "''") + "'" for k in keys)
        return f"key IN ({quoted})"

    def _select(self, keys: Sequence[str], columns: list[str]):
        keys = list(dict.fromkeys(keys))
        if not keys:
            return []
        query = self._table.search().where(self._where_keys(keys)).select(columns)
        return query.limit(len(keys) * 2 + 10).to_arrow().to_pylist()

    def get_many(self, keys: Sequence[str]) -> list[Memory | None]:
        found = {r["key"]: r["memory"] for r in self._select(keys, ["key", "memory"])}
        widen = self.dtype is not None
        return [decode_memory(found[k], key=k, widen=widen) if k in found else None for k in keys]

    def existing(self, keys: Iterable[str]) -> set[str]:
        return {r["key"] for r in self._select(list(keys), ["key"])}

    def put_many(
        self,
        memories: Iterable[Memory],
        *,
        sources: Sequence[str | None] | None = None,
        chunk_indices: Sequence[int] | None = None,
        vectors: Any = None,
    ) -> None:
        """Upsert memories; ``sources``/``chunk_indices`` say where their chunks came from and
        ``vectors`` gives their retrieval vectors (default: the embedder's, from the text)."""
        import pyarrow as pa

        memories = list(memories)
        if not memories:
            return
        n = len(memories)
        columns: dict[str, Any] = {
            "key": [m.key for m in memories],
            "fingerprint": [m.fingerprint for m in memories],
            "text": [m.text for m in memories],
            "source": list(sources) if sources is not None else [None] * n,
            "chunk_index": list(chunk_indices) if chunk_indices is not None else [0] * n,
            "memory": [encode_memory(m, self.dtype) for m in memories],
        }
        if self._has_vectors:
            if vectors is None:
                if self.embedder is None:
                    raise ValueError(
                        "this table holds retrieval vectors: open the store with embedder= "
                        "or pass vectors="
                    )
                missing = [m.key for m in memories if not m.text]
                if missing:
                    raise ValueError(f"memories {missing[:3]} carry no text to embed")
                vectors = self.embedder([m.text for m in memories])
            flat = pa.array(np.asarray(vectors, dtype=np.float32).reshape(-1))
            dim = self._table.schema.field("vector").type.list_size
            columns["vector"] = pa.FixedSizeListArray.from_arrays(flat, dim)
        data = pa.table(columns, schema=self._table.schema)
        _retry_conflicts(
            lambda: (
                self._table.merge_insert("key")
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute(data)
            )
        )

    def delete(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            self._table.delete(self._where_keys(keys))

    def __len__(self) -> int:
        return self._table.count_rows()

    def search(self, query: str | Any, k: int = 5) -> list[tuple[Memory, float]]:
        """The ``k`` chunks nearest to ``query`` (a text, embedded with the store's
        embedder, or a vector) by cosine similarity: ``[(memory with its text, similarity)]``."""
        if not self._has_vectors:
            raise ValueError(
                "this table holds no retrieval vectors (it was made without embedder=)"
            )
        if isinstance(query, str):
            if self.embedder is None:
                raise ValueError("searching by text needs embedder=; pass a vector instead")
            query = self.embedder([query])[0]
        rows = (
            self._table.search(np.asarray(query, dtype=np.float32), vector_column_name="vector")
            .distance_type("cosine")
            .select(["key", "memory", "_distance"])
            .limit(k)
            .to_arrow()
            .to_pylist()
        )
        widen = self.dtype is not None
        return [
            (decode_memory(r["memory"], key=r["key"], widen=widen), 1.0 - r["_distance"])
            for r in rows
        ]

    def optimize(self, cleanup_older_than: timedelta | None = None) -> None:
        """Compact the table's fragments and (re)build the B-tree index on ``key``, which keeps
        bulk reads of tens of keys in milliseconds at millions of rows. Run it after a bulk
        load (a Ray job does). ``cleanup_older_than`` also deletes table versions older than
        that (LanceDB's default: 7 days)."""
        from lancedb.index import BTree

        self._table.optimize(cleanup_older_than=cleanup_older_than)
        self._table.create_index("key", config=BTree(), replace=True)

    @property
    def size_on_disk(self) -> int:
        """Bytes under the table's directory (memories, vectors, indices, versions)."""
        root = self.uri / f"{self.table_name}.lance"
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _shared_secret(path: Path) -> bytes:
    """The tag secret kept in ``path``, created once (atomically) by whichever process
    comes first."""
    if not path.exists():
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        tmp.write_bytes(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs wins
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_bytes()


def _retry_conflicts(fn: Callable[[], Any], attempts: int = 20) -> Any:
    """Run a LanceDB commit, retrying when a concurrent writer committed first."""
    for attempt in range(attempts):
        try:
            return fn()
        except (OSError, RuntimeError) as e:
            if "onflict" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    return None
