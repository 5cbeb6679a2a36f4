"""Decoding in llama.cpp: PISCO/OSCAR prompts (memories spliced as input embeddings) answered by
llama.cpp (``llama-cpp-python``) instead of eager torch generation.

At batch 1 eager torch spends most of a decoding step on per-operator overhead; llama.cpp runs
the same step as one compiled graph. The decoder (backbone plus ``decoder_adapter``, merged) is
written once to a GGUF file (:func:`write_decoder_gguf`, cached by the model's fingerprint); a
prompt goes in as input embeddings, the memories already spliced in by the torch side, and
greedy decoding goes on in llama.cpp. With ``weights="f32"`` the answers are those of the torch
path (the same float32 weights; llama.cpp's kernels round differently, which can flip a
near-tie); ``"f16"``, ``"q8_0"`` and ``"q4_1"`` trade that for speed and memory.

Only Llama-architecture backbones whose tokenizer is the embedded SmolLM2 one are supported
(llama.cpp needs the vocabulary in the file; it is copied from the shipped GGUF).
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .adapters import DECODER
from .defaults import DEFAULT_BACKBONE, cache_dir, embedded_gguf_path
from .errors import PiscoInputError

if TYPE_CHECKING:
    from .model import PiscoModel

WEIGHT_TYPES = ("f32", "f16", "q8_0", "q4_1")
_LAYER_TENSORS = {  # transformers Llama module -> GGUF tensor name
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _require_llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        raise PiscoInputError(
            "decoding in llama.cpp needs llama-cpp-python: pip install 'pisco-rag[llama-cpp]' "
            "(it builds llama.cpp from source: a C++ compiler and cmake, several minutes)"
        ) from e
    return llama_cpp


def _rope_rows_to_gguf(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder the output rows of a query/key projection from the transformers rotary layout
    (each head's two halves) to llama.cpp's (interleaved pairs)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _linear_weight(module: torch.nn.Module) -> torch.Tensor:
    """A projection's weight with the decoder adapter merged in (peft's own delta)."""
    base = getattr(module, "base_layer", module)
    weight = base.weight.detach().float()
    if hasattr(module, "get_delta_weight") and DECODER in getattr(module, "lora_A", {}):
        weight = weight + module.get_delta_weight(DECODER).detach().float()
    return weight


def _rope(cfg) -> dict:
    """The rotary settings (``rope_parameters`` in transformers 5, ``rope_scaling`` and
    ``rope_theta`` before)."""
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
    return rope


def _check_supported(model: PiscoModel) -> None:
    cfg = model.model.config
    problems = []
    if cfg.model_type != "llama":
        problems.append(f"model_type {cfg.model_type!r} (only 'llama')")
    if _rope(cfg).get("rope_type", "default") != "default":
        problems.append(f"rope scaling {_rope(cfg)}")
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        problems.append("projection biases")
    if problems:
        raise PiscoInputError(
            "the llama.cpp decoder supports plain Llama backbones (such as the embedded "
            f"SmolLM2); this one has {', '.join(problems)}: use the torch decoder"
        )


def write_decoder_gguf(model: PiscoModel, path: str | os.PathLike[str], weights: str) -> Path:
    """Write ``model``'s decoder (backbone with ``decoder_adapter`` merged, float32 math) as a
    GGUF file llama.cpp can load; the vocabulary is copied from the embedded SmolLM2 file."""
    import gguf

    if weights not in WEIGHT_TYPES:
        raise PiscoInputError(f"weights must be one of {WEIGHT_TYPES}, got {weights!r}")
    _check_supported(model)
    source = gguf.GGUFReader(str(embedded_gguf_path(DEFAULT_BACKBONE.split(":", 1)[1])))
    vocab = source.fields["tokenizer.ggml.tokens"].contents()
    n_vocab = len(vocab)
    ours = model.tokenizer.convert_ids_to_tokens(list(range(n_vocab)))
    if ours != vocab:
        raise PiscoInputError(
            "the llama.cpp decoder needs the backbone's vocabulary to be the embedded SmolLM2 "
            "one (it is copied from that GGUF file); this backbone's differs: use the torch "
            "decoder"
        )
    cfg = model.model.config
    qtype = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_1": gguf.GGMLQuantizationType.Q4_1,
    }[weights]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.close(fd)
    writer = gguf.GGUFWriter(tmp, "llama")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_name(f"pisco-rag decoder {model.fingerprint}")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(_rope(cfg)["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(n_vocab)
    writer.add_file_type(qtype)
    for name, field in source.fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(name, field.contents(), kind, sub_type=sub)

    def add(name: str, tensor: torch.Tensor, quantise: bool = True) -> None:
        data = tensor.detach().float().cpu().numpy()
        if quantise and qtype != gguf.GGMLQuantizationType.F32:
            data = gguf.quants.quantize(data, qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))

    backbone = model.model.model
    add("token_embd.weight", backbone.embed_tokens.weight[:n_vocab])
    add("output_norm.weight", backbone.norm.weight, quantise=False)
    if not model._tied:
        add("output.weight", _linear_weight(model.model.lm_head)[:n_vocab])
    for i, layer in enumerate(backbone.layers):
        for attr, gguf_name in _LAYER_TENSORS.items():
            module = layer.get_submodule(attr)
            if attr.endswith("layernorm"):
                add(f"blk.{i}.{gguf_name}.weight", module.weight, quantise=False)
                continue
            weight = _linear_weight(module)
            if attr.endswith("q_proj"):
                weight = _rope_rows_to_gguf(weight, cfg.num_attention_heads)
            elif attr.endswith("k_proj"):
                weight = _rope_rows_to_gguf(weight, cfg.num_key_value_heads)
            add(f"blk.{i}.{gguf_name}.weight", weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, path)
    return path


class LlamaCppDecoder:
    """Greedy decoding of spliced prompt embeddings in llama.cpp (see the module docstring).
    Not thread-safe on its own: :class:`PiscoModel` calls it under its model lock."""

    def __init__(
        self,
        model: PiscoModel,
        weights: str = "f32",
        *,
        n_ctx: int | None = None,
        n_threads: int | None = None,
        directory: str | os.PathLike[str] | None = None,
    ) -> None:
        if weights not in WEIGHT_TYPES:
            raise PiscoInputError(f"weights must be one of {WEIGHT_TYPES}, got {weights!r}")
        llama_cpp = _require_llama_cpp()
        self._api = llama_cpp
        self.weights = weights
        self.fingerprint = model.fingerprint
        folder = Path(directory) if directory is not None else cache_dir() / "gguf"
        self.path = folder / f"decoder-{self.fingerprint}-{weights}.gguf"
        if not self.path.is_file():
            write_decoder_gguf(model, self.path, weights)
        kv = llama_cpp.GGML_TYPE_F32 if weights == "f32" else llama_cpp.GGML_TYPE_F16
        self.context = int(n_ctx or model.context_window or 2048)  # its KV cache is allocated
        self.llm = llama_cpp.Llama(
            str(self.path),
            n_ctx=self.context,
            n_batch=512,
            n_threads=n_threads or torch.get_num_threads(),
            type_k=kv,
            type_v=kv,
            verbose=False,
        )
        self._finalizer = weakref.finalize(self, self.llm.close)
        self.hidden = int(llama_cpp.llama_model_n_embd(self.llm.model))
        self.n_vocab = int(self.llm.n_vocab())

    def close(self) -> None:
        """Free the llama.cpp model and context (also done at exit, before llama_cpp's own
        module teardown, which would otherwise fail noisily)."""
        self._finalizer()

    def _decode_embeddings(self, embeds: np.ndarray) -> None:
        api, ctx = self._api, self.llm.ctx
        for start in range(0, len(embeds), 512):
            part = np.ascontiguousarray(embeds[start : start + 512], dtype=np.float32)
            batch = api.llama_batch_init(len(part), self.hidden, 1)
            try:
                batch.n_tokens = len(part)
                ctypes.memmove(batch.embd, part.ctypes.data, part.nbytes)
                for i in range(len(part)):
                    batch.pos[i] = start + i
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = 0
                    batch.logits[i] = int(start + i == len(embeds) - 1)
                if api.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama.cpp could not read the prompt embeddings")
            finally:
                api.llama_batch_free(batch)

    def stream_ids(
        self,
        embeds: torch.Tensor,
        max_new_tokens: int,
        *,
        eos_ids: Sequence[int],
        min_new_tokens: int = 0,
        should_stop: Callable[[list[int]], bool] | None = None,
    ) -> Iterator[int]:
        """Greedy token ids after a prompt given as input embeddings ``[tokens, hidden]``;
        ends after an eos id (yielded) or ``max_new_tokens``, or when ``should_stop(ids)``."""
        api, ctx = self._api, self.llm.ctx
        if len(embeds) + max_new_tokens > self.context:
            raise PiscoInputError(
                f"a prompt of {len(embeds)} tokens and {max_new_tokens} new ones do not fit "
                f"llama.cpp's context of {self.context}: set_decoding_backend(..., n_ctx=...)"
            )
        self.llm._ctx.kv_cache_clear()
        self._decode_embeddings(embeds.detach().float().cpu().numpy())
        eos = [t for t in eos_ids if t is not None and t < self.n_vocab]
        batch = api.llama_batch_init(1, 0, 1)
        try:
            ids: list[int] = []
            for step in range(max_new_tokens):
                logits = np.ctypeslib.as_array(api.llama_get_logits_ith(ctx, -1), (self.n_vocab,))
                if step < min_new_tokens and eos:
                    logits = logits.copy()
                    logits[eos] = -np.inf
                token = int(logits.argmax())
                ids.append(token)
                yield token
                if token in eos or step == max_new_tokens - 1:
                    return
                if should_stop is not None and should_stop(ids):
                    return
                batch.n_tokens = 1
                batch.token[0] = token
                batch.pos[0] = len(embeds) + step
                batch.n_seq_id[0] = 1
                batch.seq_id[0][0] = 0
                batch.logits[0] = 1
                if api.llama_decode(ctx, batch) != 0:
                    raise RuntimeError("llama.cpp failed to decode a token")
        finally:
            api.llama_batch_free(batch)


__all__ = ["WEIGHT_TYPES", "LlamaCppDecoder", "write_decoder_gguf"]
