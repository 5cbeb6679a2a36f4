"""Compression: documents into memories (PISCO encoder or OSCAR compressor, through the
memory store), reranking, retrieval embeddings, and memory calibration.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import embedding
from .adapters import ENCODER, RETRIEVER, add_adapters, use_adapter
from .chunking import chunk_text, count_tokens
from .compressors import INTERACTION_SCALE, token_mean_memories
from .config import LONG_DOCUMENT_POLICIES, LongDocumentPolicy
from .errors import DocumentTooLongError, PiscoInputError, RerankingUnavailableError
from .loading import _lora
from .memory import Memory, memory_key
from .prompting import check_batch_size, check_encodable, pisco_encoder_inputs

logger = logging.getLogger(__name__)


@dataclass
class RankedDocument:
    """One reranked document: its index in the input, its score, and its memories."""

    index: int
    score: float
    memories: list[Memory]


class CompressionMixin:
    """Compression, reranking and retrieval methods of :class:`~pisco_rag.model.PiscoModel`.
    Needs from the class ``model``, ``compressor``, ``tokenizer``, ``config``, ``store``,
    ``mem_token_ids``, ``_lock``, ``_memory_affine``, the properties ``n_mem``,
    ``hidden_size``, ``device``, ``fingerprint``, ``_input_embeddings``, and
    ``_added_token_ids`` and ``refresh_fingerprint``."""

    def chunk(self, text: str) -> list[str]:
        """Split ``text`` into chunks of at most ``doc_max_length`` tokens (one memory each)."""
        return chunk_text(self.tokenizer, text, self.config.doc_max_length)

    def compress(
        self,
        documents: Sequence[str],
        *,
        queries: Sequence[str] | None = None,
        batch_size: int = 16,
        show_progress: bool = False,
        long_documents: LongDocumentPolicy | None = None,
        use_store: bool = True,
    ) -> list[Memory]:
        """Compress documents into memories, reading and filling :attr:`store`.

        ``queries`` (OSCAR only): one query per document; the memories depend on it, and with
        a reranking head each memory carries its relevance ``score`` from the same pass.
        A document longer than ``doc_max_length`` tokens is handled by ``long_documents``
        (default: the config's, ``"chunk"``): ``"chunk"`` gives one memory per chunk,
        ``"truncate"`` keeps the first chunk with a warning, ``"naver"`` (PISCO) compresses the
        document's first ``doc_max_length + 1`` tokens exactly as naver's reference code cuts
        them (memories comparable with naver's published numbers), ``"error"`` raises. Each
        memory's ``source_index`` names its document, so the result can be longer than
        ``documents``.
        """
        documents = _check_documents(documents, "documents")
        queries = self._check_queries(queries, len(documents))
        batch_size = check_batch_size(batch_size)
        policy = long_documents or self.config.long_documents
        if policy not in LONG_DOCUMENT_POLICIES:
            raise PiscoInputError(
                f"long_documents must be one of {LONG_DOCUMENT_POLICIES}, got {policy!r}"
            )
        naver = policy == "naver"
        if naver and self.compressor is not None:
            raise PiscoInputError(
                "long_documents='naver' reproduces naver's PISCO encoder input; OSCAR "
                "compressors take 'chunk', 'truncate' or 'error'"
            )
        pieces: list[tuple[int, int, str]] = []  # (document index, chunk index, text)
        for i, doc in enumerate(documents):
            chunks = [doc] if naver else self.chunk(doc)
            if len(chunks) > 1 and policy == "error":
                raise DocumentTooLongError(
                    f"documents[{i}] has {count_tokens(self.tokenizer, doc)} tokens, more than "
                    f"doc_max_length={self.config.doc_max_length}; split it, or pass "
                    "long_documents='chunk'"
                )
            if len(chunks) > 1 and policy == "truncate":
                warnings.warn(
                    f"documents[{i}] is longer than {self.config.doc_max_length} tokens; "
                    f"keeping its first chunk only ({len(chunks) - 1} chunks dropped)",
                    stacklevel=2,
                )
                chunks = chunks[:1]
            pieces.extend((i, j, c) for j, c in enumerate(chunks))

        fp = self.fingerprint
        query_of = (lambda i: queries[i]) if queries is not None else (lambda i: None)
        variant = "naver-truncation" if naver else ""
        keys = [memory_key(fp, text, query_of(i), variant) for i, _, text in pieces]
        stored = self._lookup(keys) if use_store else [None] * len(keys)
        todo = [n for n, m in enumerate(stored) if m is None]
        bar = tqdm(total=len(todo), desc="compressing", unit="chunk", disable=not show_progress)
        fresh: list[Memory] = []
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            texts = [pieces[n][2] for n in batch]
            batch_queries = [query_of(pieces[n][0]) for n in batch] if queries else None
            vectors, scores = self._compress_batch(texts, batch_queries, naver_truncation=naver)
            for row, n in enumerate(batch):
                score = float(scores[row]) if scores is not None else None
                memory = Memory(
                    vectors[row].clone(),  # its own storage, not a view of the whole batch
                    fp,
                    keys[n],
                    text=texts[row],
                    query=query_of(pieces[n][0]),
                    score=score,
                )
                fresh.append(memory)
                stored[n] = memory
            bar.update(len(batch))
        bar.close()
        if use_store and fresh:
            self.store.put_many(fresh)
        return [m.with_source(i, j) for m, (i, j, _) in zip(stored, pieces)]

    def rerank(
        self,
        query: str,
        documents: Sequence[str],
        *,
        top_n: int | None = None,
        batch_size: int = 16,
        show_progress: bool = False,
    ) -> list[RankedDocument]:
        """Score documents for ``query`` with the reranking head, best first, with their
        query-dependent memories from the same forward pass. A chunked document scores as its
        best chunk. Needs an OSCAR model with a reranking head."""
        if self.compressor is None or self.compressor.head is None:
            raise RerankingUnavailableError(
                f"{self.config.name or 'this model'} has no reranking head (compressor="
                f"{self.config.compressor!r}); it can still compress. Train one (an OSCAR "
                "compressor with rerank_head=True) or load a checkpoint that has one."
            )
        if not isinstance(query, str) or not query.strip():
            raise PiscoInputError(f"query must be a non-empty string, got {query!r}")
        documents = _check_documents(documents, "documents")
        memories = self.compress(
            documents,
            queries=[query] * len(documents),
            batch_size=batch_size,
            show_progress=show_progress,
        )
        grouped: dict[int, list[Memory]] = {}
        for m in memories:
            grouped.setdefault(m.source_index, []).append(m)
        ranked = [RankedDocument(i, max(m.score for m in ms), ms) for i, ms in grouped.items()]
        ranked.sort(key=lambda r: r.score, reverse=True)
        return ranked[:top_n] if top_n is not None else ranked

    def _check_queries(self, queries: object, n: int) -> list[str] | None:
        if queries is None:
            return None
        if not self.config.is_oscar:
            raise PiscoInputError(
                "queries= needs an OSCAR (query-dependent) compressor; this PISCO model "
                "compresses documents independently of the query: drop queries="
            )
        if isinstance(queries, str) or not isinstance(queries, Sequence):
            raise PiscoInputError("queries must be a list of strings, one per document")
        if len(queries) != n:
            raise PiscoInputError(
                f"queries has {len(queries)} entries and documents {n}: give one query per document"
            )
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise PiscoInputError(f"queries[{i}] must be a non-empty string, got {q!r}")
        return list(queries)

    def _lookup(self, keys: list[str]) -> list[Memory | None]:
        from .errors import CorruptMemoryError

        try:
            return self.store.get_many(keys)
        except CorruptMemoryError as e:  # recompute rather than fail; the entry is overwritten
            logger.warning("%s; recomputing the affected memories", e)
            found: list[Memory | None] = []
            for key in keys:
                try:
                    found.append(self.store.get(key))
                except CorruptMemoryError:
                    found.append(None)
            return found

    # ------------------------------------------------------------------ retrieval
    def embed_queries(
        self, queries: Sequence[str], *, batch_size: int = 32, show_progress: bool = False
    ) -> torch.Tensor:
        """Unit vectors ``[n, hidden]`` of questions (with ``config.retriever_query_prefix``),
        from the retriever adapter, or the plain backbone if the model has none; the cosine
        similarity with :meth:`embed_documents` vectors ranks passages."""
        return embedding.embed(
            self, queries, query=True, batch_size=batch_size, show_progress=show_progress
        )

    def embed_documents(
        self, documents: Sequence[str], *, batch_size: int = 32, show_progress: bool = False
    ) -> torch.Tensor:
        """Unit vectors ``[n, hidden]`` of passages (see :meth:`embed_queries`)."""
        return embedding.embed(
            self, documents, query=False, batch_size=batch_size, show_progress=show_progress
        )

    def add_retriever(self) -> None:
        """Give the model a retriever adapter (identity at first: the backbone's own
        embeddings) to train with ``pisco-rag train --stage retriever``. Memories and answers
        are unchanged, and so is the fingerprint."""
        if self.config.retriever:
            return
        with self._lock:
            training = self.model.training
            add_adapters(self.model, _lora(self.config), (RETRIEVER,), {})
            self.model.to(self.device).train(training)  # new LoRA dropout starts in train mode
            self.config.retriever = True

    def add_rerank_interaction(self) -> None:
        """Add the late-interaction term to an OSCAR model's reranking scores (the head's score
        plus a learned scale, initially ``INTERACTION_SCALE``, times how well the query's tokens
        find matching document tokens in the same compression pass). Memories are unchanged;
        scores, and so the fingerprint, change."""
        compressor = self.compressor
        if compressor is None or compressor.head is None or compressor.kind != "first-layers":
            raise PiscoInputError(
                "the interaction term needs an OSCAR model with a first-layers compressor and a "
                "reranking head (e.g. embedded-oscar)"
            )
        if compressor.interaction:
            return
        with self._lock:
            param = next(compressor.head.parameters())
            scale = torch.tensor(INTERACTION_SCALE, device=param.device, dtype=param.dtype)
            compressor.interaction_scale = torch.nn.Parameter(scale)
            self.config.rerank_interaction = True
            self.refresh_fingerprint()

    def compress_texts(
        self, texts: Sequence[str], queries: Sequence[str] | None = None
    ) -> torch.Tensor:
        """Memory vectors ``[len(texts), n_mem, hidden]`` for chunks that already fit
        (no store, no chunking)."""
        return self._compress_batch(texts, queries)[0]

    @torch.no_grad()
    def _compress_batch(
        self, texts: Sequence[str], queries: Sequence[str] | None, naver_truncation: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(memories, rerank scores or None) in one forward pass of the compressor (none for
        token-mean memories; an OSCAR model with them runs its compressor for the scores)."""
        scores = None
        if self.compressor is not None:
            with_query = self.compressor.interaction and queries is not None
            inputs = self.compressor.encode_inputs(texts, queries, query_mask=with_query)
            with self._lock:
                memories, scores = self.compressor(*(t.to(self.device) for t in inputs))
            scores = None if scores is None else scores.detach().float().cpu()
            if not self.config.token_mean_memories:
                return self.standardise_memories(memories).detach(), scores
        input_ids, mask = pisco_encoder_inputs(
            self.tokenizer,
            texts,
            self.mem_token_ids,
            self.config.doc_max_length + 3,  # fixed width: a memory never depends on its batch
            naver_truncation=naver_truncation,
        )
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        if self.config.token_mean_memories:
            return self._token_mean_memories(input_ids, mask), scores
        with self._lock:
            use_adapter(self.model, ENCODER)
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask)[0]
        return self.standardise_memories(hidden[:, -self.n_mem :, :]).detach(), None

    def _token_mean_memories(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The ``token-mean`` compressor's memories of PISCO encoder inputs (standardised)."""
        memories = token_mean_memories(
            self._input_embeddings.weight.detach(),
            input_ids,
            mask,
            self.n_mem,
            set(self.tokenizer.all_special_ids),
        )
        return self.standardise_memories(memories)

    def standardise_memories(self, memories: torch.Tensor) -> torch.Tensor:
        """The compressor's raw output as the decoder reads it: ``(m - memory_shift) *
        memory_gain`` when the model was calibrated (:meth:`calibrate_memories`), else as is."""
        if self.config.memory_shift is None:
            return memories
        cached = self._memory_affine
        if cached is None or cached[0].device != memories.device:
            shift = torch.tensor(self.config.memory_shift, device=memories.device)
            gain = torch.tensor(self.config.memory_gain, device=memories.device)
            cached = self._memory_affine = (shift, gain)
        shift, gain = cached
        return ((memories.float() - shift) * gain).to(memories.dtype)

    @torch.no_grad()
    def calibrate_memories(self, texts: Sequence[str], queries: Sequence[str] | None = None):
        """Standardise memories per hidden dimension, measured on ``texts`` (chunks, ideally a
        few dozen of the training data): subtract the mean memory and divide by the standard
        deviation, scaled so that a memory vector has the norm of the decoder's token
        embeddings. Untrained compressors put almost all of a memory's norm in a direction
        shared by every chunk, tens of times the embeddings' norm; standardised, what differs
        between chunks is what the decoder sees. Changes the fingerprint (new memories)."""
        texts = _check_documents(texts, "texts")
        if queries is not None and len(queries) != len(texts):
            raise PiscoInputError(f"queries: one per text ({len(texts)}), got {len(queries)}")
        chunks, chunk_queries = [], []
        for i, text in enumerate(texts):
            for chunk in self.chunk(text):
                chunks.append(chunk)
                chunk_queries.append(queries[i] if queries is not None else None)
        if len(chunks) < 2:
            raise PiscoInputError("calibrate_memories needs at least 2 chunks of text")
        self.config.memory_shift = self.config.memory_gain = None
        self._memory_affine = None
        raw = []
        for start in range(0, len(chunks), 16):
            batch_queries = chunk_queries[start : start + 16] if queries is not None else None
            raw.append(self._compress_batch(chunks[start : start + 16], batch_queries)[0])
        raw = torch.cat(raw).float().reshape(-1, self.hidden_size)
        mean, std = raw.mean(0), raw.std(0).clamp(min=1e-6)
        table = self._input_embeddings.weight.float()
        target = table[: min(table.shape[0], min(self._added_token_ids()))].norm(dim=-1).mean()
        gain = target / ((raw - mean) / std).norm(dim=-1).mean() / std
        self.config.memory_shift = mean.cpu().tolist()
        self.config.memory_gain = gain.cpu().tolist()
        self.refresh_fingerprint()


def _check_documents(documents: object, name: str) -> list[str]:
    if isinstance(documents, str):
        raise PiscoInputError(f"{name} must be a list of strings; wrap one document in a list")
    try:
        docs = list(documents)  # type: ignore[arg-type]
    except TypeError:
        raise PiscoInputError(f"{name} must be a list of strings") from None
    if isinstance(documents, Mapping):
        raise PiscoInputError(f"{name} must be a list of strings, got a {type(documents).__name__}")
    for i, d in enumerate(docs):
        if not isinstance(d, str):
            raise PiscoInputError(f"{name}[{i}] must be a str, got {type(d).__name__}")
        if not d.strip():
            raise PiscoInputError(
                f"{name}[{i}] is empty; remove empty documents before compressing"
            )
        check_encodable(d, f"{name}[{i}]")
    return docs
