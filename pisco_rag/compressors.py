"""Compressors other than PISCO's encoder adapter: the parameter-free ``token-mean`` one, and
OSCAR's query-dependent compression with a network much cheaper than the backbone.

``token-mean`` (:func:`token_mean_memories`): memory *i* of a chunk is the mean input
embedding of its *i*-th of ``n_mem`` equal segments (``compression_rate`` tokens in a full
chunk), rescaled to the embeddings' norm. Nothing to train or run: the decoder adapter learns
to read these memories.

OSCAR has two kinds, both a causal-LM body whose last hidden states at the memory-token
positions are the memories, plus an optional reranking head:

- ``first-layers``: the first N layers of the backbone (final norm removed unless
  ``rms_norm``); input ``"\\nQuery:\\n" + query + "Document:\\n" + document``.
- ``model``: a separate small causal LM and a Linear-ReLU-Linear connector to the decoder's
  hidden size; input the tokenizer pair ``(query, document)``.

The memory tokens ``<MEM0>..<MEM{n-1}>`` follow the text; with a reranking head a ``<RR>`` token
follows them, and a dense layer on its hidden state gives the relevance score. Causal attention
means the ``<RR>`` token never changes the memories: one forward pass gives both.
With ``rerank_interaction`` the score adds a late-interaction term (as in ColBERT) computed
from the same last hidden states: each query token's best cosine similarity to a token after
the query, averaged over the query's tokens (states centred on the sequence's mean first: a few
huge shared dimensions dominate raw states), times a learned scale. It ranks passages well
with no training at all, where the head needs a great deal.
Padding goes to a fixed length (``doc_max_length`` + margin, more only for long queries), so a
document's memory does not depend on the rest of its batch, and nothing is ever truncated.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import checkpoints
from .tokenizing import tokenize
from .verbosity import quiet_loading

RERANK_TOKEN = "<RR>"
INTERACTION_SCALE = 20.0  # initial scale of the late-interaction term (cosines differ by ~0.1)
QUERY_PREFIX, DOCUMENT_PREFIX = "\nQuery:\n", "Document:\n"


class QueryCompressor(nn.Module):
    """A compressor body (a transformers base model), connector and optional reranking head."""

    def __init__(
        self,
        body: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        *,
        kind: str,
        n_mem: int,
        doc_max_length: int,
        decoder_hidden: int,
        connector_hidden: int | None,
        rerank_head: bool,
        rerank_interaction: bool = False,
    ) -> None:
        super().__init__()
        if kind not in ("first-layers", "model"):
            raise ValueError(f"compressor kind must be 'first-layers' or 'model', not {kind!r}")
        self.body = body
        self.tokenizer = tokenizer
        self.kind = kind
        self.n_mem = n_mem
        self.doc_max_length = doc_max_length
        hidden = int(body.config.hidden_size)
        if connector_hidden:
            self.connector: nn.Module | None = nn.Sequential(
                nn.Linear(hidden, connector_hidden),
                nn.ReLU(),
                nn.Linear(connector_hidden, decoder_hidden),
            )
        elif hidden != decoder_hidden:
            raise ValueError(
                f"the compressor's hidden size ({hidden}) differs from the decoder's "
                f"({decoder_hidden}): a connector (connector_hidden) is required"
            )
        else:
            self.connector = None
        self.head = nn.Linear(hidden, 1) if rerank_head else None
        self.interaction_scale = (
            nn.Parameter(torch.tensor(INTERACTION_SCALE)) if rerank_interaction else None
        )
        tokens = [f"<MEM{i}>" for i in range(n_mem)]
        self.mem_token_ids = tokenizer.convert_tokens_to_ids(tokens)
        self.rerank_token_id = (
            tokenizer.convert_tokens_to_ids(RERANK_TOKEN) if rerank_head else None
        )

    @property
    def interaction(self) -> bool:
        """Whether scores include the late-interaction term (and need a query mask)."""
        return self.interaction_scale is not None

    def encode_inputs(
        self, texts: Sequence[str], queries: Sequence[str] | None, *, query_mask: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Token ids and attention mask: text (with its query), then memory (and rerank) tokens;
        with ``query_mask`` also a mask of the query's tokens (what the interaction term needs).
        """
        tok = self.tokenizer
        if queries is None:
            first, second, margin = list(texts), None, 2
        elif self.kind == "first-layers":
            first = [
                f"{QUERY_PREFIX}{q}{DOCUMENT_PREFIX}{t}"
                for q, t in zip(queries, texts, strict=True)
            ]
            second, margin = None, 8
        else:
            first, second, margin = list(queries), list(texts), 3
        # split_special_tokens: a document or query that spells <MEM0>, <RR> or <|im_end|> stays
        # text; only the ids appended below are control tokens
        split = {"add_special_tokens": True, "split_special_tokens": True}
        longest = max(len(ids) for ids in tokenize(tok, first, second, **split)["input_ids"])
        want_query = query_mask and queries is not None and self.kind == "first-layers"
        enc = tokenize(
            tok,
            first,
            second,
            return_tensors="pt",
            padding="max_length",
            max_length=max(self.doc_max_length + margin, longest),
            return_offsets_mapping=want_query,
            **split,
        )
        extra = self.mem_token_ids + ([self.rerank_token_id] if self.head is not None else [])
        tail = torch.tensor(extra).expand(len(first), -1)
        ids = torch.cat([enc["input_ids"], tail], dim=1)
        mask = torch.cat([enc["attention_mask"], torch.ones_like(tail)], dim=1)
        if not query_mask:
            return ids, mask
        if not want_query:
            raise ValueError("a query mask needs queries and a first-layers compressor")
        # the query's tokens: those whose characters lie inside it (pads have empty spans)
        start = torch.tensor([len(QUERY_PREFIX)] * len(first)).unsqueeze(1)
        end = start + torch.tensor([len(q) for q in queries]).unsqueeze(1)
        spans = enc["offset_mapping"]
        inside = (spans[..., 0] >= start) & (spans[..., 1] <= end) & (spans[..., 1] > spans[..., 0])
        return ids, mask, torch.cat([inside.long(), torch.zeros_like(tail)], dim=1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        query_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(memories ``[batch, n_mem, decoder_hidden]``, scores ``[batch]`` or None). With the
        interaction term, scores need ``query_mask`` (``encode_inputs(..., query_mask=True)``):
        without it (no query) there are none."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask)[0]
        n_tail = self.n_mem + (1 if self.head is not None else 0)
        memories = hidden[:, -n_tail:][:, : self.n_mem]
        if self.connector is not None:
            memories = self.connector(memories)
        scores = self.head(hidden[:, -1]).squeeze(-1) if self.head is not None else None
        if scores is not None and self.interaction_scale is not None:
            if query_mask is None:
                return memories, None
            term = late_interaction(hidden[:, :-n_tail], attention_mask[:, :-n_tail], query_mask)
            scores = scores + self.interaction_scale * term
        return memories, scores


def late_interaction(
    hidden: torch.Tensor, attention_mask: torch.Tensor, query_mask: torch.Tensor
) -> torch.Tensor:
    """Per sequence, the mean over query tokens of their best cosine similarity to a token after
    the query, on hidden states centred on the sequence's mean (its real tokens)."""
    real = attention_mask.bool()
    query = query_mask[:, : hidden.shape[1]].bool() & real
    position = torch.arange(hidden.shape[1], device=hidden.device)
    last_query = torch.where(query, position, -1).amax(-1, keepdim=True)
    after = real & (position > last_query)
    weights = real.unsqueeze(-1).to(hidden.dtype)
    mean = (hidden * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
    states = nn.functional.normalize(hidden - mean, dim=-1)
    similarity = states @ states.transpose(1, 2)  # [batch, positions, positions]
    best = similarity.masked_fill(~after.unsqueeze(1), float("-inf")).amax(-1)
    best = torch.where(query & after.any(-1, keepdim=True), best, 0.0)
    return best.sum(-1) / query.sum(-1).clamp(min=1)


def token_mean_memories(
    embeddings: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_mem: int,
    skip_ids: set[int],
) -> torch.Tensor:
    """``[rows, n_mem, hidden]``: memory *i* of a row is the mean of the ``embeddings`` rows of
    the *i*-th of ``n_mem`` equal segments of its text tokens (padding and ``skip_ids``, the
    wrapper and memory tokens, left out), rescaled to the mean norm of the embedding rows. A
    text shorter than ``n_mem`` tokens repeats tokens (every memory holds at least one)."""
    target_norm = embeddings.norm(dim=-1).mean()
    skip = torch.tensor(sorted(skip_ids), device=input_ids.device)
    keep = attention_mask.bool() & ~torch.isin(input_ids, skip)
    rows = []
    for ids, kept in zip(input_ids, keep, strict=True):
        ids = ids[kept]
        if len(ids) == 0:
            raise ValueError("token_mean_memories: a row has no text tokens")
        bounds = [i * len(ids) // n_mem for i in range(n_mem + 1)]
        means = [embeddings[ids[a : max(b, a + 1)]].mean(0) for a, b in itertools.pairwise(bounds)]
        rows.append(torch.stack(means))
    memories = torch.stack(rows)
    return memories / memories.norm(dim=-1, keepdim=True) * target_norm


def first_layers_body(backbone: nn.Module, n_layers: int, rms_norm: bool) -> nn.Module:
    """A new base model holding copies of the backbone's embeddings and first ``n_layers``."""
    from transformers import AutoModel

    base = backbone.base_model if hasattr(backbone, "base_model") else backbone
    total = int(backbone.config.num_hidden_layers)
    if not 1 <= n_layers <= total:
        raise ValueError(f"first-layers:{n_layers}: the backbone has {total} layers")
    config = backbone.config.__class__.from_dict(backbone.config.to_dict())
    config.num_hidden_layers = n_layers
    if hasattr(config, "layer_types") and config.layer_types is not None:
        config.layer_types = config.layer_types[:n_layers]
    body = AutoModel.from_config(config)
    state = {k: v for k, v in base.state_dict().items() if "lora_" not in k}
    state = {k.replace(".base_layer.", "."): v for k, v in state.items()}
    missing, _ = body.load_state_dict(state, strict=False)
    if [k for k in missing if not k.startswith("norm")]:
        raise ValueError(f"could not copy the backbone's first layers (missing {missing[:3]})")
    if not rms_norm:
        body.norm = nn.Identity()
    param = next(backbone.parameters())
    move_keeping_float32_buffers(body, param.device, param.dtype)
    return body


def add_compressor_tokens(
    tokenizer: PreTrainedTokenizerBase, n_mem: int, rerank_head: bool
) -> None:
    """Memory tokens (and the rerank token) on the compressor's tokenizer; pad = bos if absent."""
    tokens = [f"<MEM{i}>" for i in range(n_mem)] + ([RERANK_TOKEN] if rerank_head else [])
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.bos_token or tokenizer.eos_token


def build_compressor(
    config,
    backbone: nn.Module,
    backbone_tokenizer: PreTrainedTokenizerBase,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    lora_weights: dict[str, torch.Tensor] | None = None,
    token_rows: dict[str, torch.Tensor] | None = None,
    local_files_only: bool = False,
) -> QueryCompressor:
    """The OSCAR compressor a :class:`PiscoConfig` describes.

    ``backbone`` and ``backbone_tokenizer`` are the decoder's, before its special tokens are
    added. ``weights`` (keys ``body.*``, ``connector.*``, ``head.*``) replace the initial
    values; ``lora_weights`` is a LoRA adapter of the body: merged into it for naver checkpoints
    whose compressor was LoRA-tuned, kept as an adapter for compact native ones;
    ``token_rows`` (``ids``, ``values``) are the body's embedding rows of the added tokens
    (compact native ones).
    """
    import copy

    if config.compressor == "first-layers":
        source, tokenizer = backbone, copy.deepcopy(backbone_tokenizer)
        if config.compressor_model and config.compressor_model != config.backbone:
            source, tokenizer = checkpoints.load_backbone(
                config.compressor_model, dtype=None, local_files_only=local_files_only
            )
        body = first_layers_body(source, config.compressor_layers, config.compressor_rms_norm)
    else:
        lm, tokenizer = checkpoints.load_backbone(
            config.compressor_model, dtype=None, local_files_only=local_files_only
        )
        body = lm.base_model
    add_compressor_tokens(tokenizer, config.compressor_n_mem, config.rerank_head)
    if config.compressor_padding_side:
        tokenizer.padding_side = config.compressor_padding_side
    with quiet_loading():  # transformers explains its mean-resizing of new rows at length
        body.resize_token_embeddings(len(tokenizer))
    if lora_weights is not None:
        # naver's adapters are merged; a native compact one stays a LoRA adapter, so that
        # saving the model again stores it by reference again
        body = _apply_lora(
            body, lora_weights, config.compressor_lora_r or config.lora_r, merge=token_rows is None
        )
    if token_rows is not None:
        table = body.get_input_embeddings().weight
        with torch.no_grad():
            table[token_rows["ids"].long()] = token_rows["values"].to(table.dtype)
    compressor = QueryCompressor(
        body,
        tokenizer,
        kind=config.compressor,
        n_mem=config.compressor_n_mem,
        doc_max_length=config.doc_max_length,
        decoder_hidden=int(backbone.config.hidden_size),
        connector_hidden=config.connector_hidden,
        rerank_head=config.rerank_head,
        rerank_interaction=config.rerank_interaction,
    )
    if weights is not None:
        missing, unexpected = compressor.load_state_dict(weights, strict=False)
        # a checkpoint from before rerank_interaction keeps the initial scale
        missing = [k for k in missing if k != "interaction_scale"]
        if unexpected or (missing and lora_weights is None):
            raise ValueError(
                f"compressor weights do not fit the configured compressor (missing "
                f"{missing[:3]}, unexpected {unexpected[:3]})"
            )
    param = next(backbone.parameters())
    move_keeping_float32_buffers(compressor, param.device, param.dtype)
    return compressor


def _apply_lora(body: nn.Module, adapter: dict[str, torch.Tensor], r: int, merge: bool):
    """``body`` with the LoRA ``adapter`` (keys relative to the body) loaded; merged into the
    weights, or (``merge=False``) kept as peft's ``default`` adapter."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
    wrapped = get_peft_model(body, config)
    state = {f"base_model.model.{k}": v for k, v in adapter.items()}
    result = set_peft_model_state_dict(wrapped, state)
    if [k for k in result.unexpected_keys if "lora_" in k]:
        raise ValueError(f"the compressor adapter does not fit ({result.unexpected_keys[:3]})")
    return wrapped.merge_and_unload() if merge else wrapped


def compact_compressor_state(
    compressor: QueryCompressor,
) -> tuple[dict[str, torch.Tensor], int | None]:
    """What a native checkpoint stores of an OSCAR compressor, and its LoRA rank (or None).

    A first-layers compressor LoRA-tuned in training (its body a peft model) is stored by
    reference, like the decoder: LoRA factors (``lora.*``), the embedding rows of its added
    tokens (``token_rows.*``) and the non-body weights; loading copies the backbone's first
    layers again and puts the adapter back on them. Any other compressor is stored whole.
    """
    from peft import PeftModel, get_peft_model_state_dict

    body = compressor.body
    if compressor.kind != "first-layers" or not isinstance(body, PeftModel):
        return compressor.state_dict(), None
    lora = get_peft_model_state_dict(body, save_embedding_layers=False)
    out = {f"lora.{k.removeprefix('base_model.model.')}": v for k, v in lora.items()}
    out.update({k: v for k, v in compressor.state_dict().items() if not k.startswith("body.")})
    ids = [*compressor.mem_token_ids]
    if compressor.rerank_token_id is not None:
        ids.append(compressor.rerank_token_id)
    index = torch.tensor(ids, dtype=torch.long)
    out["token_rows.ids"] = index
    out["token_rows.values"] = body.get_input_embeddings().weight[index].detach()
    return out, int(body.peft_config["default"].r)


def split_compact_compressor_state(
    weights: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, torch.Tensor] | None]:
    """(weights, lora_weights, token_rows) of a stored compressor (see compact_compressor_state)."""
    lora = {k[5:]: v for k, v in weights.items() if k.startswith("lora.")}
    rows = {k[11:]: v for k, v in weights.items() if k.startswith("token_rows.")}
    rest = {k: v for k, v in weights.items() if not k.startswith(("lora.", "token_rows."))}
    return rest, lora or None, rows or None


def naver_compressor_weights(
    full: dict[str, torch.Tensor] | None,
    mlp: dict[str, torch.Tensor] | None,
    first_layer: dict[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """naver's ``compressor/`` files as ``body.*``/``connector.*`` keys (build_compressor)."""
    out: dict[str, torch.Tensor] = {}
    for source in (full, first_layer):
        for key, value in (source or {}).items():
            if "lm_head" in key:
                continue  # the trimmed compressor keeps a head it never uses
            for prefix in ("custom_model.model.", "model."):
                if key.startswith(prefix):
                    key = key[len(prefix) :]
                    break
            out[f"body.{key}"] = value
    out.update({f"connector.{k}": v for k, v in (mlp or {}).items()})
    return out


def strip_adapter_prefix(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """naver's trimmed-compressor adapter keys are relative to a causal LM: make them relative
    to its base model."""
    return {k.removeprefix("model."): v for k, v in adapter.items()}


def move_keeping_float32_buffers(
    module: torch.nn.Module, device: torch.device, dtype: torch.dtype
) -> None:
    """``module.to(device, dtype)``, except that float32 buffers stay float32 (rotary
    ``inv_freq`` and the like), as transformers keeps them when it loads in a dtype: a
    bf16 ``inv_freq`` shifts rotary angles by tenths of a radian at a few hundred tokens."""
    keep = {name: buf for name, buf in module.named_buffers() if buf.dtype == torch.float32}
    module.to(device=device, dtype=dtype)
    for name, buf in keep.items():
        owner, _, attr = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        target._buffers[attr] = buf.to(device)
