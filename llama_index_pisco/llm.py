"""PiscoLLM: a LlamaIndex LLM that reads PISCO memory tags in its prompts."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

from llama_index.core.base.llms.types import (
    AudioBlock,
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    DocumentBlock,
    ImageBlock,
    LLMMetadata,
    MessageRole,
    VideoBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.prompts import BasePromptTemplate

from pisco_rag import Completion, PiscoInputError, PiscoModel
from pisco_rag.tags import escape_tags

from ._common import check_model

_ROLE_ALIASES = {"chatbot": "assistant", "model": "assistant", "developer": "system"}
_MEDIA_BLOCKS = (ImageBlock, AudioBlock, VideoBlock, DocumentBlock)
_DONE = object()


class PiscoLLM(CustomLLM):
    """The decoder of a :class:`~pisco_rag.PiscoModel` as a LlamaIndex LLM.

    Prompts and chat messages may hold memory tags (``[[pisco:...]]``, put there by
    :class:`~llama_index_pisco.PiscoCompressor`); each tag is resolved from ``model.store`` and
    its memory vectors are spliced into the decoder's input. A prompt without tags is plain text
    generation. Text that only looks like a tag (malformed, or minted by another store) is read
    as text; in ``predict``/query engines, tag-like text in template variables other than
    ``trusted_prompt_args`` (the user's ``query_str``, ...) is escaped, so users cannot paste
    tags. Prompts are rendered with the backbone's chat template (``complete`` sends the
    prompt as one user turn), so ``messages_to_prompt``/``completion_to_prompt`` are not used.

    Sync, streaming and async variants of ``complete`` and ``chat`` all work; async calls run
    the model in a worker thread so the event loop stays free.
    """

    max_new_tokens: int = Field(default=256, gt=0, description="Tokens to generate at most.")
    temperature: float = Field(
        default=0.0, ge=0.0, description="Sampling temperature; 0 is greedy decoding."
    )
    top_p: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Nucleus sampling (only when temperature > 0)."
    )
    stop: list[str] | None = Field(default=None, description="Strings that end the generation.")
    generate_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra transformers generate() arguments (e.g. repetition_penalty).",
    )
    model_name: str | None = Field(
        default=None, description="Name reported in metadata (default: the model's name)."
    )
    context_window: int | None = Field(
        default=None,
        description="Override the context window (default: the backbone's max positions).",
    )

    ground_answers: bool = Field(
        default=False,
        description=(
            "Align each short answer to the most similar span of the text of the memories it "
            "was read from (pisco_rag.grounding): names spelled as the documents spell them. "
            "A streamed grounded answer comes in one piece."
        ),
    )

    trusted_prompt_args: list[str] = Field(
        default_factory=lambda: ["context_str"],
        description=(
            "Prompt-template variables whose memory tags are resolved (the context that "
            "PiscoCompressor filled). Tag-like text in every other variable, such as the "
            "user's query_str, is escaped and stays text."
        ),
    )

    _model: PiscoModel = PrivateAttr()

    def __init__(self, model: PiscoModel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._model = check_model(model, "PiscoLLM")

    # predict()/stream()/chat engines format templates through these two: the user's variables
    # (also those bound early with partial_format, as response synthesizers bind query_str)
    # are escaped there, so a pasted tag can never splice a memory
    def _get_prompt(self, prompt: BasePromptTemplate, **prompt_args: Any) -> str:
        return super()._get_prompt(self._escape_partials(prompt), **self._escape(prompt_args))

    def _get_messages(self, prompt: BasePromptTemplate, **prompt_args: Any) -> list[ChatMessage]:
        return super()._get_messages(self._escape_partials(prompt), **self._escape(prompt_args))

    def _escape(self, prompt_args: dict[str, Any]) -> dict[str, Any]:
        return {
            k: escape_tags(v) if isinstance(v, str) and k not in self.trusted_prompt_args else v
            for k, v in prompt_args.items()
        }

    def _escape_partials(self, prompt: BasePromptTemplate) -> BasePromptTemplate:
        return prompt.partial_format(**self._escape(prompt.kwargs)) if prompt.kwargs else prompt

    @classmethod
    def class_name(cls) -> str:
        return "PiscoLLM"

    @property
    def model(self) -> PiscoModel:
        """The PISCO model whose decoder generates."""
        return self._model

    @property
    def metadata(self) -> LLMMetadata:
        config = self._model.model.config
        config = getattr(config, "text_config", None) or config
        window = self.context_window or getattr(config, "max_position_embeddings", None) or 2048
        name = self.model_name or self._model.config.name or self._model.config.backbone
        return LLMMetadata(
            context_window=int(window),
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=str(name),
        )

    # ------------------------------------------------------------------ conversions
    def _generation(self, kwargs: dict[str, Any]) -> tuple[int, list[str] | None, dict[str, Any]]:
        """(max_new_tokens, stop, generate kwargs) from the fields and per-call kwargs."""
        args = {**self.generate_kwargs, **kwargs}
        args.pop("formatted", None)
        max_new = args.pop("max_new_tokens", self.max_new_tokens)
        max_tokens = args.pop("max_tokens", None)  # the name other LlamaIndex LLMs use
        if max_tokens is not None:
            max_new = max_tokens
        stop = args.pop("stop", self.stop)
        temperature = args.pop("temperature", self.temperature)
        top_p = args.pop("top_p", self.top_p)
        if temperature and temperature > 0:
            args.setdefault("do_sample", True)
            args["temperature"] = temperature
            if top_p is not None:
                args["top_p"] = top_p
        else:
            args["do_sample"] = False
        return int(max_new), list(stop) if stop else None, args

    def _prompt_messages(self, prompt: str, formatted: bool) -> list[dict[str, str]]:
        if not isinstance(prompt, str):
            raise PiscoInputError(f"prompt must be a str, got {type(prompt).__name__}")
        messages = []
        if self.system_prompt and not formatted:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        return messages

    @staticmethod
    def _chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
        if not messages:
            raise PiscoInputError("messages is empty; give at least one ChatMessage")
        out = []
        for i, message in enumerate(messages):
            if not isinstance(message, ChatMessage):
                raise PiscoInputError(
                    f"messages[{i}] must be a ChatMessage, got {type(message).__name__}"
                )
            media = [type(b).__name__ for b in message.blocks if isinstance(b, _MEDIA_BLOCKS)]
            if media:
                raise PiscoInputError(
                    f"messages[{i}] holds {', '.join(media)}; PiscoLLM reads text only"
                )
            role = message.role.value if isinstance(message.role, MessageRole) else message.role
            role = _ROLE_ALIASES.get(str(role), str(role))
            out.append({"role": role, "content": message.content or ""})
        return out

    @staticmethod
    def _usage(result: Completion) -> dict[str, Any]:
        usage = {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
        return usage

    def _run(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> Completion:
        max_new, stop, args = self._generation(kwargs)
        (result,) = self._model.complete(
            [messages],
            max_new_tokens=max_new,
            stop=stop,
            ground_answers=self.ground_answers,
            **args,
        )
        return result

    def _stream(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> Iterator[str]:
        max_new, stop, args = self._generation(kwargs)
        # Renders (and resolves tags) now, so a bad prompt fails at the call, not mid-stream.
        return self._model.stream_complete(
            messages, max_new_tokens=max_new, stop=stop, ground_answers=self.ground_answers, **args
        )

    def _completion_response(self, result: Completion) -> CompletionResponse:
        usage = self._usage(result)
        return CompletionResponse(
            text=result.text,
            raw={"usage": usage, "finish_reason": result.finish_reason},
            additional_kwargs=dict(usage),
        )

    def _chat_response(self, result: Completion) -> ChatResponse:
        usage = self._usage(result)
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text),
            raw={"usage": usage, "finish_reason": result.finish_reason},
            additional_kwargs=dict(usage),
        )

    @staticmethod
    def _pieces_or_empty(pieces: Iterator[str]) -> Iterator[str]:
        """The pieces, or one empty piece for an empty answer: LlamaIndex's callbacks need a
        last response to report."""
        empty = True
        for piece in pieces:
            empty = False
            yield piece
        if empty:
            yield ""

    @classmethod
    def _completion_gen(cls, pieces: Iterator[str]) -> CompletionResponseGen:
        text = ""
        for piece in cls._pieces_or_empty(pieces):
            text += piece
            yield CompletionResponse(text=text, delta=piece)

    @classmethod
    def _chat_gen(cls, pieces: Iterator[str]) -> ChatResponseGen:
        text = ""
        for piece in cls._pieces_or_empty(pieces):
            text += piece
            yield ChatResponse(
                message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece
            )

    @staticmethod
    async def _agen(sync_gen: Iterator[Any]) -> Any:
        """Drive a blocking generator from a worker thread, one item at a time."""
        while True:
            item = await asyncio.to_thread(next, sync_gen, _DONE)
            if item is _DONE:
                return
            yield item

    # ------------------------------------------------------------------ completion
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        """Generate from ``prompt`` (one user turn; memory tags resolved)."""
        return self._completion_response(
            self._run(self._prompt_messages(prompt, formatted), kwargs)
        )

    @llm_completion_callback()
    def stream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseGen:
        """Like :meth:`complete`, yielding responses with the text so far and the ``delta``."""
        return self._completion_gen(self._stream(self._prompt_messages(prompt, formatted), kwargs))

    @llm_completion_callback()
    async def acomplete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponse:
        messages = self._prompt_messages(prompt, formatted)
        return self._completion_response(await asyncio.to_thread(self._run, messages, kwargs))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        messages = self._prompt_messages(prompt, formatted)
        pieces = await asyncio.to_thread(self._stream, messages, kwargs)
        return self._agen(self._completion_gen(pieces))

    # ------------------------------------------------------------------ chat
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        """Answer the chat; memory tags in any message (system prompts included) are resolved."""
        return self._chat_response(self._run(self._chat_messages(messages), kwargs))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        """Like :meth:`chat`, yielding responses with the text so far and the ``delta``."""
        return self._chat_gen(self._stream(self._chat_messages(messages), kwargs))

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        dicts = self._chat_messages(messages)
        return self._chat_response(await asyncio.to_thread(self._run, dicts, kwargs))

    @llm_chat_callback()
    async def astream_chat(
        self, messages: Sequence[ChatMessage], **kwargs: Any
    ) -> ChatResponseAsyncGen:
        dicts = self._chat_messages(messages)
        pieces = await asyncio.to_thread(self._stream, dicts, kwargs)
        return self._agen(self._chat_gen(pieces))


__all__ = ["PiscoLLM"]
