"""Compressed nodes: the user sees the original text, the LLM sees memory tags.

LlamaIndex hands the LLM ``node.get_content(metadata_mode=MetadataMode.LLM)`` (response
synthesizers, chat engines) and shows users ``node.text`` / ``node.get_content()`` (the
``source_nodes`` of a response). A compressed node is a copy of the retrieved node, of a subclass
of its own class, that answers the LLM mode with the memory tags and every other mode with the
original text. The tags live in a private attribute: they are not serialised (``to_json``,
``to_dict``, pickling), so they never leave the process in a user-facing string.
"""

from __future__ import annotations

from typing import Any

from llama_index.core.bridge.pydantic import PrivateAttr
from llama_index.core.schema import BaseNode, MetadataMode, TextNode

from pisco_rag.tags import escape_tags

_CLASSES: dict[type[BaseNode], type[BaseNode]] = {}
_CONTENT = "\ue000pisco-content\ue001"  # private-use marks: cannot come from a template


class _CompressedContent:
    """Mixin placed before the node class: LLM-mode content is the memory tags."""

    _pisco_llm_text: str | None
    _pisco_llm_metadata: bool

    def get_content(self, metadata_mode: MetadataMode = MetadataMode.NONE) -> str:
        if metadata_mode != MetadataMode.LLM or self._pisco_llm_text is None:
            return super().get_content(metadata_mode)  # type: ignore[misc]
        metadata_str = ""
        if self._pisco_llm_metadata:
            metadata_str = self.get_metadata_str(mode=MetadataMode.LLM).strip()  # type: ignore[attr-defined]
        if not metadata_str:
            return self._pisco_llm_text
        template = getattr(self, "text_template", "{metadata_str}\n\n{content}")
        # everything but the tags this node was given is document data: escaped, it stays text
        around = template.format(content=_CONTENT, metadata_str=metadata_str).strip()
        return escape_tags(around).replace(_CONTENT, self._pisco_llm_text)

    def get_content_blocks(self, metadata_mode: MetadataMode = MetadataMode.NONE) -> list[Any]:
        if metadata_mode != MetadataMode.LLM or self._pisco_llm_text is None:
            return super().get_content_blocks(metadata_mode)  # type: ignore[misc]
        from llama_index.core.base.llms.types import TextBlock

        return [TextBlock(text=self.get_content(metadata_mode))]

    @property
    def pisco_tags(self) -> str | None:
        """The memory tags the LLM receives in place of the text (``None`` if not compressed)."""
        return self._pisco_llm_text


def compressed_node_class(base: type[BaseNode]) -> type[BaseNode]:
    """The compressed twin of a node class (``TextNode`` -> ``PiscoTextNode``), made once.

    The twin is a subclass, so ``isinstance`` checks, ids, relationships, metadata and the
    class name used for serialisation are those of the original class.
    """
    if issubclass(base, _CompressedContent):
        return base
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(
            f"Pisco{base.__name__}",
            (_CompressedContent, base),
            {
                "__module__": __name__,
                "__doc__": f"A compressed {base.__name__}: the LLM reads memory tags.",
                "_pisco_llm_text": PrivateAttr(default=None),
                "_pisco_llm_metadata": PrivateAttr(default=False),
            },
        )
        _CLASSES[base] = cls
        globals().setdefault(cls.__name__, cls)  # importable by name (pickle, repr)
    return cls


def compress_node(node: BaseNode, tags: str, *, llm_metadata: bool = False) -> BaseNode:
    """A copy of ``node`` whose LLM-mode content is ``tags``; everything else is unchanged.

    ``llm_metadata=True`` keeps the node's LLM metadata (``excluded_llm_metadata_keys`` apply)
    as text in front of the tags; by default the LLM reads the memories only, as PISCO does.
    """
    cls = compressed_node_class(type(node))
    data = {name: getattr(node, name) for name in type(node).model_fields}
    data["metadata"] = dict(node.metadata)
    data["relationships"] = dict(node.relationships)
    data["excluded_llm_metadata_keys"] = list(node.excluded_llm_metadata_keys)
    data["excluded_embed_metadata_keys"] = list(node.excluded_embed_metadata_keys)
    copy = cls.model_construct(_fields_set=set(node.model_fields_set), **data)
    copy._pisco_llm_text = tags  # type: ignore[attr-defined]
    copy._pisco_llm_metadata = llm_metadata  # type: ignore[attr-defined]
    return copy


def is_compressed(node: BaseNode) -> bool:
    """Whether ``node`` was made by :func:`compress_node` (its LLM content is memory tags)."""
    return isinstance(node, _CompressedContent) and node.pisco_tags is not None


# The usual case, importable by name.
PiscoTextNode = compressed_node_class(TextNode)

__all__ = ["PiscoTextNode", "compress_node", "compressed_node_class", "is_compressed"]
