"""Decoder prompts: chat rendering with memory slots, tag parsing, and tokenisation.

A prompt is a list of chat turns whose content mixes text and :class:`Memory` objects. Each
memory becomes the slot ``<MEM0>..<MEM{n-1}><SEP>`` in the rendered prompt; the model later
writes the memory vectors into the input embeddings at the ``<MEMi>`` positions.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

import torch
from transformers import PreTrainedTokenizerBase

from .errors import DocumentTooLongError, PiscoInputError
from .memory import Memory
from .tags import LOOSE_TAG_PATTERN, TAG_PATTERN
from .tokenizing import tokenize

logger = logging.getLogger(__name__)
Segment = Union[str, Memory]  # noqa: UP007 (runtime alias)

# Used for tokenizers without a chat template (base models, tiny test models).
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}"
    "\n\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)
_SENTINEL = re.compile("\ue000(\\d+)\ue001")


@dataclass
class ChatTurn:
    role: str
    content: list[Segment]


@dataclass
class RenderedPrompt:
    """Token ids of one prompt and the memories for its slots, in slot order."""

    input_ids: list[int]
    memories: list[Memory]


def split_tags(text: str, resolve: Callable[[str, str], Memory | None]) -> list[Segment]:
    """Split ``text`` at memory tags, resolving each with ``resolve(key, mac)``.

    Only tags that ``resolve`` accepts become memories: anything else shaped like a tag (a
    malformed one, or one minted by another store, so ``resolve`` returns None) stays text, so
    a document or user that merely contains tag-like text can never fail or hijack a request.
    """
    segments: list[Segment] = []
    pos = 0
    for loose in LOOSE_TAG_PATTERN.finditer(text):
        strict = TAG_PATTERN.fullmatch(loose.group(0))
        memory = resolve(strict.group(1), strict.group(2)) if strict else None
        if memory is None:
            logger.debug("text shaped like a memory tag is read as text: %r", loose.group(0))
            continue
        if loose.start() > pos:
            segments.append(text[pos : loose.start()])
        segments.append(memory)
        pos = loose.end()
    if pos < len(text):
        segments.append(text[pos:])
    return segments


class PromptRenderer:
    """Turns chat turns with memories into token ids, with the backbone's chat template."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, n_mem: int, sep_token: str = "<SEP>"
    ) -> None:
        self.tokenizer = tokenizer
        self.n_mem = n_mem
        self.slot = "".join(f"<MEM{i}>" for i in range(n_mem)) + sep_token
        self._reserved = [t for t in tokenizer.get_added_vocab() if t]

    def pisco_turns(
        self, question: str, contexts: Sequence[Segment], system_prompt: str
    ) -> list[ChatTurn]:
        """The PISCO prompt: ``Background:`` + one slot per memory (text passages inline) +
        ``Question:``."""
        content: list[Segment] = ["Background:\n"]
        for ctx in contexts:
            content.extend([ctx] if isinstance(ctx, Memory) else [ctx, "\n"])
        content.append("\n\nQuestion:" + question)
        return [ChatTurn("system", [system_prompt]), ChatTurn("user", content)]

    def render(
        self, turns: Sequence[ChatTurn], add_generation_prompt: bool = True
    ) -> RenderedPrompt:
        texts: list[str] = []
        memories: list[Memory] = []
        messages = []
        for turn in turns:
            parts = []
            for seg in turn.content:
                if isinstance(seg, Memory):
                    parts.append(self.slot)
                    memories.append(seg)
                elif seg:
                    parts.append(f"\ue000{len(texts)}\ue001")
                    texts.append(seg)
            messages.append({"role": turn.role, "content": "".join(parts)})
        rendered = self._apply_template(messages, add_generation_prompt)
        ids = self._tokenize(rendered, texts)
        return RenderedPrompt(ids, memories)

    def _apply_template(self, messages: list[dict], add_generation_prompt: bool) -> str:
        template = None if self.tokenizer.chat_template else FALLBACK_CHAT_TEMPLATE
        kwargs = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
        try:
            return self.tokenizer.apply_chat_template(messages, chat_template=template, **kwargs)
        except Exception as e:  # jinja raises TemplateError for templates without a system role
            if messages[0]["role"] != "system" or len(messages) < 2:
                raise
            if "system" not in str(e).lower():
                raise
            merged = [
                {
                    "role": messages[1]["role"],
                    "content": messages[0]["content"] + "\n" + messages[1]["content"],
                },
                *messages[2:],
            ]
            return self.tokenizer.apply_chat_template(merged, chat_template=template, **kwargs)

    def _tokenize(self, rendered: str, texts: list[str]) -> list[int]:
        tok = self.tokenizer
        unsafe = any(r in t for t in texts for r in self._reserved)
        if not unsafe:  # common case: tokenise the whole prompt at once, exactly as reference code
            full = _SENTINEL.sub(lambda m: texts[int(m.group(1))], rendered)
            return tokenize(tok, full, add_special_tokens=False)["input_ids"]
        # Some text contains special-token strings (say "<MEM0>" or "<|im_end|>"): tokenise
        # text pieces with special tokens split, so text can never become a slot or a turn end.
        ids: list[int] = []
        pos = 0
        for m in _SENTINEL.finditer(rendered):
            if m.start() > pos:
                ids += tokenize(tok, rendered[pos : m.start()], add_special_tokens=False)[
                    "input_ids"
                ]
            piece = texts[int(m.group(1))]
            ids += text_ids(tok, piece)
            pos = m.end()
        if pos < len(rendered):
            ids += tokenize(tok, rendered[pos:], add_special_tokens=False)["input_ids"]
        return ids


def check_segment(seg: object, where: str) -> Segment:
    if isinstance(seg, Memory):
        return seg
    if not isinstance(seg, str):
        raise PiscoInputError(f"{where} must be a Memory or a str, got {type(seg).__name__}")
    if not seg.strip():
        raise PiscoInputError(f"{where} is an empty string; drop it or give text")
    return check_encodable(seg, where)


def check_batch_size(batch_size: object) -> int:
    """``batch_size`` if it is a positive int, else a clear error."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise PiscoInputError(f"batch_size must be a positive int, got {batch_size!r}")
    return batch_size


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows left-padded to the longest: ``(ids, attention mask)``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(list(r), dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids, mask


def check_encodable(text: str, where: str) -> str:
    """``text`` if it is valid Unicode (no lone surrogates, which no tokenizer can encode)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PiscoInputError(
            f"{where} holds a lone surrogate ({text[e.start : e.end]!r} at {e.start}), which is "
            "not text: decode the source with errors='replace' or remove it"
        ) from None
    return text


def text_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of document or query text, special-token strings included as plain text (a
    document that spells ``<MEM0>`` or ``<|im_end|>`` never becomes a control token)."""
    return tokenize(tokenizer, text, add_special_tokens=False, split_special_tokens=True)[
        "input_ids"
    ]


def pisco_encoder_inputs(
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    mem_token_ids: Sequence[int],
    width: int | None,
    *,
    naver_truncation: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PISCO compressor inputs (naver's layout): ``<ENC>`` bos text eos, left-padded to
    ``width`` tokens (``None``: the longest of the batch), then the memory tokens. The wrapper
    is added as ids. A fixed ``width`` makes a memory independent of the rest of its batch.
    ``naver_truncation`` cuts each row to ``width`` as naver's tokenizer call does (keeping
    ``<ENC>``, bos and the first ``width - 2`` text tokens, no eos); otherwise a row longer than
    ``width`` is a :class:`DocumentTooLongError`."""
    enc, bos, eos = (
        tokenizer.convert_tokens_to_ids("<ENC>"),
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
    )
    rows = [[enc, bos, *text_ids(tokenizer, t), eos] for t in texts]
    if width is None:
        width = max(len(r) for r in rows)
    for r in rows:
        if len(r) > width and not naver_truncation:
            raise DocumentTooLongError(
                f"a chunk has {len(r) - 3} tokens, more than the compressor's {width - 3}; pass "
                "documents through compress(), which chunks them"
            )
    rows = [r[:width] for r in rows]
    pad = tokenizer.pad_token_id
    n = len(rows)
    ids = torch.full((n, width + len(mem_token_ids)), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) : width] = torch.tensor(r)
        mask[i, width - len(r) :] = 1
    ids[:, width:] = torch.tensor(list(mem_token_ids))
    return ids, mask
