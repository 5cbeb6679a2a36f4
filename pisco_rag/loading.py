"""Loading and saving: new models on a backbone, native and naver checkpoints, the shipped
defaults (``"embedded"``, ``"embedded-oscar"``), and the native save format.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from . import checkpoints
from .adapters import DECODER, ENCODER, RETRIEVER, adapter_state_dict, add_adapters, lora_config
from .compressors import (
    build_compressor,
    compact_compressor_state,
    move_keeping_float32_buffers,
    naver_compressor_weights,
    split_compact_compressor_state,
    strip_adapter_prefix,
)
from .config import LongDocumentPolicy, PiscoConfig
from .defaults import (
    DEFAULT_BACKBONE,
    EMBEDDED_READER,
    SHIPPED_MODELS,
    UNTRAINED_NOTICE,
    model_notice,
)
from .errors import CheckpointError, PiscoInputError
from .stores import MemoryStore
from .verbosity import quiet_loading, warn_once

if TYPE_CHECKING:
    from .model import PiscoModel


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class LoadingMixin:
    """Construction and saving of :class:`~pisco_rag.model.PiscoModel`: the class methods
    build the model through ``cls(model, tokenizer, config, compressor=..., store=...)``; the
    others need ``model``, ``compressor``, ``tokenizer``, ``config``, ``_lock``,
    ``extra_embedding_rows``, ``_input_embeddings``, ``_tied`` and ``_added_token_ids``."""

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
        rerank_interaction: bool = False,
        memory_source: str = "compressor",
        connector_hidden: int | None = None,
        retriever: bool = False,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        store: MemoryStore | None = None,
        local_files_only: bool = False,
    ) -> PiscoModel:
        """A new, untrained model on any transformers causal LM (name, path or instance).

        ``compressor``: ``"pisco"`` (the backbone with an encoder adapter), ``"token-mean"`` (no
        network: segment means of the chunk's token embeddings), ``"first-layers:N"``
        (OSCAR: a copy of the backbone's first N layers) or the name/path of a separate small
        causal LM (OSCAR, with a Linear-ReLU-Linear connector of width ``connector_hidden``,
        default 4x the decoder's hidden size). ``rerank_head`` adds the reranking token and
        head (OSCAR only), ``rerank_interaction`` the late-interaction term of its scores
        (first-layers only; :meth:`add_rerank_interaction`). ``memory_source="token-mean"``
        gives an OSCAR model token-mean memories (its compressor then only scores).
        ``retriever`` adds the retriever adapter (:meth:`embed_queries`). The LoRA ``B``
        matrices start at zero, so the decoder first behaves like the backbone; other new
        weights are drawn with ``seed``.
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
            rerank_interaction=rerank_interaction,
            memory_source=memory_source,
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
            return cls._load_embedded(str(name_or_path), device=device, dtype=dtype, store=store)
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
    def _load_embedded(cls, name: str = "embedded", *, device=None, dtype=None, store=None):
        """A shipped default by name: ``embedded`` (PISCO) or ``embedded-oscar`` (OSCAR with a
        reranking head). A shipped model whose config carries a ``notice`` (e.g. how far it was
        trained) warns with it. Without shipped PISCO weights, ``embedded`` is an untrained
        model."""
        directory = SHIPPED_MODELS[name]
        if (directory / "config.json").is_file():
            model = cls.from_pretrained(directory, device=device, dtype=dtype, store=store)
            notice = model_notice(model.config)
            if notice:
                warn_once(notice, stacklevel=3)
            return model
        if name != "embedded":
            raise CheckpointError(
                f"{directory} is missing: this installation ships no {name!r} model; train one "
                "(docs/training.md) and load its directory"
            )
        warn_once(UNTRAINED_NOTICE, stacklevel=3)
        model = cls.from_backbone(
            DEFAULT_BACKBONE, device=device, dtype=dtype, store=store, **EMBEDDED_READER
        )
        model.config.name = "pisco-smollm2-135m (untrained)"
        return model

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


def _adapter_names(config: PiscoConfig) -> tuple[str, ...]:
    """PISCO models carry an encoder and a decoder adapter, the others (OSCAR, token-mean)
    only the decoder's; a retriever adds its own."""
    names = (DECODER, ENCODER) if config.compressor == "pisco" else (DECODER,)
    return (*names, RETRIEVER) if config.retriever else names


def _compressor_fields(spec: str, connector_hidden: int | None, decoder_hidden: int) -> dict:
    """PiscoConfig fields for a ``from_backbone(compressor=...)`` string."""
    if spec == "pisco":
        return {}
    if spec == "token-mean":
        return {"compressor": "token-mean"}
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
