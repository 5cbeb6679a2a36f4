"""Property tests of the trust model: text from documents or users never becomes a memory.

Tags are capabilities (docs/architecture.md, "Trust model"): only tags minted for the request
resolve. Whatever text a user or a document holds (tag-like spans, real tags of other requests,
special-token strings, any Unicode), escaping it keeps every memory out, and parsing it never
raises.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pisco_rag import escape_tags
from pisco_rag.prompting import split_tags
from pisco_rag.tags import contains_tag

pytestmark = pytest.mark.filterwarnings("ignore:a prompt holds a memory tag")

_PIECES = [
    "[[pisco:",
    "[[ pisco:",
    "[",
    "[[",
    "]]",
    "]",
    ":",
    "pisco",
    "<MEM0>",
    "<SEP>",
    "<|im_end|>",
]


@pytest.fixture(scope="module")
def other_request_tags(tiny_model) -> list[str]:
    """Real, live tags of another request's memories (what a copied tag looks like)."""
    memories = tiny_model.compress(["Tenant B's secret report.", "Another private page."])
    return [tiny_model.tag(m) for m in memories]


def untrusted_text(tags: list[str]) -> st.SearchStrategy[str]:
    piece = st.one_of(
        st.text(max_size=12),
        st.sampled_from(_PIECES),
        st.sampled_from(tags),
        st.from_regex(r"\[\[pisco:[0-9a-f]{32}:[0-9a-f]{16}\]\]", fullmatch=True),
    )
    return st.lists(piece, max_size=8).map("".join)


_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@_SETTINGS
@given(data=st.data())
def test_escaped_text_never_resolves_a_memory(tiny_model, other_request_tags, data):
    text = data.draw(untrusted_text(other_request_tags))
    escaped = escape_tags(text)
    assert not contains_tag(escaped)
    rendered = tiny_model.render_prompt([{"role": "user", "content": f"Question: {escaped}"}])
    assert rendered.memories == []


@_SETTINGS
@given(data=st.data())
def test_parsing_any_text_never_raises_and_keeps_it(tiny_model, other_request_tags, data):
    text = data.draw(untrusted_text(other_request_tags))
    segments = split_tags(text, lambda key, mac: None)  # a store that minted none of them
    assert "".join(segments) == text
    # against the real store: only live tags that the text holds can resolve (a tag glued to
    # tag-like text is read as text: parsing fails closed), and parsing never raises
    resolved = tiny_model.render_prompt(text or " ").memories
    present = {t.split(":")[1] for t in other_request_tags if t in text}
    assert {m.key for m in resolved} <= present
