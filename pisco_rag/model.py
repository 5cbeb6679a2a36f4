"""PiscoModel: compress documents into memories and generate answers from them.

One set of backbone weights carries two LoRA adapters: ``encoder_adapter`` turns a chunk of text
into ``n_mem`` memory vectors (the last hidden states at the ``<MEMi>`` positions), and
``decoder_adapter`` reads memories spliced into its input embeddings. Every model call switches
adapters under one lock, so threads and event loops can share a model.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import hashlib
import json
import logging
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
    TextIteratorStreamer,
)

from . import checkpoints, embedding
from .adapters import (
    DECODER,
    ENCODER,
    RETRIEVER,
    adapter_state_dict,
    add_adapters,
    lora_config,
    use_adapter,
)
from .chunking import chunk_text, count_tokens
from .compressors import (
    QueryCompressor,
    build_compressor,
    compact_compressor_state,
    move_keeping_float32_buffers,
    naver_compressor_weights,
    split_compact_compressor_state,
    strip_adapter_prefix,
)
from .config import LONG_DOCUMENT_POLICIES, LongDocumentPolicy, PiscoConfig
from .defaults import SHIPPED_MODELS, load_embedded
from .errors import (
    CheckpointError,
    DocumentTooLongError,
    MemoryMismatchError,
    PiscoInputError,
    RerankingUnavailableError,
)
from .memory import Memory, memory_key
from .prompting import (
    ChatTurn,
    PromptRenderer,
    RenderedPrompt,
    Segment,
    check_batch_size,
    check_encodable,
    check_segment,
    left_pad,
    pisco_encoder_inputs,
    split_tags,
    text_ids,
)
from .stores import LRUMemoryStore, MemoryStore
from .verbosity import quiet_loading

if TYPE_CHECKING:
    from .llamacpp_decoder import LlamaCppDecoder

logger = logging.getLogger(__name__)

Messages = str | Sequence[dict[str, Any]]


@dataclass
class RankedDocument:
    """One reranked document: its index in the input, its score, and its memories."""

    index: int
    score: float
    memories: list[Memory]


@dataclass
class Completion:
    """One generated answer with its token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class PiscoModel:
    """A compressor + decoder on one backbone: PISCO (the backbone with ``encoder_adapter``
    compresses) or OSCAR (a small query-dependent compressor, optionally with a reranking
    head). Build it with :meth:`from_pretrained` (native or naver checkpoints, or
    ``"embedded"``) or :meth:`from_backbone` (new, untrained)."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        config: PiscoConfig,
        *,
        compressor: QueryCompressor | None = None,
        store: MemoryStore | None = None,
    ) -> None:
        """Wrap a backbone that already has the special tokens and adapters (and the OSCAR
        compressor, if any); use the class methods rather than calling this directly."""
        self.model = model
        self.compressor = compressor
        self.tokenizer = tokenizer
        self.config = config
        self.store: MemoryStore = store if store is not None else LRUMemoryStore()
        self._lock = threading.RLock()
        self._fingerprint: str | None = None
        self.mem_token_ids = tokenizer.convert_tokens_to_ids(config.special_tokens[: self.n_mem])
        self.renderer = PromptRenderer(tokenizer, self.n_mem)
        self.extra_embedding_rows: list[int] = []  # base-vocab rows a checkpoint changed
        self._llamacpp: LlamaCppDecoder | None = None  # set_decoding_backend("llama.cpp")
        self._memory_affine: tuple[torch.Tensor, torch.Tensor] | None = None  # (shift, gain)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_backbone(
        cls,
        backbone: str | PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        *,
        compression_rate: int = 16,
        doc_max_length: int = 128,
        lora_r: int = 16,
        lora_alpha: int | None = None,
        lora_dropout: float = 0.1,
        long_documents: LongDocumentPolicy = "chunk",
        compressor: str = "pisco",
        rerank_head: bool = False,
        connector_hidden: int | None = None,
        retriever: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        store: MemoryStore | None = None,
        local_files_only: bool = False,
    ) -> PiscoModel:
        """A new, untrained model on any transformers causal LM (name, path or instance).

        ``compressor``: ``"pisco"`` (the backbone with an encoder adapter), ``"first-layers:N"``
        (OSCAR: a copy of the backbone's first N layers) or the name/path of a separate small
        causal LM (OSCAR, with a Linear-ReLU-Linear connector of width ``connector_hidden``,
        default 4x the decoder's hidden size). ``rerank_head`` adds the reranking token and
        head (OSCAR only). ``retriever`` adds the retriever adapter (:meth:`embed_queries`).
        The LoRA ``B`` matrices start at zero, so the decoder first behaves like the backbone;
        other new weights are drawn with ``seed``.
        """
        if isinstance(backbone, PreTrainedModel):
            if tokenizer is None:
                raise PiscoInputError("tokenizer is required when backbone is a model instance")
            name = str(getattr(backbone.config, "_name_or_path", "") or "custom")
            model = backbone
        else:
            name = str(backbone)
            model, tokenizer = checkpoints.load_backbone(
                name, dtype=dtype, local_files_only=local_files_only
            )
        config = PiscoConfig(
            backbone=name,
            compression_rate=compression_rate,
            doc_max_length=doc_max_length,
            lora_r=lora_r,
            lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_r,
            lora_dropout=lora_dropout,
            long_documents=long_documents,
            rerank_head=rerank_head,
            retriever=retriever,
            **_compressor_fields(compressor, connector_hidden, int(model.config.hidden_size)),
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            query_compressor = (
                build_compressor(config, model, tokenizer, local_files_only=local_files_only)
                if config.is_oscar
                else None
            )
            _prepare_backbone(model, tokenizer, config)
            _add_adapters(model, config, {})
        return cls._finish(model, tokenizer, config, query_compressor, device, dtype, store)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path = "embedded",
        *,
        backbone: str | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        store: MemoryStore | None = None,
        local_files_only: bool = False,
    ) -> PiscoModel:
        """Load a native pisco-rag checkpoint, a naver COCOM checkpoint (PISCO or OSCAR), or
        a shipped default (``"embedded"``: PISCO, ``"embedded-oscar"``: OSCAR with a reranking
        head), from a local directory or a hub id.

        ``backbone`` overrides the base model the checkpoint names (e.g. a local copy of
        ``mistralai/Mistral-7B-Instruct-v0.2`` on a machine without network).
        """
        if str(name_or_path) in SHIPPED_MODELS:
            return load_embedded(str(name_or_path), device=device, dtype=dtype, store=store)
        directory = checkpoints.resolve_checkpoint(name_or_path, local_files_only=local_files_only)
        kind = checkpoints.checkpoint_kind(directory)
        lora_weights = compressor_weights = token_rows = None
        if kind == "naver":
            raw, first_last, adapters = checkpoints.read_naver(directory)
            config = PiscoConfig.from_naver(raw, name=str(name_or_path))
            if config.is_oscar:
                full, mlp, first_layer, lora_weights = checkpoints.read_naver_compressor(
                    directory,
                    lora=config.compressor_lora_r is not None,
                    mlp=config.connector_hidden is not None,
                )
                compressor_weights = naver_compressor_weights(full, mlp, first_layer)
                if lora_weights is not None:
                    lora_weights = strip_adapter_prefix(lora_weights)
        else:
            raw, adapters, embeddings = checkpoints.read_native(directory)
            try:
                config = PiscoConfig.from_dict(raw)
            except CheckpointError as e:
                raise CheckpointError(f"{directory}/{e}") from None
            compressor_weights = checkpoints.read_native_compressor(directory, config.is_oscar)
            if compressor_weights is not None:
                compressor_weights, lora_weights, token_rows = split_compact_compressor_state(
                    compressor_weights
                )
        if backbone is not None:
            if config.compressor_model == config.backbone:
                config.compressor_model = backbone
            config.backbone = backbone
        model, tokenizer = checkpoints.load_backbone(
            config.backbone, dtype=dtype, local_files_only=local_files_only
        )
        base_vocab = len(tokenizer)
        query_compressor = None
        if config.is_oscar:
            try:
                query_compressor = build_compressor(
                    config,
                    model,
                    tokenizer,
                    weights=compressor_weights,
                    lora_weights=lora_weights,
                    token_rows=token_rows,
                    local_files_only=local_files_only,
                )
            except ValueError as e:
                raise CheckpointError(f"{directory}: {e}") from None
        _prepare_backbone(model, tokenizer, config)
        if kind == "naver":
            extra_rows = _load_naver_rows(model, first_last, base_vocab, directory)
        else:
            saved = _load_native_rows(model, embeddings, directory)
            extra_rows = [i for i in saved if i < base_vocab]
        _add_adapters(model, config, adapters)
        self = cls._finish(model, tokenizer, config, query_compressor, device, dtype, store)
        self.extra_embedding_rows = extra_rows
        return self

    @classmethod
    def _finish(cls, model, tokenizer, config, compressor, device, dtype, store) -> PiscoModel:
        device = torch.device(device) if device is not None else default_device()
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        for module in (model, compressor):
            if module is not None:
                move_keeping_float32_buffers(module, device, dtype)
                module.eval()
        return cls(model, tokenizer, config, compressor=compressor, store=store)

    def save_pretrained(self, path: str | Path, dtype: torch.dtype | None = None) -> None:
        """Save in the native format: config.json and safetensors, base weights by reference
        (a LoRA-tuned first-layers compressor too). ``dtype`` (e.g. ``torch.float16``) casts
        the stored floating-point weights, to ship small files."""
        with self._lock:  # the embedding rows that training changed are saved below
            adapters = {
                name: adapter_state_dict(self.model, name) for name in _adapter_names(self.config)
            }
        config = self.config.to_dict()
        compressor = None
        if self.compressor is not None:
            compressor, lora_r = compact_compressor_state(self.compressor)
            if lora_r is not None:
                config["compressor_lora_r"] = lora_r
        checkpoints.save_native(
            Path(path), config, adapters, self._changed_embedding_rows(), compressor, dtype=dtype
        )

    def _changed_embedding_rows(self) -> dict[str, torch.Tensor]:
        ids = sorted(set(self.extra_embedding_rows) | set(self._added_token_ids()))
        index = torch.tensor(ids, dtype=torch.long)
        rows = {"row_ids": index, "input_rows": self._input_embeddings.weight[index].float()}
        if not self._tied:
            rows["output_rows"] = self.model.get_output_embeddings().weight[index].float()
        return rows

    def with_store(self, store: MemoryStore) -> PiscoModel:
        """The same model (weights, compressor, lock) reading and writing another store."""
        clone = copy.copy(self)
        for name, value in list(vars(clone).items()):  # methods bound to self (e.g. patched
            if getattr(value, "__self__", None) is self:  # in tests) would keep the old store
                delattr(clone, name)
        clone.store = store
        return clone

    # ------------------------------------------------------------------ properties
    @property
    def n_mem(self) -> int:
        return self.config.n_mem_tokens

    @property
    def device(self) -> torch.device:
        return self._input_embeddings.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self._input_embeddings.weight.dtype

    @property
    def hidden_size(self) -> int:
        return int(self._input_embeddings.weight.shape[1])

    @property
    def _input_embeddings(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def _tied(self) -> bool:
        out = self.model.get_output_embeddings()
        return out is None or out.weight.data_ptr() == self._input_embeddings.weight.data_ptr()

    def _added_token_ids(self) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(self.config.special_tokens)

    @property
    def fingerprint(self) -> str:
        """Short hash of everything that changes memories: backbone identity, configuration,
        adapter weights, added embedding rows, a sample of the base weights, dtype class."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def refresh_fingerprint(self) -> str:
        """Recompute the fingerprint after the weights changed (e.g. after training)."""
        self._fingerprint = None
        return self.fingerprint

    def _compute_fingerprint(self) -> str:
        h = hashlib.sha256()
        cfg = self.config.to_dict()
        for volatile in ("name", "trained", "extra", "long_documents"):
            cfg.pop(volatile, None)
        for key in [k for k in cfg if k.startswith("retriever")]:
            cfg.pop(key)  # retrieval never changes memories or answers
        h.update(json.dumps(cfg, sort_keys=True).encode())
        h.update(b"half" if self.dtype in (torch.float16, torch.bfloat16) else b"full")
        with torch.no_grad():
            params = list(self.model.named_parameters())
            if self.compressor is not None:
                params += [(f"compressor.{n}", p) for n, p in self.compressor.named_parameters()]
            for name, p in sorted(params, key=lambda kv: kv[0]):
                if f".{RETRIEVER}." in name:
                    continue
                h.update(f"{name}{tuple(p.shape)}".encode())
                flat = p.detach().reshape(-1)
                if "lora_" not in name:  # base weights: a strided sample identifies them
                    flat = flat[:: max(1, flat.numel() // 4096)]
                h.update(flat.float().cpu().numpy().tobytes())
            rows = self._input_embeddings.weight[self._added_token_ids()]
            h.update(rows.float().cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def info(self) -> dict[str, Any]:
        return {
            "name": self.config.name,
            "backbone": self.config.backbone,
            "compressor": self.config.compressor
            + (f":{self.config.compressor_layers}" if self.config.compressor_layers else ""),
            "rerank_head": self.config.rerank_head,
            "trained": self.config.trained,
            "fingerprint": self.fingerprint,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "doc_max_length": self.config.doc_max_length,
            "compression_rate": self.config.compression_rate,
            "memory_shape": [self.n_mem, self.hidden_size],
            "store": type(self.store).__name__,
        }

    # ------------------------------------------------------------------ compression
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
        """(memories, rerank scores or None) in one forward pass of the compressor."""
        if self.compressor is not None:
            ids, mask = self.compressor.encode_inputs(texts, queries)
            with self._lock:
                memories, scores = self.compressor(ids.to(self.device), mask.to(self.device))
            memories = self.standardise_memories(memories).detach()
            return memories, None if scores is None else scores.detach().float().cpu()
        input_ids, mask = pisco_encoder_inputs(
            self.tokenizer,
            texts,
            self.mem_token_ids,
            self.config.doc_max_length + 3,  # fixed width: a memory never depends on its batch
            naver_truncation=naver_truncation,
        )
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with self._lock:
            use_adapter(self.model, ENCODER)
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask)[0]
        return self.standardise_memories(hidden[:, -self.n_mem :, :]).detach(), None

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

    # ------------------------------------------------------------------ generation
    def generate(
        self,
        questions: Sequence[str],
        contexts: Sequence[Sequence[Memory | str]],
        *,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        show_progress: bool = False,
        **generation_kwargs: Any,
    ) -> list[str]:
        """Answer each question from its contexts: ``contexts[i]`` mixes :class:`Memory` objects
        and plain text passages, any number (0 included). Greedy unless generation arguments
        (``do_sample``, ``temperature``...) say otherwise; batched with left padding."""
        prompts = self._pisco_prompts(questions, contexts)
        out: list[str] = []
        for start in tqdm(
            range(0, len(prompts), check_batch_size(batch_size)),
            desc="generating",
            disable=not show_progress,
        ):
            batch = prompts[start : start + batch_size]
            out += [c.text for c in self._generate(batch, max_new_tokens, None, generation_kwargs)]
        return out

    def stream(
        self,
        question: str,
        context: Sequence[Memory | str],
        *,
        max_new_tokens: int = 64,
        **generation_kwargs: Any,
    ) -> TextStream:
        """Like :meth:`generate` for one question, yielding text pieces as they are decoded."""
        (prompt,) = self._pisco_prompts([question], [context])
        return self._stream(prompt, max_new_tokens, None, generation_kwargs, "decoder")

    def generate_from_text(
        self,
        questions: Sequence[str],
        documents: Sequence[Sequence[str]],
        *,
        adapter: Literal["decoder", "none"] = "decoder",
        max_new_tokens: int = 64,
        batch_size: int = 8,
        **generation_kwargs: Any,
    ) -> list[str]:
        """The uncompressed baseline on the same weights: the same PISCO prompt with the
        documents as text. ``adapter="decoder"`` (default) reads with ``decoder_adapter``
        active, as the papers' text-RAG baseline on a PISCO model; ``adapter="none"`` reads
        with the plain backbone (adapters disabled)."""
        for i, docs in enumerate(documents):
            for j, d in enumerate(docs):
                if not isinstance(d, str):
                    raise PiscoInputError(
                        f"documents[{i}][{j}] must be a str, got {type(d).__name__}"
                    )
        prompts = self._pisco_prompts(questions, documents)
        out: list[str] = []
        for start in range(0, len(prompts), check_batch_size(batch_size)):
            batch = prompts[start : start + batch_size]
            result = self._generate(batch, max_new_tokens, None, generation_kwargs, adapter=adapter)
            out += [c.text for c in result]
        return out

    @torch.no_grad()
    def answer_nll(
        self,
        questions: Sequence[str],
        contexts: Sequence[Sequence[Memory | str]],
        answers: Sequence[str],
        *,
        adapter: Literal["decoder", "none"] = "decoder",
        batch_size: int = 8,
    ) -> list[float]:
        """Mean negative log-likelihood per token of each ``answers[i]`` (then eos) after the
        PISCO prompt of ``questions[i]`` with ``contexts[i]`` (memories and/or text, or none):
        the diagnostic that shows whether memories carry the answer before Match moves."""
        if len(answers) != len(questions):
            raise PiscoInputError(
                f"answers has {len(answers)} entries for {len(questions)} questions"
            )
        prompts = self._pisco_prompts(questions, contexts)
        eos = self.tokenizer.eos_token_id
        out: list[float] = []
        for start in range(0, len(prompts), check_batch_size(batch_size)):
            batch, n_answer = [], []
            for p, a in zip(
                prompts[start : start + batch_size], answers[start : start + batch_size]
            ):
                answer = [*text_ids(self.tokenizer, a), eos]
                batch.append(RenderedPrompt([*p.input_ids, *answer], p.memories))
                n_answer.append(len(answer))
            keep = max(n_answer) + 1
            with self._lock:
                self._activate_decoder(adapter)
                try:
                    embeds, mask = self._embed(batch)
                    logits = tail_logits(self.model, embeds, mask, keep).float()
                finally:
                    if adapter == "none":
                        use_adapter(self.model, DECODER)
            for row, (p, n) in enumerate(zip(batch, n_answer)):
                targets = torch.tensor(p.input_ids[-n:], device=logits.device)
                row_logits = logits[row, -n - 1 : -1]
                out.append(float(torch.nn.functional.cross_entropy(row_logits, targets)))
        return out

    def tag(self, memory: Memory) -> str:
        """The tag that stands for ``memory`` in a text prompt (stores it in :attr:`store`)."""
        if not isinstance(memory, Memory):
            raise PiscoInputError(
                f"tag() takes a Memory (from compress()), got {type(memory).__name__}"
            )
        self._check_memory(memory, "memory")
        return self.store.tag(memory)

    def tags(self, memories: Sequence[Memory]) -> list[str]:
        return [self.tag(m) for m in memories]

    def render_prompt(
        self, prompt: Messages, *, add_generation_prompt: bool = True
    ) -> RenderedPrompt:
        """Resolve the memory tags of a prompt string or chat messages (``[{"role", "content"}]``)
        and tokenise it with the backbone's chat template. Whitespace between two adjacent
        tags is dropped, so consecutive memories form contiguous slots as in PISCO's prompt."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, Sequence) or not prompt:
            raise PiscoInputError(
                "a prompt must be a str or a non-empty list of chat messages "
                f"({{'role', 'content'}} dicts), got {prompt!r:.80}"
            )
        turns = []
        for i, msg in enumerate(prompt):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise PiscoInputError(
                    f"prompt[{i}] must be a dict with a 'role' and a str 'content'"
                )
            check_encodable(msg["content"], f"prompt[{i}]['content']")
            content = _join_adjacent_memories(split_tags(msg["content"], self.store.resolve))
            for seg in content:
                if isinstance(seg, Memory):
                    self._check_memory(seg, f"a memory tag in prompt[{i}]")
            turns.append(ChatTurn(msg.get("role", "user"), content))
        return self.renderer.render(turns, add_generation_prompt=add_generation_prompt)

    def complete(
        self,
        prompts: Sequence[Messages],
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] | None = None,
        adapter: Literal["decoder", "none"] = "decoder",
        **generation_kwargs: Any,
    ) -> list[Completion]:
        """Prompt-level generation for framework adapters: each prompt is a string or chat
        messages whose memory tags are resolved from :attr:`store`. A prompt without tags is
        plain text generation; ``adapter="none"`` reads it with the plain backbone."""
        if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
            raise PiscoInputError(
                "prompts must be a list of prompts (each a str or chat messages); wrap one "
                f"prompt in a list: complete([prompt]), got {type(prompts).__name__}"
            )
        rendered = [self.render_prompt(p) for p in prompts]
        if adapter == "none" and any(r.memories for r in rendered):
            raise PiscoInputError("adapter='none' reads text only; the prompt holds memory tags")
        return self._generate(rendered, max_new_tokens, stop, generation_kwargs, adapter=adapter)

    def stream_complete(
        self,
        prompt: Messages,
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] | None = None,
        adapter: Literal["decoder", "none"] = "decoder",
        **generation_kwargs: Any,
    ) -> TextStream:
        """Like :meth:`complete` for one prompt, yielding text pieces; the stream's
        ``completion`` has the token counts once it is exhausted."""
        rendered = self.render_prompt(prompt)
        if adapter == "none" and rendered.memories:
            raise PiscoInputError("adapter='none' reads text only; the prompt holds memory tags")
        return self._stream(rendered, max_new_tokens, stop, generation_kwargs, adapter)

    # ------------------------------------------------------------------ internals
    def _pisco_prompts(
        self, questions: Sequence[str], contexts: Sequence[Sequence[Memory | str]]
    ) -> list[RenderedPrompt]:
        if isinstance(questions, str):
            raise PiscoInputError(
                "questions must be a list of strings; wrap one question in a list"
            )
        if contexts is None or isinstance(contexts, str) or len(contexts) != len(questions):
            raise PiscoInputError(
                f"contexts must be a list with one sequence of memories/passages per question "
                f"({len(questions)} questions, got "
                f"{'none' if contexts is None else len(contexts)}); use [] for a question "
                "without context"
            )
        prompts = []
        for i, (q, ctx) in enumerate(zip(questions, contexts)):
            if not isinstance(q, str) or not q.strip():
                raise PiscoInputError(f"questions[{i}] must be a non-empty string, got {q!r}")
            check_encodable(q, f"questions[{i}]")
            if isinstance(ctx, (str, Memory)):
                raise PiscoInputError(f"contexts[{i}] must be a list of memories/passages")
            segs = [check_segment(c, f"contexts[{i}][{j}]") for j, c in enumerate(ctx)]
            for j, s in enumerate(segs):
                if isinstance(s, Memory):
                    self._check_memory(s, f"contexts[{i}][{j}]")
            turns = self.renderer.pisco_turns(q, segs, self.config.system_prompt)
            prompts.append(self.renderer.render(turns))
        return prompts

    def _check_memory(self, memory: Memory, where: str) -> None:
        if memory.fingerprint != self.fingerprint:
            raise MemoryMismatchError(
                f"{where} was made by another model (fingerprint {memory.fingerprint}, this "
                f"model is {self.fingerprint}); compress the text again with this model"
            )
        if tuple(memory.vectors.shape) != (self.n_mem, self.hidden_size):
            raise MemoryMismatchError(
                f"{where} has shape {tuple(memory.vectors.shape)}, this model reads "
                f"{(self.n_mem, self.hidden_size)}"
            )

    def _embed(self, prompts: Sequence[RenderedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input embeddings with all memories spliced in by one masked write."""
        ids, mask = left_pad([p.input_ids for p in prompts], self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self._input_embeddings(ids)
        memories = [m.vectors for p in prompts for m in p.memories]
        if memories:
            slots = torch.isin(ids, torch.tensor(self.mem_token_ids, device=self.device))
            slots &= mask.bool()
            vectors = torch.cat(memories).to(self.device, self.dtype)
            if int(slots.sum()) != vectors.shape[0]:
                raise PiscoInputError(
                    "the prompt's memory slots do not match its memories; a text passage may "
                    "contain memory-token strings"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), vectors)
        return embeds, mask

    def _generation_args(
        self, max_new_tokens: int, stop: Sequence[str] | None, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise PiscoInputError(
                f"max_new_tokens must be an int, got {type(max_new_tokens).__name__} "
                f"{max_new_tokens!r}"
            )
        if max_new_tokens < 1:
            raise PiscoInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        args: dict[str, Any] = {"do_sample": False, "max_new_tokens": max_new_tokens}
        args["pad_token_id"] = self.tokenizer.pad_token_id
        args.update(kwargs)
        if args.get("temperature") == 0:
            args.pop("temperature")
            args["do_sample"] = False
        if not args["do_sample"]:
            for k in ("temperature", "top_p", "top_k"):
                args.pop(k, None)
        if stop:
            args["stop_strings"] = list(stop)
            args["tokenizer"] = self.tokenizer
        return args

    @torch.no_grad()
    def _generate(
        self,
        prompts: Sequence[RenderedPrompt],
        max_new_tokens: int,
        stop: Sequence[str] | None,
        kwargs: dict[str, Any],
        adapter: Literal["decoder", "none"] = "decoder",
    ) -> list[Completion]:
        if not prompts:
            return []
        args = self._generation_args(max_new_tokens, stop, kwargs)
        self._check_prompt_lengths(prompts, max_new_tokens)
        if self._llamacpp is not None and adapter == "decoder":
            with self._lock:
                rows = [list(self._llamacpp_ids(p, args)) for p in prompts]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id
            out = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            return self._completions(prompts, out, max_new_tokens, stop)
        with self._lock:
            self._activate_decoder(adapter)
            try:
                embeds, mask = self._embed(prompts)
                out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **args)
            finally:
                if adapter == "none":
                    use_adapter(self.model, DECODER)
        return self._completions(prompts, out, max_new_tokens, stop)

    # ------------------------------------------------------------------ llama.cpp decoding
    def set_decoding_backend(
        self,
        backend: Literal["torch", "llama.cpp"] = "torch",
        *,
        weights: str = "f32",
        n_ctx: int | None = None,
    ) -> None:
        """Answer with the decoder in llama.cpp (``"llama.cpp"``: greedy only, much faster at
        batch 1 on CPUs; needs ``pisco-rag[llama-cpp]``) or in torch (``"torch"``, default).
        ``weights``: ``"f32"`` (the torch path's answers), ``"f16"``, ``"q8_0"`` or ``"q4_1"``
        (faster, may differ). Compression, reranking and text mode without the adapter stay in
        torch. The decoder is written once as a GGUF file under the cache directory.
        ``n_ctx``: llama.cpp's context (default: the backbone's; its KV cache is allocated up
        front, so a smaller one saves memory)."""
        if backend not in ("torch", "llama.cpp"):
            raise PiscoInputError(f"backend must be 'torch' or 'llama.cpp', got {backend!r}")
        with self._lock:
            if self._llamacpp is not None:
                self._llamacpp.close()
                self._llamacpp = None
            if backend == "llama.cpp":
                from .llamacpp_decoder import LlamaCppDecoder

                self._llamacpp = LlamaCppDecoder(self, weights, n_ctx=n_ctx)

    @property
    def decoding_backend(self) -> str:
        """``"torch"`` or ``"llama.cpp"`` (see :meth:`set_decoding_backend`)."""
        return "torch" if self._llamacpp is None else "llama.cpp"

    def _llamacpp_ids(self, prompt: RenderedPrompt, args: dict[str, Any], cancel=None):
        """Greedy ids for one prompt from llama.cpp (the caller holds the model lock)."""
        unsupported = sorted(set(args) - _LLAMACPP_ARGS)
        if args.get("do_sample") or unsupported:
            raise PiscoInputError(
                "the llama.cpp decoder decodes greedily with max_new_tokens, min_new_tokens "
                f"and stop only (got {unsupported or 'do_sample=True'}); call "
                "set_decoding_backend('torch') for other generation settings"
            )
        if self._llamacpp.fingerprint != self.fingerprint:  # weights changed: write them again
            old = self._llamacpp
            self.set_decoding_backend("llama.cpp", weights=old.weights, n_ctx=old.context)
        stop = args.get("stop_strings") or []
        # a stop string spans at most 4 byte-level tokens per character: decode only that tail
        tail = 4 * max((len(s) for s in stop), default=0) + 1

        def should_stop(ids: list[int]) -> bool:
            if cancel is not None and cancel.is_set():
                return True
            return bool(stop) and any(s in self.tokenizer.decode(ids[-tail:]) for s in stop)

        embeds, _ = self._embed([prompt])
        return self._llamacpp.stream_ids(
            embeds[0],
            args["max_new_tokens"],
            eos_ids=self._eos_ids(),
            min_new_tokens=args.get("min_new_tokens") or 0,
            should_stop=should_stop,
        )

    @property
    def context_window(self) -> int | None:
        """The backbone's maximum sequence length (prompt and answer), if it declares one."""
        config = getattr(self.model.config, "text_config", None) or self.model.config
        return getattr(config, "max_position_embeddings", None)

    def _check_prompt_lengths(self, prompts: Sequence[RenderedPrompt], max_new: int) -> None:
        """Refuse, before taking the model lock, a prompt the backbone cannot read whole."""
        window = self.context_window
        if window is None:
            return
        for i, p in enumerate(prompts):
            if len(p.input_ids) + max_new > window:
                raise PiscoInputError(
                    f"prompt {i} is {len(p.input_ids)} tokens and asks for up to {max_new} new "
                    f"ones, beyond the backbone's context of {window} tokens: shorten the "
                    "question or history, retrieve fewer documents, or lower max_new_tokens"
                )

    def _activate_decoder(self, adapter: str) -> None:
        if adapter == "none":
            use_adapter(self.model, None)
        elif adapter == "decoder":
            use_adapter(self.model, DECODER)
        else:
            raise PiscoInputError(f"adapter must be 'decoder' or 'none', got {adapter!r}")

    def _stream(
        self,
        prompt: RenderedPrompt,
        max_new_tokens: int,
        stop: Sequence[str] | None,
        kwargs: dict[str, Any],
        adapter: Literal["decoder", "none"],
    ) -> TextStream:
        args = self._generation_args(max_new_tokens, stop, kwargs)
        self._check_prompt_lengths([prompt], max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        llama_args = dict(args)  # llama.cpp checks the cancel event itself
        args["stopping_criteria"] = StoppingCriteriaList(
            [*args.get("stopping_criteria", []), _Cancelled(cancel)]
        )
        outcome: dict[str, Any] = {}

        def run() -> None:
            _LIVE_GENERATIONS[threading.current_thread()] = cancel
            try:
                with torch.no_grad(), self._lock:
                    if self._llamacpp is not None and adapter == "decoder":
                        ids = []
                        streamer.put(torch.empty(1, 0, dtype=torch.long))  # the (empty) prompt
                        for token in self._llamacpp_ids(prompt, llama_args, cancel):
                            ids.append(token)
                            streamer.put(torch.tensor([token]))
                        streamer.end()
                        outcome["ids"] = torch.tensor([ids])
                        return
                    self._activate_decoder(adapter)
                    try:
                        embeds, mask = self._embed([prompt])
                        outcome["ids"] = self.model.generate(
                            inputs_embeds=embeds, attention_mask=mask, streamer=streamer, **args
                        )
                    finally:
                        if adapter == "none":
                            use_adapter(self.model, DECODER)
            except BaseException as e:  # surfaced in the consumer's thread
                outcome["error"] = e
                streamer.end()
            finally:
                _LIVE_GENERATIONS.pop(threading.current_thread(), None)

        thread = threading.Thread(target=run, daemon=True, name="pisco-stream")
        thread.start()
        return TextStream(streamer, thread, cancel, outcome, stop, self, prompt, max_new_tokens)

    def _eos_ids(self) -> list[int]:
        """Every id that ends an answer (the generation config's and the tokenizer's)."""
        eos = {*_as_list(self.model.generation_config.eos_token_id), self.tokenizer.eos_token_id}
        return sorted(t for t in eos if t is not None)

    def _completions(
        self,
        prompts: Sequence[RenderedPrompt],
        out: torch.Tensor,
        max_new_tokens: int,
        stop: Sequence[str] | None,
    ) -> list[Completion]:
        """Decode generated ids: cut at the first eos and at stop strings, count tokens."""
        eos = set(self._eos_ids())
        pad = self.tokenizer.pad_token_id
        results = []
        for p, row in zip(prompts, out.tolist()):
            end = next((k for k, t in enumerate(row) if t in eos), None)
            if end is not None:
                tokens, n = row[:end], end + 1
            else:
                while pad not in eos and row and row[-1] == pad:
                    row.pop()
                tokens, n = row, len(row)
            text, stopped = _cut_at_stop(
                self.tokenizer.decode(tokens, skip_special_tokens=True), stop
            )
            reason = "stop" if end is not None or stopped else "length"
            results.append(Completion(text.strip(), len(p.input_ids), n, reason))
        return results


class TextStream(Iterator[str]):
    """Text pieces of one answer as they are decoded. Joined, they equal the answer that
    :meth:`PiscoModel.complete` gives (stripped, cut at stop strings); once the stream is
    exhausted, :attr:`completion` holds it with its token counts. Closing the stream (or
    dropping it) stops the generation."""

    def __init__(self, streamer, thread, cancel, outcome, stop, model, prompt, max_new_tokens):
        self.completion: Completion | None = None
        self._cancel = cancel
        self._pieces = self._run(streamer, thread, outcome, stop, model, prompt, max_new_tokens)

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop the generation; safe to call from another thread while one is reading."""
        self._cancel.set()
        # "generator already executing" when another thread is reading: it ends at its next step
        with contextlib.suppress(ValueError):
            self._pieces.close()

    def __del__(self) -> None:
        self._cancel.set()

    def _run(self, streamer, thread, outcome, stop, model, prompt, max_new_tokens):
        text, sent = "", ""
        try:
            for piece in streamer:
                text, stopped = _cut_at_stop(text + piece, stop)
                ready = text.strip() if stopped else text.lstrip()
                ready = ready if stopped else ready[: len(ready.rstrip())]  # hold whitespace
                if len(ready) > len(sent):
                    yield ready[len(sent) :]
                    sent = ready
                if stopped:
                    self._cancel.set()
                    break
            thread.join()
            if "error" in outcome:
                raise outcome["error"]
            if "ids" in outcome:
                (self.completion,) = model._completions(
                    [prompt], outcome["ids"], max_new_tokens, stop
                )
        finally:
            self._cancel.set()


# Streams still generating; stopped and joined at interpreter exit, since a daemon thread
# killed inside a torch op aborts the process ("terminate called without an active exception").
_LIVE_GENERATIONS: dict[threading.Thread, threading.Event] = {}


@atexit.register
def _stop_live_generations(timeout_s: float = 30.0) -> None:
    for thread, cancel in list(_LIVE_GENERATIONS.items()):
        cancel.set()
        thread.join(timeout_s)


class _Cancelled(StoppingCriteria):
    """Stopping criterion: stop when the stream's consumer went away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


# ---------------------------------------------------------------------- helpers
def _prepare_backbone(model: PreTrainedModel, tokenizer, config: PiscoConfig) -> None:
    """Add the special tokens (naver's order), left padding, pad = bos if absent; resize."""
    if tokenizer.bos_token is None or tokenizer.eos_token is None:
        raise CheckpointError("the backbone's tokenizer needs both a bos and an eos token")
    tokenizer.add_special_tokens({"additional_special_tokens": config.special_tokens})
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.bos_token
    with quiet_loading():  # transformers explains its mean-resizing of new rows at length
        model.resize_token_embeddings(len(tokenizer))


def tail_forward(
    backbone: PreTrainedModel,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    keep: int,
    hidden: bool = False,
) -> Any:
    """Forward pass of left-padded rows (position ids from the mask, as in generation) that
    keeps the logits of the last ``keep`` positions, and every layer's hidden states when
    ``hidden``: what answer likelihoods and the training losses need."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return backbone(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        logits_to_keep=keep,
        use_cache=False,
        output_hidden_states=hidden,
    )


def tail_logits(
    backbone: PreTrainedModel, embeds: torch.Tensor, mask: torch.Tensor, keep: int
) -> torch.Tensor:
    """Logits of the last ``keep`` positions of left-padded rows."""
    return tail_forward(backbone, embeds, mask, keep).logits


def _adapter_names(config: PiscoConfig) -> tuple[str, ...]:
    """OSCAR decoders carry only the decoder adapter; PISCO both; a retriever adds its own."""
    names = (DECODER,) if config.is_oscar else (DECODER, ENCODER)
    return (*names, RETRIEVER) if config.retriever else names


def _compressor_fields(spec: str, connector_hidden: int | None, decoder_hidden: int) -> dict:
    """PiscoConfig fields for a ``from_backbone(compressor=...)`` string."""
    if spec == "pisco":
        return {}
    if spec.startswith("first-layers:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise PiscoInputError(
                f"compressor={spec!r}: write 'first-layers:N' with N an integer"
            ) from None
        return {
            "compressor": "first-layers",
            "compressor_layers": n,
            "connector_hidden": connector_hidden,
        }
    return {
        "compressor": "model",
        "compressor_model": spec,
        "connector_hidden": connector_hidden or 4 * decoder_hidden,
    }


def _add_adapters(model: PreTrainedModel, config: PiscoConfig, weights: dict[str, dict]) -> None:
    names = _adapter_names(config)
    missing = set(names) - set(weights) if weights else set()
    if missing:
        raise CheckpointError(f"the checkpoint's adapters lack {sorted(missing)}")
    add_adapters(model, _lora(config), names, weights)


def _lora(config: PiscoConfig):
    """The LoRA configuration every adapter of the model shares."""
    return lora_config(
        config.lora_r, config.lora_alpha, config.lora_dropout, config.lora_target_modules
    )


def _load_naver_rows(model, first_last: dict, base_vocab: int, directory: Path) -> list[int]:
    """Copy naver's full embedding/head matrices in; return the base rows they changed."""
    targets = {"embed_tokens.weight": model.get_input_embeddings().weight}
    out = model.get_output_embeddings()
    if out is not None:
        targets["lm_head.weight"] = out.weight
    changed: set[int] = set()
    found = False
    with torch.no_grad():
        for key, tensor in first_last.items():
            for suffix, param in targets.items():
                if key.endswith(suffix):
                    if tuple(tensor.shape) != tuple(param.shape):
                        raise CheckpointError(
                            f"{directory}/decoder_first_last_layers.pth: {key} has shape "
                            f"{tuple(tensor.shape)}, the backbone with added tokens has "
                            f"{tuple(param.shape)}; is this the right backbone?"
                        )
                    tensor = tensor.to(param.dtype)
                    diff = (param[:base_vocab] != tensor[:base_vocab]).any(dim=1)
                    changed |= set(torch.nonzero(diff).flatten().tolist())
                    param.copy_(tensor)
                    found = True
    if not found:
        raise CheckpointError(
            f"{directory}/decoder_first_last_layers.pth holds no embed_tokens/lm_head weights"
        )
    return sorted(changed)


def _load_native_rows(model, embeddings: dict[str, torch.Tensor], directory: Path) -> list[int]:
    """Write the saved embedding/head rows into the resized backbone; return their ids."""
    try:
        ids = embeddings["row_ids"].long()
        rows = [(model.get_input_embeddings().weight, embeddings["input_rows"])]
    except KeyError as e:
        raise CheckpointError(f"{directory}/embeddings.safetensors lacks {e}") from None
    if "output_rows" in embeddings:
        rows.append((model.get_output_embeddings().weight, embeddings["output_rows"]))
    with torch.no_grad():
        for param, values in rows:
            if int(ids.max()) >= param.shape[0] or values.shape[1] != param.shape[1]:
                raise CheckpointError(
                    f"{directory}/embeddings.safetensors does not fit the backbone "
                    f"(embedding matrix {tuple(param.shape)}); is this the right backbone?"
                )
            param[ids] = values.to(param.dtype)
    return ids.tolist()


def _join_adjacent_memories(segments: list[Segment]) -> list[Segment]:
    """Drop whitespace-only text between two memories."""
    return [
        seg
        for k, seg in enumerate(segments)
        if not (
            isinstance(seg, str)
            and not seg.strip()
            and 0 < k < len(segments) - 1
            and isinstance(segments[k - 1], Memory)
            and isinstance(segments[k + 1], Memory)
        )
    ]


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


_LLAMACPP_ARGS = {
    "do_sample",
    "max_new_tokens",
    "min_new_tokens",
    "pad_token_id",
    "stop_strings",
    "tokenizer",
}


def _as_list(x: int | list[int] | None) -> list[int]:
    return [] if x is None else [x] if isinstance(x, int) else list(x)


def _cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    if not stop:
        return text, False
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


__all__ = ["Completion", "PiscoModel", "RankedDocument", "Segment", "TextStream"]
