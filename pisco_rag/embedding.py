"""Dense retrieval on the PISCO backbone: queries and passages as normalised vectors.

One backbone serves retrieval, compression and generation (Invar-RAG, arXiv 2411.07021): the
``retriever_adapter`` (a third LoRA adapter, ``PiscoConfig.retriever``) turns it into a
bi-encoder. A model without one embeds with the plain backbone (adapters off), the untrained
baseline. Texts are read as ``[prefix +] text + eos`` with special-token strings kept as text;
the vector is the mean of the last hidden states over the text (``retriever_pooling="mean"``) or
the last token's (``"last"``), L2-normalised. Queries get ``retriever_query_prefix``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from .adapters import DECODER, RETRIEVER, use_adapter
from .errors import PiscoInputError
from .prompting import check_batch_size, check_encodable, left_pad, text_ids
from .verbosity import warn_once

if TYPE_CHECKING:
    from .model import PiscoModel

MAX_TOKENS = 512  # longer texts are cut, with a warning: embed chunks, as retrievers index them


def retrieval_rows(
    model: PiscoModel, texts: Sequence[str], prefix: str, crop: int | None = None
) -> list[list[int]]:
    """Token ids of ``prefix + text + eos`` for each text; ``crop`` keeps the first ``crop``
    tokens without a warning (training crops passages on purpose)."""
    tok = model.tokenizer
    rows = []
    for text in texts:
        ids = text_ids(tok, prefix + text)
        if crop is not None:
            ids = ids[: crop - 1]
        elif len(ids) >= MAX_TOKENS:
            warn_once(
                f"a text longer than {MAX_TOKENS} tokens was cut for embedding; embed chunks "
                "(PiscoModel.chunk) to retrieve from all of it"
            )
            ids = ids[: MAX_TOKENS - 1]
        rows.append([*ids, tok.eos_token_id])
    return rows


def encode_for_retrieval(
    model: PiscoModel, texts: Sequence[str], prefix: str, crop: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask of :func:`retrieval_rows`."""
    return left_pad(retrieval_rows(model, texts, prefix, crop), model.tokenizer.pad_token_id)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Normalised ``[batch, hidden]`` vectors from last hidden states of left-padded rows."""
    if pooling == "last":
        vectors = hidden[:, -1]
    else:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        vectors = (hidden * weights).sum(1) / weights.sum(1)
    return torch.nn.functional.normalize(vectors.float(), dim=-1)


def retrieval_hidden(model: PiscoModel, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states with the retriever adapter (or the plain backbone); the caller
    holds the model lock and restores the decoder adapter."""
    use_adapter(model.model, RETRIEVER if model.config.retriever else None)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return model.model.base_model(
        input_ids=ids.to(model.device),
        attention_mask=mask.to(model.device),
        position_ids=positions.to(model.device),
    )[0]


@torch.no_grad()
def embed(
    model: PiscoModel,
    texts: Sequence[str],
    *,
    query: bool,
    batch_size: int = 32,
    show_progress: bool = False,
) -> torch.Tensor:
    """``[len(texts), hidden]`` float32 unit vectors (queries with the query prefix)."""
    what = "queries" if query else "documents"
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise PiscoInputError(f"{what} must be a list of strings; wrap one text in a list")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise PiscoInputError(f"{what}[{i}] must be a non-empty string, got {t!r:.60}")
        check_encodable(t, f"{what}[{i}]")
    check_batch_size(batch_size)
    prefix = model.config.retriever_query_prefix if query else ""
    # longest first, so that each batch holds texts of similar length (little padding); the
    # vectors go back to the input order at the end
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out = []
    bar = tqdm(total=len(texts), desc=f"embedding {what}", disable=not show_progress)
    for start in range(0, len(texts), batch_size):
        batch = [texts[i] for i in order[start : start + batch_size]]
        ids, mask = encode_for_retrieval(model, batch, prefix)
        with model._lock:
            try:
                hidden = retrieval_hidden(model, ids, mask)
            finally:
                use_adapter(model.model, DECODER)
        out.append(pool(hidden, mask.to(hidden.device), model.config.retriever_pooling).cpu())
        bar.update(len(ids))
    bar.close()
    if not out:
        return torch.empty(0, model.hidden_size)
    vectors = torch.empty(len(texts), out[0].shape[-1])
    vectors[order] = torch.cat(out)
    return vectors
