"""Tokenizer calls that threads can share.

A fast (Rust-backed) tokenizer keeps ``split_special_tokens`` and its padding and truncation
settings as state of the one Rust tokenizer, and every call sets them before it encodes. Two
threads calling it with different settings at once (a document tokenised with special-token
strings split, a prompt with its ``<MEM0>`` slots kept) would each encode with the other's:
a slot turned into text, or a document's ``<MEM0>`` into a slot. Every tokenizer call of the
library goes through :func:`tokenize`, which holds one lock for the call.
"""

from __future__ import annotations

import threading
from typing import Any

from transformers import PreTrainedTokenizerBase

_LOCK = threading.Lock()


def tokenize(tokenizer: PreTrainedTokenizerBase, *args: Any, **kwargs: Any) -> Any:
    """``tokenizer(*args, **kwargs)``, never at the same time as another call made here."""
    with _LOCK:
        return tokenizer(*args, **kwargs)
