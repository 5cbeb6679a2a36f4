"""Splitting text into chunks the compressor takes (at most ``doc_max_length`` tokens each)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from .tokenizing import tokenize


def count_tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> int:
    """Tokens of ``text`` as the compressor reads it: special-token strings count as text."""
    ids = tokenize(tokenizer, text, add_special_tokens=False, split_special_tokens=True)
    return len(ids["input_ids"])


def chunk_text(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> list[str]:
    """Split ``text`` into consecutive substrings of at most ``max_tokens`` tokens each.

    Chunks are balanced (a 130-token text gives two of about 65, not 128 + 2) and cuts fall on
    word boundaries where one lies in the second half of a window; every chunk is an exact
    (whitespace-stripped) substring of ``text`` and no text is dropped.
    """
    enc = tokenize(
        tokenizer,
        text,
        add_special_tokens=False,
        split_special_tokens=True,
        return_offsets_mapping=True,
    )
    offsets = enc["offset_mapping"]
    n = len(offsets)
    if n <= max_tokens:
        return [text]
    target = -(-n // -(-n // max_tokens))  # ceil(n / number of chunks)
    chunks: list[str] = []
    start = 0
    while start < n:
        end = min(start + target, n)
        if end < n:
            for j in range(end, start + target // 2, -1):
                s = offsets[j][0]
                if text[s : s + 1].isspace() or (s > 0 and text[s - 1].isspace()):
                    end = j
                    break
        while True:
            piece = text[offsets[start][0] : offsets[end - 1][1]].strip()
            if end - start <= 1 or count_tokens(tokenizer, piece) <= max_tokens:
                break
            end -= 1  # re-tokenising the substring merged differently: take one token less
        if piece:
            chunks.append(piece)
        start = end
    return chunks
