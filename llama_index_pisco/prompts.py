"""PISCO-native prompt templates: the prompt layout the PISCO decoder was trained on.

PISCO (Louis et al., 2025) trains its decoder on one prompt: the system prompt below, then a
user turn ``"Background:\\n" + memories + "\\n\\nQuestion:" + question``. LlamaIndex's default
QA template words things differently ("Context information is below..."); a trained PISCO
decoder answers best with the layout it was trained on, so pass these templates::

    index.as_query_engine(
        llm=PiscoLLM(model),
        node_postprocessors=[PiscoCompressor(model)],
        text_qa_template=PISCO_QA_TEMPLATE,
    )
"""

from __future__ import annotations

from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.prompts import ChatPromptTemplate, PromptTemplate
from llama_index.core.prompts.prompt_type import PromptType

from pisco_rag.config import SYSTEM_PROMPT

PISCO_SYSTEM_PROMPT = SYSTEM_PROMPT
PISCO_QA_PROMPT_TMPL = "Background:\n{context_str}\n\nQuestion:{query_str}"

PISCO_QA_TEMPLATE = ChatPromptTemplate(
    message_templates=[
        ChatMessage(role=MessageRole.SYSTEM, content=PISCO_SYSTEM_PROMPT),
        ChatMessage(role=MessageRole.USER, content=PISCO_QA_PROMPT_TMPL),
    ],
    prompt_type=PromptType.QUESTION_ANSWER,
)
"""``text_qa_template`` for query engines and response synthesizers (system + user turn)."""

PISCO_QA_TEXT_TEMPLATE = PromptTemplate(
    PISCO_SYSTEM_PROMPT + "\n\n" + PISCO_QA_PROMPT_TMPL, prompt_type=PromptType.QUESTION_ANSWER
)
"""The same prompt as one string, for completion-style LLMs (no chat roles)."""

PISCO_CHAT_CONTEXT_TEMPLATE = PISCO_SYSTEM_PROMPT + "\n\nBackground:\n{context_str}\n\n"
"""``context_template`` (``chat_mode="context"``) or ``context_prompt``
(``chat_mode="condense_plus_context"``) for chat engines: the PISCO system prompt and the
memories in the system turn, the user's message as the user turn."""

__all__ = [
    "PISCO_CHAT_CONTEXT_TEMPLATE",
    "PISCO_QA_PROMPT_TMPL",
    "PISCO_QA_TEMPLATE",
    "PISCO_QA_TEXT_TEMPLATE",
    "PISCO_SYSTEM_PROMPT",
]
