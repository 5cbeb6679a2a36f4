"""Model configuration: the native pisco-rag format and the mapping from naver's COCOM config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import CheckpointError

LongDocumentPolicy = Literal["chunk", "truncate", "error"]
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
    compressor: str = "pisco"
    compression_rate: int = 16
    doc_max_length: int = 128
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    lora_target_modules: str | list[str] = "all-linear"
    long_documents: LongDocumentPolicy = "chunk"
    trained: bool = False
    name: str | None = None
    system_prompt: str = SYSTEM_PROMPT
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.compressor != "pisco":
            raise CheckpointError(
                f"compressor kind {self.compressor!r} is not supported yet; only 'pisco' "
                "(backbone + encoder_adapter) is. OSCAR compressors are tracked separately."
            )
        if self.doc_max_length % self.compression_rate:
            raise ValueError(
                f"doc_max_length ({self.doc_max_length}) must be a multiple of "
                f"compression_rate ({self.compression_rate})"
            )
        if self.long_documents not in ("chunk", "truncate", "error"):
            raise ValueError(
                f"long_documents must be 'chunk', 'truncate' or 'error', "
                f"not {self.long_documents!r}"
            )

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
        if version is None or version > FORMAT_VERSION:
            raise CheckpointError(
                f"config.json has pisco_rag_format={version!r}; this version of pisco-rag "
                f"reads format {FORMAT_VERSION}. Upgrade pisco-rag to read it."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_naver(cls, data: dict[str, Any], *, name: str | None = None) -> PiscoConfig:
        """Map a naver COCOM ``config.json`` (PISCO variants) onto a native configuration."""
        if data.get("model_type") != "COCOM":
            raise CheckpointError(
                f"not a naver COCOM config (model_type={data.get('model_type')!r})"
            )
        if data.get("compr_model_name") is not None:
            raise CheckpointError(
                f"{name or 'this checkpoint'} is an OSCAR checkpoint (compr_model_name="
                f"{data['compr_model_name']!r}); only PISCO checkpoints load in this version."
            )
        if not data.get("lora", True) or data.get("training_form", "both_separately") != (
            "both_separately"
        ):
            raise CheckpointError(
                "only naver checkpoints with lora=true and training_form='both_separately' "
                f"are supported (got lora={data.get('lora')!r}, "
                f"training_form={data.get('training_form')!r})"
            )
        if not data.get("different_mem_tokens", True):
            raise CheckpointError(
                "naver checkpoints with different_mem_tokens=false are not supported"
            )
        lora_r = int(data.get("lora_r", 16))
        return cls(
            backbone=data["decoder_model_name"],
            compression_rate=int(data.get("compr_rate", 16)),
            doc_max_length=int(data.get("doc_max_length", 128)),
            lora_r=lora_r,
            lora_alpha=2 * lora_r,
            trained=True,
            name=name,
            extra={"source_format": "naver-cocom"},
        )
