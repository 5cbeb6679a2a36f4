"""Model configuration: the native pisco-rag format and the mapping from naver's COCOM config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import CheckpointError

LongDocumentPolicy = Literal["chunk", "truncate", "naver", "error"]
# Instruction-tuned embedders mark queries so that question and passage embed differently.
RETRIEVER_QUERY_PREFIX = "Represent this question for retrieving passages that answer it: "
LONG_DOCUMENT_POLICIES: tuple[str, ...] = ("chunk", "truncate", "naver", "error")
# pisco: the backbone with an encoder adapter; token-mean: no network, memory i is the mean
# input embedding of the chunk's i-th segment; first-layers, model: OSCAR compressors
COMPRESSORS: tuple[str, ...] = ("pisco", "token-mean", "first-layers", "model")
# where an OSCAR model's memories come from: its compressor's states (OSCAR), or the token-mean
# of the chunk (the compressor's pass then gives the reranking scores only)
MEMORY_SOURCES: tuple[str, ...] = ("compressor", "token-mean")
FORMAT_VERSION = 1

SYSTEM_PROMPT = (
    "You are a helpful assistant. Your task is to extract relevant information from provided "
    "documents and to answer to questions as briefly as possible."
)


@dataclass
class PiscoConfig:
    """Everything that defines a PISCO model apart from its weights.

    ``backbone`` names the base causal LM (hub id, local path, or ``embedded:<name>``); its
    weights are referenced, never copied into a checkpoint.
    """

    backbone: str
    compressor: Literal["pisco", "token-mean", "first-layers", "model"] = "pisco"
    compressor_layers: int | None = None  # first-layers: N
    compressor_model: str | None = None  # model: the separate small causal LM (name or path)
    compressor_rms_norm: bool = False  # first-layers: keep the backbone's final norm
    connector_hidden: int | None = None  # Linear-ReLU-Linear connector width (None: no connector)
    compressor_padding_side: str | None = "left"  # None: the compressor tokenizer's own default
    compressor_lora_r: int | None = None  # naver checkpoints whose compressor is LoRA-tuned
    rerank_head: bool = False
    # the head's score plus a late-interaction term from the same pass (first-layers only):
    # how well each query token finds a matching document token (see compressors.py)
    rerank_interaction: bool = False
    memory_source: Literal["compressor", "token-mean"] = "compressor"  # OSCAR only
    # memory tokens in the compressor's input when they differ from the decoder's memories
    # (memory_source="token-mean": the head was trained after this many); None: n_mem_tokens
    compressor_memory_tokens: int | None = None
    compression_rate: int = 16
    doc_max_length: int = 128
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: str | list[str] = "all-linear"
    long_documents: LongDocumentPolicy = "chunk"
    retriever: bool = False  # a third LoRA adapter that embeds queries and passages
    retriever_pooling: Literal["mean", "last"] = "mean"
    retriever_query_prefix: str = RETRIEVER_QUERY_PREFIX
    # memory standardisation (PiscoModel.calibrate_memories): the decoder reads
    # (memory - memory_shift) * memory_gain, per hidden dimension; None: raw memories
    memory_shift: list[float] | None = None
    memory_gain: list[float] | None = None
    trained: bool = False
    name: str | None = None
    system_prompt: str = SYSTEM_PROMPT
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.backbone, str) or not self.backbone:
            raise ValueError(f"backbone must name a model (a non-empty str), got {self.backbone!r}")
        for name in ("compression_rate", "doc_max_length", "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.compressor not in COMPRESSORS:
            raise ValueError(f"compressor must be one of {COMPRESSORS}, not {self.compressor!r}")
        if self.compressor == "first-layers" and not self.compressor_layers:
            raise ValueError("a first-layers compressor needs compressor_layers (N)")
        if self.compressor == "model" and not self.compressor_model:
            raise ValueError("a 'model' compressor needs compressor_model (a name or path)")
        if not self.is_oscar and self.rerank_head:
            raise ValueError("a reranking head needs an OSCAR compressor (first-layers or model)")
        if self.rerank_interaction and not (self.rerank_head and self.compressor == "first-layers"):
            raise ValueError(
                "rerank_interaction scores with a first-layers compressor's reranking head: "
                "set compressor='first-layers' and rerank_head=True"
            )
        if self.memory_source not in MEMORY_SOURCES:
            raise ValueError(
                f"memory_source must be one of {MEMORY_SOURCES}, not {self.memory_source!r}"
            )
        if self.memory_source == "token-mean" and not self.is_oscar:
            raise ValueError(
                "memory_source='token-mean' is for OSCAR compressors; a PISCO model with "
                "token-mean memories has compressor='token-mean'"
            )
        if self.compressor_memory_tokens is not None and (
            self.memory_source != "token-mean"
            or isinstance(self.compressor_memory_tokens, bool)
            or not isinstance(self.compressor_memory_tokens, int)
            or self.compressor_memory_tokens < 1
        ):
            raise ValueError(
                "compressor_memory_tokens (a positive int) is for OSCAR models whose memories "
                f"are token-mean ones, got {self.compressor_memory_tokens!r}"
            )
        if self.doc_max_length % self.compression_rate:
            raise ValueError(
                f"doc_max_length ({self.doc_max_length}) must be a multiple of "
                f"compression_rate ({self.compression_rate})"
            )
        if self.retriever_pooling not in ("mean", "last"):
            raise ValueError(
                f"retriever_pooling must be 'mean' or 'last', got {self.retriever_pooling!r}"
            )
        if (self.memory_shift is None) != (self.memory_gain is None) or (
            self.memory_shift is not None and len(self.memory_shift) != len(self.memory_gain)
        ):
            raise ValueError("memory_shift and memory_gain go together, one value per dimension")
        if self.long_documents not in LONG_DOCUMENT_POLICIES:
            raise ValueError(
                f"long_documents must be one of {LONG_DOCUMENT_POLICIES}, "
                f"not {self.long_documents!r}"
            )

    @property
    def is_oscar(self) -> bool:
        """Query-dependent compression with its own compressor (OSCAR), not the backbone."""
        return self.compressor in ("first-layers", "model")

    @property
    def token_mean_memories(self) -> bool:
        """Memories are segment means of the chunk's token embeddings (no network)."""
        return self.compressor == "token-mean" or self.memory_source == "token-mean"

    @property
    def compressor_n_mem(self) -> int:
        """Memory tokens in an OSCAR compressor's input."""
        return self.compressor_memory_tokens or self.n_mem_tokens

    @property
    def n_mem_tokens(self) -> int:
        """Memory vectors per chunk: doc_max_length / compression_rate (8 for 128 / 16)."""
        return self.doc_max_length // self.compression_rate

    @property
    def special_tokens(self) -> list[str]:
        """Tokens added to the base tokenizer, in the order naver's checkpoints add them."""
        return [f"<MEM{i}>" for i in range(self.n_mem_tokens)] + ["<AE>", "<ENC>", "<SEP>"]

    def to_dict(self) -> dict[str, Any]:
        return {"pisco_rag_format": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PiscoConfig:
        data = dict(data)
        version = data.pop("pisco_rag_format", None)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise CheckpointError(
                f"config.json has pisco_rag_format={version!r}, not a format number"
            )
        if version > FORMAT_VERSION:
            raise CheckpointError(
                f"config.json has pisco_rag_format={version!r}; this version of pisco-rag "
                f"reads format {FORMAT_VERSION}. Upgrade pisco-rag to read it."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json holds an invalid setting: {e}") from None

    @classmethod
    def from_naver(cls, data: dict[str, Any], *, name: str | None = None) -> PiscoConfig:
        """Map a naver COCOM ``config.json`` (PISCO and OSCAR variants) onto a native one."""
        if data.get("model_type") != "COCOM":
            raise CheckpointError(
                f"not a naver COCOM config (model_type={data.get('model_type')!r})"
            )
        compr = data.get("compr_model_name")
        expected_form = "both_separately" if compr is None else None
        if not data.get("lora", True) or (
            expected_form and data.get("training_form", expected_form) != expected_form
        ):
            raise CheckpointError(
                "only naver checkpoints with a LoRA decoder (lora=true; training_form="
                "'both_separately' for PISCO) are supported (got lora="
                f"{data.get('lora')!r}, training_form={data.get('training_form')!r})"
            )
        if not data.get("different_mem_tokens", True):
            raise CheckpointError(
                "naver checkpoints with different_mem_tokens=false are not supported"
            )
        if data.get("compr_every_n_layer"):
            raise CheckpointError(
                "naver compressors built from every n-th layer (compr_every_n_layer) are not "
                "supported; first-N-layers and separate-model compressors are"
            )
        lora_r = int(data.get("lora_r", 16))
        oscar: dict[str, Any] = {}
        if compr == "mistral_trimmed":
            oscar = dict(
                compressor="first-layers",
                compressor_layers=int(data["compr_n_layers"]),
                compressor_rms_norm=bool(data.get("compr_rms_norm", False)),
                compressor_padding_side=None,
                compressor_model=data.get("compr_base_model_name"),
            )
        elif compr is not None:
            oscar = dict(compressor="model", compressor_model=compr)
        if compr is not None:
            use_mlp = data.get("compr_use_mlp", True)
            oscar["connector_hidden"] = (
                int(data.get("compr_mlp_hidden_dim", 8096)) if use_mlp else None
            )
            if data.get("lora_compressor"):
                oscar["compressor_lora_r"] = int(data.get("lora_r_compressor") or lora_r)
        return cls(
            backbone=data["decoder_model_name"],
            compression_rate=int(data.get("compr_rate", 16)),
            doc_max_length=int(data.get("doc_max_length", 128)),
            lora_r=lora_r,
            lora_alpha=2 * lora_r,
            trained=True,
            name=name,
            extra={"source_format": "naver-cocom"},
            **oscar,
        )
