"""PiscoModel: compress documents into memories and generate answers from them.

One set of backbone weights carries two LoRA adapters: ``encoder_adapter`` turns a chunk of text
into ``n_mem`` memory vectors (the last hidden states at the ``<MEMi>`` positions), and
``decoder_adapter`` reads memories spliced into its input embeddings. Every model call switches
adapters under one lock, so threads and event loops can share a model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading
from typing import TYPE_CHECKING, Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .adapters import RETRIEVER
from .compression import CompressionMixin, RankedDocument
from .compressors import QueryCompressor
from .config import PiscoConfig
from .generation import Completion, GenerationMixin
from .generation import Messages as Messages
from .generation import tail_forward as tail_forward
from .generation import tail_logits as tail_logits
from .loading import LoadingMixin
from .loading import default_device as default_device
from .prompting import PromptRenderer, Segment
from .stores import LRUMemoryStore, MemoryStore
from .streaming import StreamingMixin, TextStream

if TYPE_CHECKING:
    from .llamacpp_decoder import LlamaCppDecoder


class PiscoModel(LoadingMixin, CompressionMixin, GenerationMixin, StreamingMixin):
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
        defaults = {f.name: f.default for f in dataclasses.fields(PiscoConfig)}
        for key in ("memory_source", "compressor_memory_tokens"):  # settings added later:
            if cfg[key] == defaults[key]:  # earlier models keep their fingerprint
                cfg.pop(key)
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
        """What the model is, in a JSON-ready dict (name, backbone, compressor, where memories
        come from, fingerprint, device, dtype, memory shape, store): what reports and model
        cards record."""
        return {
            "name": self.config.name,
            "backbone": self.config.backbone,
            "compressor": self.config.compressor
            + (f":{self.config.compressor_layers}" if self.config.compressor_layers else ""),
            "rerank_head": self.config.rerank_head,
            "rerank_interaction": self.config.rerank_interaction,
            "memories": "token-mean" if self.config.token_mean_memories else "compressor",
            "trained": self.config.trained,
            "fingerprint": self.fingerprint,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "doc_max_length": self.config.doc_max_length,
            "compression_rate": self.config.compression_rate,
            "memory_shape": [self.n_mem, self.hidden_size],
            "store": type(self.store).__name__,
        }


# A shipped default by name (``"embedded"``, ``"embedded-oscar"``); see PiscoModel.from_pretrained.
load_embedded = PiscoModel._load_embedded

__all__ = ["Completion", "PiscoModel", "RankedDocument", "Segment", "TextStream"]
