"""LangChain's standard chat-model test suites (``langchain-tests``) run against ChatPisco.

The unit and integration suites run on the tiny random model (fast). A random model often
answers with whitespace or an end-of-sequence token only, while the suite requires non-empty
answers, so its blank and special tokens are suppressed through ``model_kwargs`` (a Hugging Face
``generate`` argument ChatPisco passes through). The integration suite also runs, marked
``integration``, on the real SmolLM2-135M embedded default without any suppression.

Tool calling, structured output, JSON mode and image/audio/PDF inputs are not supported by
ChatPisco; the suites skip them through their feature properties (``has_tool_calling`` and
``has_structured_output`` are False because ChatPisco does not override ``bind_tools`` or
``with_structured_output``). No standard test is overridden.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("langchain_tests")

from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from langchain_pisco import ChatPisco
from pisco_rag import PiscoModel


@pytest.fixture(scope="session")
def blank_token_ids(tiny_model: PiscoModel) -> list[int]:
    """Ids of the tokens that decode to nothing visible (special tokens, whitespace)."""
    tok = tiny_model.tokenizer
    return [i for i in range(len(tok)) if not tok.decode([i], skip_special_tokens=True).strip()]


class _TinyPiscoParams:
    """Binds the session's tiny model to the suite's ``chat_model_params``."""

    _params: dict[str, Any]

    @pytest.fixture(autouse=True)
    def _bind_tiny_model(self, tiny_model: PiscoModel, blank_token_ids: list[int]) -> None:
        self._params = {
            "pisco_model": tiny_model,
            "model_kwargs": {"suppress_tokens": blank_token_ids},
        }

    @property
    def chat_model_class(self) -> type[ChatPisco]:
        return ChatPisco

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return dict(self._params)

    @property
    def supports_model_override(self) -> bool:
        # One ChatPisco serves one PiscoModel: a per-call `model=` naming another is an error.
        return False


class TestChatPiscoStandardUnit(_TinyPiscoParams, ChatModelUnitTests):
    """``ChatModelUnitTests`` on the tiny model."""


class TestChatPiscoStandardIntegration(_TinyPiscoParams, ChatModelIntegrationTests):
    """``ChatModelIntegrationTests`` on the tiny model (fast; answers are random tokens)."""

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {**self._params, "max_tokens": 12}  # short answers keep the suite fast


@pytest.mark.integration
class TestChatPiscoStandardIntegrationSmolLM2(ChatModelIntegrationTests):
    """``ChatModelIntegrationTests`` on the embedded SmolLM2-135M default (real text answers:
    prompts without tags are plain generation, and the untrained LoRA adapters start at zero)."""

    _params: dict[str, Any]

    @pytest.fixture(autouse=True)
    def _bind_smollm(self, smollm: PiscoModel) -> None:
        self._params = {"pisco_model": smollm}

    @property
    def chat_model_class(self) -> type[ChatPisco]:
        return ChatPisco

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {**self._params, "max_tokens": 12}

    @property
    def supports_model_override(self) -> bool:
        return False
