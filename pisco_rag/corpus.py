"""Compressing a whole corpus once (offline PISCO): read documents (a folder of text files,
JSONL, Parquet), chunk them with the model's own chunker, compress the chunks in Ray Data
actors on GPUs or CPUs (``map_batches``), and write the memories to the persistent store, to
Parquet shards or to a LanceDB table beside their retrieval vectors. Keys are exactly those
:meth:`PiscoModel.compress` uses, so a store filled here serves its lookups. Runs resume: keys
already in the output are skipped. Bad input is reported with its path and skipped.

Ray is optional (``pip install 'pisco-rag[ray]'``): ``engine="local"`` runs the same stages in
this process.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import numpy as np
from tqdm.auto import tqdm

from .chunking import chunk_text
from .documents import BadInput, SentenceEmbedder, iter_documents, list_corpus_files
from .errors import PiscoInputError
from .memory import Memory, memory_key
from .stores import (
    LanceMemoryStore,
    MemoryStore,
    SQLiteMemoryStore,
    StoreDType,
    _check_dtype,
    decode_memory,
    encode_memory,
)

if TYPE_CHECKING:
    from .model import PiscoModel

logger = logging.getLogger(__name__)

OutputFormat = Literal["sqlite", "parquet", "lance"]
Engine = Literal["ray", "local"]

# row statuses flowing through the pipeline (one row per chunk, or per bad input)
_DOC, _CHUNK, _BAD = "document", "chunk", "bad_input"
COMPRESSED, STORED, FAILED = "compressed", "already_stored", "failed"
_COLUMNS = ("source", "doc_index", "chunk_index", "key", "text", "status", "message")


@dataclass(frozen=True)
class ModelLoader:
    """Picklable recipe that loads the model in each worker: the arguments of
    :meth:`PiscoModel.from_pretrained` (``dtype`` by name: ``"float32"``, ``"bfloat16"``,
    ``"float16"``)."""

    name_or_path: str = "embedded"
    backbone: str | None = None
    device: str | None = None
    dtype: str | None = None

    def __call__(self) -> PiscoModel:
        import warnings

        import torch

        from .model import PiscoModel

        dtype = None
        if self.dtype is not None:
            dtype = getattr(torch, self.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise PiscoInputError(f"dtype must name a torch dtype, got {self.dtype!r}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untrained notice: the driver reports it once
            return PiscoModel.from_pretrained(
                self.name_or_path, backbone=self.backbone, device=self.device, dtype=dtype
            )


@dataclass
class CorpusResult:
    """What a corpus run did. ``bad_inputs`` lists every skipped file, record or empty
    document with its path; ``failed`` chunks could not be compressed (see the log)."""

    output: str
    format: str
    fingerprint: str
    files: int = 0
    documents: int = 0
    chunks: int = 0
    compressed: int = 0
    already_stored: int = 0
    failed: int = 0
    bad_inputs: list[BadInput] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    entries: int = 0
    size_on_disk: int = 0
    model_trained: bool = True
    startup_seconds: float = 0.0  # until the first results came back (model loads included)

    @property
    def documents_per_second(self) -> float:
        return self.documents / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        return (
            f"{self.documents} documents, {self.chunks} chunks from {self.files} files: "
            f"{self.compressed} compressed, {self.already_stored} already stored, "
            f"{self.failed} failed; {len(self.bad_inputs)} bad inputs skipped; "
            f"{self.output} ({self.format}) holds {self.entries} memories, "
            f"{self.size_on_disk / 2**20:.1f} MiB; {self.seconds:.1f} s"
        )


# ---------------------------------------------------------------------------- Parquet shards
class ParquetShards:
    """Memories as a folder of Parquet files, one row per chunk, keyed like the stores:
    ``key``, ``fingerprint``, ``text``, ``source``, ``chunk_index``, ``memory`` (the bytes of
    :func:`~pisco_rag.stores.encode_memory`) and, with an ``embedder``, ``vector`` (the
    chunk's retrieval vector). Each write is one new file, written aside and renamed into
    place, so a killed job leaves only whole shards. Picklable."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        dtype: StoreDType | None = None,
        embedder: Callable[[Sequence[str]], Any] | None = None,
    ) -> None:
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise ValueError(f"directory {str(self.directory)!r} is a file")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dtype = _check_dtype(dtype)
        self.embedder = embedder
        self._known: set[str] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_known": None}

    def files(self) -> list[Path]:
        return sorted(self.directory.glob("part-*.parquet"))

    def _dataset(self):
        import pyarrow.dataset as pads

        return pads.dataset([str(p) for p in self.files()], format="parquet")

    def keys(self) -> set[str]:
        """Every key in the shards."""
        if not self.files():
            return set()
        return set(self._dataset().to_table(columns=["key"]).column("key").to_pylist())

    def existing(self, keys: Iterable[str]) -> set[str]:
        """The subset of ``keys`` already written (shards present when first asked, plus this
        process's own writes)."""
        if self._known is None:
            self._known = self.keys()
        return {k for k in keys if k in self._known}

    def write(
        self,
        memories: Sequence[Memory],
        sources: Sequence[str | None] | None = None,
        chunk_indices: Sequence[int] | None = None,
    ) -> Path | None:
        """Write one shard; returns its path."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not memories:
            return None
        n = len(memories)
        columns: dict[str, Any] = {
            "key": pa.array([m.key for m in memories], pa.string()),
            "fingerprint": pa.array([m.fingerprint for m in memories], pa.string()),
            "text": pa.array([m.text for m in memories], pa.string()),
            "source": pa.array(list(sources) if sources is not None else [None] * n, pa.string()),
            "chunk_index": pa.array(
                list(chunk_indices) if chunk_indices is not None else [0] * n, pa.int32()
            ),
            "memory": pa.array([encode_memory(m, self.dtype) for m in memories], pa.binary()),
        }
        if self.embedder is not None:
            vectors = np.asarray(self.embedder([m.text or "" for m in memories]), np.float32)
            columns["vector"] = pa.FixedSizeListArray.from_arrays(
                pa.array(vectors.reshape(-1)), vectors.shape[1]
            )
        name = f"part-{uuid.uuid4().hex}.parquet"
        tmp = self.directory / f".{name}.tmp"
        pq.write_table(pa.table(columns), tmp)
        os.replace(tmp, self.directory / name)
        if self._known is not None:
            self._known.update(m.key for m in memories)
        return self.directory / name

    def iter_memories(self, batch_rows: int = 1024) -> Iterator[Memory]:
        """Every memory in the shards (float32 vectors when the shards were narrowed)."""
        if not self.files():
            return
        widen = self.dtype is not None
        for batch in self._dataset().to_batches(columns=["key", "memory"], batch_size=batch_rows):
            for key, data in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
                yield decode_memory(data, key=key, widen=widen)

    def load_into(self, store: MemoryStore, batch_rows: int = 1024) -> int:
        """Copy every memory into ``store`` (e.g. a :class:`SQLiteMemoryStore` that serves
        :meth:`PiscoModel.compress`); returns how many."""
        count, batch = 0, []
        for memory in self.iter_memories(batch_rows):
            batch.append(memory)
            if len(batch) >= batch_rows:
                store.put_many(batch)
                count, batch = count + len(batch), []
        store.put_many(batch)
        return count + len(batch)

    def __len__(self) -> int:
        return self._dataset().count_rows() if self.files() else 0

    @property
    def size_on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.files())


def open_output(
    output: str | os.PathLike[str],
    format: OutputFormat = "sqlite",
    *,
    dtype: StoreDType | None = None,
    embedder: Callable[[Sequence[str]], Any] | None = None,
) -> SQLiteMemoryStore | LanceMemoryStore | ParquetShards:
    """The writer of a corpus run: a SQLite store file, a folder of Parquet shards, or a
    LanceDB folder (with ``embedder``, the retrieval vectors go beside the memories)."""
    if format == "sqlite":
        if embedder is not None:
            raise PiscoInputError("embedder= needs format='lance' or 'parquet'")
        return SQLiteMemoryStore(output, dtype=dtype)
    if format == "parquet":
        return ParquetShards(output, dtype=dtype, embedder=embedder)
    if format == "lance":
        return LanceMemoryStore(output, dtype=dtype, embedder=embedder)
    raise PiscoInputError(f"format must be one of {get_args(OutputFormat)}, got {format!r}")


def _write(sink: Any, memories: list[Memory], sources: list[str], chunks: list[int]) -> None:
    if isinstance(sink, ParquetShards):
        sink.write(memories, sources, chunks)
    elif isinstance(sink, LanceMemoryStore):
        sink.put_many(memories, sources=sources, chunk_indices=chunks)
    else:
        sink.put_many(memories)


# ---------------------------------------------------------------------------- pipeline stages
def _rows(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """Column batch of pipeline rows (numpy, as Ray Data passes them)."""
    out: dict[str, np.ndarray] = {}
    for name in _COLUMNS:
        values = [r.get(name, -1 if name.endswith("index") else "") for r in rows]
        out[name] = np.array(values, dtype=np.int64 if name.endswith("index") else object)
    return out


def _iter_rows(batch: dict[str, np.ndarray]) -> Iterator[dict[str, Any]]:
    n = len(batch["status"])
    for i in range(n):
        yield {name: batch[name][i] for name in _COLUMNS}


def read_stage(batch: dict[str, np.ndarray], text_field: str = "text") -> Iterator[dict]:
    """Files -> one row per document (or per bad input)."""
    for path in batch["path"]:
        for docs, bad in iter_documents(str(path), text_field=text_field):
            rows = [
                {"source": d.source, "doc_index": d.index, "text": d.text, "status": _DOC}
                for d in docs
            ]
            rows += [
                {
                    "source": b.path,
                    "doc_index": -1 if b.index is None else b.index,
                    "status": _BAD,
                    "message": b.reason,
                }
                for b in bad
            ]
            if rows:
                yield _rows(rows)


def chunk_stage(
    batch: dict[str, np.ndarray], tokenizer: Any, max_tokens: int, fingerprint: str
) -> dict[str, np.ndarray]:
    """Documents -> one row per chunk, with its store key (``model.chunk`` exactly)."""
    rows: list[dict[str, Any]] = []
    for row in _iter_rows(batch):
        if row["status"] != _DOC:
            rows.append(row)
            continue
        try:
            chunks = chunk_text(tokenizer, row["text"], max_tokens)
        except Exception as e:  # a document that breaks the tokenizer: report, go on
            rows.append({**row, "text": "", "status": FAILED, "message": f"chunking: {e}"})
            continue
        for j, chunk in enumerate(chunks):
            key = memory_key(fingerprint, chunk)
            rows.append({**row, "chunk_index": j, "key": key, "text": chunk, "status": _CHUNK})
    return _rows(rows)


class CompressStage:
    """Chunks -> memories, written to the output; one instance per worker (a Ray actor).

    Loads the model with ``loader`` and refuses to run if its fingerprint is not ``fingerprint``
    (another checkpoint, backbone or dtype class would make memories the decoder cannot read).
    Keys already in the output are skipped. Returns one status row per input row (no text)."""

    def __init__(
        self,
        loader: Callable[[], PiscoModel] | PiscoModel,
        fingerprint: str,
        sink: Any,
        batch_size: int = 16,
        rows_per_write: int = 256,
    ) -> None:
        self.model = loader if _is_model(loader) else loader()
        if self.model.fingerprint != fingerprint:
            raise PiscoInputError(
                f"the worker's model has fingerprint {self.model.fingerprint}, the run expects "
                f"{fingerprint}: every worker must load the same checkpoint, backbone and dtype"
            )
        self.fingerprint = fingerprint
        self.sink = sink
        self.batch_size = batch_size
        self.rows_per_write = rows_per_write

    def __call__(self, batch: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        """Status rows for ``batch``, ``rows_per_write`` rows at a time (one write each)."""
        n = len(batch["status"])
        for start in range(0, n, self.rows_per_write):
            yield self._process(
                {k: v[start : start + self.rows_per_write] for k, v in batch.items()}
            )

    def _process(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = list(_iter_rows(batch))
        todo = [r for r in rows if r["status"] == _CHUNK]
        stored = self.sink.existing([r["key"] for r in todo]) if todo else set()
        pending: dict[str, dict[str, Any]] = {}
        for r in todo:
            if r["key"] in stored or r["key"] in pending:  # a repeated chunk is computed once
                r["status"] = STORED
            else:
                pending[r["key"]] = r
        memories: list[Memory] = []
        computed: list[dict[str, Any]] = []
        work = list(pending.values())
        for start in range(0, len(work), self.batch_size):
            part = work[start : start + self.batch_size]
            try:
                vectors = self.model.compress_texts([r["text"] for r in part]).cpu()
            except Exception as e:  # report these chunks, go on with the next batch
                self._fail(part, "compressing", e)
                continue
            memories += [
                Memory(vectors[i], self.fingerprint, r["key"], text=r["text"])
                for i, r in enumerate(part)
            ]
            computed += part
        if computed:
            try:  # one write (one transaction, one shard, one commit) per rows_per_write rows
                _write(
                    self.sink,
                    memories,
                    [r["source"] for r in computed],
                    [int(r["chunk_index"]) for r in computed],
                )
            except Exception as e:
                self._fail(computed, "writing", e)
            else:
                for r in computed:
                    r["status"] = COMPRESSED
        for r in rows:
            r["text"] = ""  # the driver needs statuses only
        return _rows(rows)

    @staticmethod
    def _fail(rows: list[dict[str, Any]], what: str, error: Exception) -> None:
        logger.warning("%s %d chunks of %s failed: %s", what, len(rows), rows[0]["source"], error)
        for r in rows:
            r["status"], r["message"] = FAILED, f"{what}: {type(error).__name__}: {error}"


def _is_model(obj: object) -> bool:
    from .model import PiscoModel

    return isinstance(obj, PiscoModel)


def _model_facts(loader: Callable[[], PiscoModel] | PiscoModel) -> dict[str, Any]:
    model = loader if _is_model(loader) else loader()
    return {
        "fingerprint": model.fingerprint,
        "tokenizer": model.tokenizer,
        "doc_max_length": model.config.doc_max_length,
        "is_oscar": model.config.is_oscar,
        "trained": model.config.trained,
        "name": model.config.name,
    }


# ---------------------------------------------------------------------------- the driver
def compress_corpus(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | Callable[[], PiscoModel] | PiscoModel = "embedded",
    format: OutputFormat = "sqlite",
    dtype: StoreDType | None = None,
    embedder: Callable[[Sequence[str]], Any] | Literal["minilm"] | None = None,
    engine: Engine = "ray",
    num_workers: int = 1,
    num_gpus_per_worker: float = 0.0,
    num_cpus_per_worker: float = 1.0,
    batch_size: int = 16,
    rows_per_write: int = 256,
    text_field: str = "text",
    fingerprint: str | None = None,
    show_progress: bool = True,
) -> CorpusResult:
    """Compress every document of ``sources`` (files or folders of ``.txt``/``.md``,
    ``.jsonl``/``.ndjson``, ``.parquet``) into ``output``.

    ``model``: what each worker loads: a checkpoint directory, hub id or ``"embedded"`` (see
    :class:`ModelLoader` for more options), or a picklable callable returning a
    :class:`PiscoModel`; ``engine="local"`` also takes a loaded model. Every worker checks that
    its model's fingerprint is the run's (``fingerprint``, by default that of a first load).
    ``format``: ``"sqlite"`` (a :class:`SQLiteMemoryStore` file), ``"parquet"`` (shards,
    :class:`ParquetShards`) or ``"lance"`` (a :class:`LanceMemoryStore`; ``embedder`` adds the
    chunks' retrieval vectors, ``"minilm"`` for all-MiniLM-L6-v2). ``dtype`` narrows stored
    vectors (``"float16"``, ``"int8"``, ...).

    ``engine="ray"`` runs on the current Ray cluster (``ray.init()`` first, or a local one is
    started): reading and chunking in tasks, compression in ``num_workers`` actors with
    ``num_gpus_per_worker`` GPUs each, ``batch_size`` chunks per forward pass and
    ``rows_per_write`` chunks per write (one transaction or one shard). Keys already in
    ``output`` are skipped, so a killed run resumes where it stopped.
    """
    if format not in get_args(OutputFormat):
        raise PiscoInputError(f"format must be one of {get_args(OutputFormat)}, got {format!r}")
    if engine not in get_args(Engine):
        raise PiscoInputError(f"engine must be one of {get_args(Engine)}, got {engine!r}")
    for name, value in (
        ("num_workers", num_workers),
        ("batch_size", batch_size),
        ("rows_per_write", rows_per_write),
    ):
        if not isinstance(value, int) or value < 1:
            raise PiscoInputError(f"{name} must be a positive integer, got {value!r}")
    if num_gpus_per_worker < 0 or num_cpus_per_worker <= 0:
        raise PiscoInputError(
            "num_gpus_per_worker must be >= 0 and num_cpus_per_worker > 0, got "
            f"{num_gpus_per_worker} and {num_cpus_per_worker}"
        )
    if isinstance(model, (str, os.PathLike)):
        model = ModelLoader(str(model))
    elif not callable(model) and not _is_model(model):
        raise PiscoInputError(
            "model must be a checkpoint path, hub id, 'embedded', a ModelLoader or a callable "
            f"returning a PiscoModel, got {type(model).__name__}"
        )
    if _is_model(model) and engine == "ray":
        raise PiscoInputError(
            "engine='ray' loads the model in each worker: pass its checkpoint path or a "
            "ModelLoader as model=, not a loaded PiscoModel (or use engine='local')"
        )
    if embedder == "minilm":
        embedder = SentenceEmbedder(device="cpu")
    files = list_corpus_files(sources)
    where = Path(output).absolute() if engine == "ray" else output  # workers open it too
    sink = open_output(where, format, dtype=dtype, embedder=embedder)
    started = time.perf_counter()
    run = _run_ray if engine == "ray" else _run_local
    facts, rows = run(
        files,
        model,
        sink,
        fingerprint=fingerprint,
        num_workers=num_workers,
        num_gpus_per_worker=num_gpus_per_worker,
        num_cpus_per_worker=num_cpus_per_worker,
        batch_size=batch_size,
        rows_per_write=rows_per_write,
        text_field=text_field,
    )
    result = CorpusResult(
        str(output),
        format,
        facts["fingerprint"],
        files=len(files),
        model_trained=bool(facts["trained"]),
    )
    bar = tqdm(desc="compressing corpus", unit="chunk", disable=not show_progress)
    for batch in rows:
        _tally(result, batch)
        if not result.startup_seconds:
            result.startup_seconds = time.perf_counter() - started
        bar.update(int(sum(1 for s in batch["status"] if s != _BAD)))
        bar.set_postfix(
            docs=result.documents,
            new=result.compressed,
            stored=result.already_stored,
            failed=result.failed,
            bad=len(result.bad_inputs),
            refresh=False,
        )
    bar.close()
    if isinstance(sink, LanceMemoryStore) and result.compressed:
        sink.optimize()
    result.seconds = time.perf_counter() - started
    result.entries = len(sink)
    result.size_on_disk = sink.size_on_disk
    if result.bad_inputs:
        logger.warning(
            "%d bad inputs skipped: %s%s",
            len(result.bad_inputs),
            "; ".join(str(b) for b in result.bad_inputs[:5]),
            " ..." if len(result.bad_inputs) > 5 else "",
        )
    return result


def _tally(result: CorpusResult, batch: dict[str, np.ndarray]) -> None:
    for row in _iter_rows(batch):
        status = row["status"]
        if status == _BAD:
            index = int(row["doc_index"])
            bad = BadInput(str(row["source"]), str(row["message"]), None if index < 0 else index)
            logger.warning("skipping %s", bad)
            result.bad_inputs.append(bad)
            continue
        if int(row["chunk_index"]) <= 0:
            result.documents += 1
        if status == FAILED:
            result.failed += 1
            result.failures.append(
                f"{row['source']} (record {row['doc_index']}, chunk {row['chunk_index']}): "
                f"{row['message']}"
            )
            continue
        result.chunks += 1
        if status == COMPRESSED:
            result.compressed += 1
        elif status == STORED:
            result.already_stored += 1


def _run_local(files, model, sink, *, fingerprint, batch_size, rows_per_write, text_field, **_):
    loaded = model if _is_model(model) else model()
    facts = _model_facts(loaded)
    _refuse_oscar(facts)
    stage = CompressStage(
        loaded, fingerprint or loaded.fingerprint, sink, batch_size, rows_per_write
    )

    def rows() -> Iterator[dict[str, np.ndarray]]:
        for path in files:
            for docs in read_stage({"path": np.array([str(path)], dtype=object)}, text_field):
                chunks = chunk_stage(
                    docs, facts["tokenizer"], facts["doc_max_length"], facts["fingerprint"]
                )
                yield from stage(chunks)

    return facts, rows()


def _refuse_oscar(facts: dict[str, Any]) -> None:
    if facts["is_oscar"]:
        raise PiscoInputError(
            "model is an OSCAR model: it compresses at query time, conditioned on the question, "
            "so a corpus cannot be compressed ahead; use a PISCO model"
        )


def _run_ray(
    files,
    model,
    sink,
    *,
    fingerprint,
    num_workers,
    num_gpus_per_worker,
    num_cpus_per_worker,
    batch_size,
    rows_per_write,
    text_field,
):
    try:
        import ray
        import ray.data
    except ImportError:
        raise ModuleNotFoundError(
            "engine='ray' needs Ray Data: pip install 'pisco-rag[ray]' (or use engine='local')"
        ) from None
    if not ray.is_initialized():
        ray.init()
    resources = {"num_cpus": num_cpus_per_worker, "num_gpus": num_gpus_per_worker}
    facts = ray.get(ray.remote(_model_facts).options(**resources).remote(model))
    if fingerprint is not None and facts["fingerprint"] != fingerprint:
        raise PiscoInputError(
            f"model has fingerprint {facts['fingerprint']}, fingerprint= expects {fingerprint}"
        )
    _refuse_oscar(facts)
    if not files:
        return facts, iter(())
    ds = ray.data.from_items(  # absolute: workers may run in another directory
        [{"path": str(p.absolute())} for p in files], override_num_blocks=min(len(files), 1000)
    )
    ds = ds.map_batches(read_stage, batch_size=1, fn_kwargs={"text_field": text_field})
    ds = ds.map_batches(
        chunk_stage,
        batch_size=None,
        fn_kwargs={
            "tokenizer": facts["tokenizer"],
            "max_tokens": facts["doc_max_length"],
            "fingerprint": facts["fingerprint"],
        },
    )
    # batch_size=None: each file is one task (CPU actors fuse reading and chunking into
    # themselves) and the stage writes rows_per_write chunks at a time; small output blocks
    # bring the status rows back (progress) while a file is still being compressed.
    ds = ds.map_batches(
        CompressStage,
        batch_size=None,
        compute=ray.data.ActorPoolStrategy(size=num_workers),
        fn_constructor_kwargs={
            "loader": model,
            "fingerprint": facts["fingerprint"],
            "sink": sink,
            "batch_size": batch_size,
            "rows_per_write": rows_per_write,
        },
        **resources,
    )
    ds.context.target_max_block_size = 64 * 1024  # status rows: a few hundred per block
    return facts, ds.iter_batches(batch_size=None, batch_format="numpy")
