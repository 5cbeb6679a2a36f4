"""Memory tags: short ASCII stand-ins for memories inside text prompts.

A tag looks like ``[[pisco:<key>:<mac>]]``: ``key`` is the memory's store key and ``mac`` an HMAC
of it under a secret minted by the store that holds the memory. Tags survive ``str.format``,
chat templates and whitespace changes (no braces, no spaces).

A tag is a bearer capability for one memory of one store: whoever puts it into a prompt splices
that memory. So text that comes from documents, metadata or users must never carry a live tag:
the framework compressors pass such text through :func:`escape_tags`, and text that only looks
like a tag (wrong HMAC, malformed) is read as plain text (see ``docs/architecture.md``, "Trust
model").
"""

from __future__ import annotations

import hashlib
import hmac
import re

TAG_KEY = re.compile(r"[0-9a-f]{32}")  # memory_key's form
TAG_PATTERN = re.compile(r"\[\[pisco:([0-9a-f]{32}):([0-9a-f]{16})\]\]")
# Anything shaped roughly like a tag: read as text unless it is a valid tag of the store.
LOOSE_TAG_PATTERN = re.compile(r"\[\[\s*pisco:[^\]]*\]\]")


def tag_mac(secret: bytes, key: str) -> str:
    return hmac.new(secret, key.encode("ascii"), hashlib.sha256).hexdigest()[:16]


def make_tag(secret: bytes, key: str) -> str:
    return f"[[pisco:{key}:{tag_mac(secret, key)}]]"


def verify_tag(secret: bytes, key: str, mac: str) -> bool:
    return hmac.compare_digest(tag_mac(secret, key), mac)


def contains_tag(text: str) -> bool:
    return LOOSE_TAG_PATTERN.search(text) is not None


_TAG_OPENING = re.compile(r"\[(\s*)\[(\s*)pisco:")


def escape_tags(text: str) -> str:
    """``text`` with every tag-like span defused (``[[pisco:`` becomes ``[ [pisco:``), so that it
    reads the same to people and models but can never resolve to a memory. Use it on any
    untrusted text (a user's question, a retrieved page) that goes into a prompt next to tags."""
    if not isinstance(text, str):
        raise TypeError(f"escape_tags takes a str, got {type(text).__name__}")
    return _TAG_OPENING.sub(r"[ \1[\2pisco:", text)
