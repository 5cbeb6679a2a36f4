"""Memory tags: short ASCII stand-ins for memories inside text prompts.

A tag looks like ``[[pisco:<key>:<mac>]]``: ``key`` is the memory's store key and ``mac`` an HMAC
of it under a secret minted by the store that holds the memory. Tags survive ``str.format``,
chat templates and whitespace changes (no braces, no spaces). Text that only looks like a tag
(for instance inside a retrieved document) fails the HMAC and is never resolved.
"""

from __future__ import annotations

import hashlib
import hmac
import re

TAG_PATTERN = re.compile(r"\[\[pisco:([0-9a-f]{32}):([0-9a-f]{16})\]\]")
# Anything shaped roughly like a tag, to report malformed ones instead of passing them as text.
LOOSE_TAG_PATTERN = re.compile(r"\[\[\s*pisco:[^\]]*\]\]")


def tag_mac(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode("ascii"), hashlib.sha256).hexdigest()[:16]


def make_tag(secret: bytes, key: str) -> str:
    return f"[[pisco:{key}:{tag_mac(secret, key)}]]"


def verify_tag(secret: bytes, key: str, mac: str) -> bool:
    return hmac.compare_digest(tag_mac(secret, key), mac)


def contains_tag(text: str) -> bool:
    return LOOSE_TAG_PATTERN.search(text) is not None
