"""ChatPisco: a LangChain chat model that reads PISCO memory tags."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    CallbackManagerForLLMRun,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    UsageMetadata,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import run_in_executor
from pydantic import ConfigDict, Field, model_validator

from pisco_rag import Completion, PiscoInputError, PiscoModel
from pisco_rag.streaming import CompletedStream, TextStream

# Standard parameters of hosted chat models that mean nothing for a local model: accepted and
# ignored, so that code written for another provider keeps working after the swap.
_IGNORED_INIT_PARAMS = ("api_key", "base_url", "timeout", "max_retries")
_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "ai": "assistant",
}
_NON_TEXT_BLOCKS = {"image", "image_url", "audio", "input_audio", "video", "file", "media"}


class ChatPisco(BaseChatModel):
    """A chat model on a :class:`pisco_rag.PiscoModel` that reads PISCO memory tags.

    Any message may contain memory tags (``[[pisco:<key>:<mac>]]``, as produced by
    :class:`~langchain_pisco.PiscoDocumentCompressor` or ``PiscoModel.tag``): each tag is
    replaced by its memory vectors in the decoder's input embeddings, so the model reads the
    compressed document instead of its text. A prompt without tags is plain text generation.
    Text that only looks like a tag (malformed, or minted by another store) is read as text; a
    tag of this store whose memory is no longer stored raises :class:`pisco_rag.TagError`.
    Tags are capabilities: pass untrusted user text through :func:`pisco_rag.escape_tags`
    before it joins a prompt (``{"question": RunnableLambda(escape_tags)}``), as
    :class:`~langchain_pisco.PiscoDocumentCompressor` does for documents.

    Supports ``invoke``, ``stream``, ``batch`` and their async forms; returns
    ``usage_metadata`` (input, output and total tokens) and ``response_metadata``
    (``model_name``, ``finish_reason``). Tool calling, structured output and non-text inputs are
    not supported.

    Example:
        .. code-block:: python

            pisco = PiscoModel.from_pretrained("embedded")
            llm = ChatPisco(pisco_model=pisco, max_tokens=64)
            llm.invoke("Background:\\n" + pisco.tag(pisco.compress([text])[0]) + "\\nQuestion: ...")
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, populate_by_name=True)

    pisco_model: PiscoModel = Field(repr=False, exclude=True)
    """The model that generates; tags are resolved against its memory store."""
    model_name: str | None = Field(default=None, alias="model")
    """Name reported in ``response_metadata`` and traces (default: the model's name)."""
    max_tokens: int = Field(default=256, gt=0)
    """Maximum number of new tokens per answer."""
    temperature: float | None = Field(default=None, ge=0)
    """Sampling temperature; ``None`` or 0 decode greedily."""
    stop: list[str] | None = None
    """Stop sequences (the answer is cut before the first one), added to any given per call."""
    streaming: bool = False
    """Whether ``invoke`` streams internally (to callbacks) by default."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra Hugging Face ``generate`` arguments (``top_p``, ``repetition_penalty``...)."""
    ground_answers: bool = False
    """Align each short answer to the most similar span of the text of the memories it was
    read from (:mod:`pisco_rag.grounding`); a streamed grounded answer comes in one chunk."""

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values = {k: v for k, v in values.items() if k not in _IGNORED_INIT_PARAMS}
        # ChatPisco(model=pisco) is an easy slip for ChatPisco(pisco_model=pisco).
        if isinstance(values.get("model"), PiscoModel) and "pisco_model" not in values:
            values["pisco_model"] = values.pop("model")
        return values

    @model_validator(mode="after")
    def _default_name(self) -> ChatPisco:
        if not self.model_name:
            config = self.pisco_model.config
            self.model_name = str(config.name or config.backbone or "pisco")
        return self

    # ------------------------------------------------------------------ LangChain metadata
    @property
    def _llm_type(self) -> str:
        return "pisco"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "fingerprint": self.pisco_model.fingerprint,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "stop": self.stop,
            "ground_answers": self.ground_answers,
            **self.model_kwargs,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="pisco",
            ls_model_name=str(kwargs.get("model") or self.model_name),
            ls_model_type="chat",
            ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        if stop := self._stop_list(stop):
            params["ls_stop"] = stop
        return params

    # ------------------------------------------------------------------ helpers
    def _stop_list(self, stop: list[str] | None) -> list[str]:
        return [*(self.stop or []), *(stop or [])]

    def _generation_args(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        kwargs = dict(kwargs)
        requested = kwargs.pop("model", None)
        if requested is not None and requested != self.model_name:
            raise PiscoInputError(
                f"model={requested!r} was passed per call, but this ChatPisco serves "
                f"{self.model_name!r}; build another ChatPisco for another PiscoModel"
            )
        max_new_tokens = kwargs.pop("max_new_tokens", None)
        max_tokens = kwargs.pop("max_tokens", None) or max_new_tokens or self.max_tokens
        temperature = kwargs.pop("temperature", self.temperature)
        args: dict[str, Any] = {**self.model_kwargs, **kwargs}
        args["max_new_tokens"] = int(max_tokens)
        if self.ground_answers:
            args.setdefault("ground_answers", True)
        if temperature:
            args.setdefault("do_sample", True)
            args["temperature"] = float(temperature)
        if stops := self._stop_list(stop):
            args["stop"] = stops
        return args

    def _metadata(self, finish_reason: str) -> dict[str, Any]:
        return {"model_name": self.model_name, "finish_reason": finish_reason}

    # ------------------------------------------------------------------ generation
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt = to_pisco_messages(messages)
        args = self._generation_args(stop, kwargs)
        (completion,) = self.pisco_model.complete([prompt], **args)
        usage = _usage(completion)
        message = AIMessage(
            content=completion.text,
            usage_metadata=usage,
            response_metadata=self._metadata(completion.finish_reason),
        )
        generation = ChatGeneration(
            message=message, generation_info={"finish_reason": completion.finish_reason}
        )
        return ChatResult(
            generations=[generation],
            llm_output={"model_name": self.model_name, "token_usage": dict(usage)},
        )

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # The model is torch on CPU/GPU under one lock: run it in a worker thread so the event
        # loop stays free.
        return await run_in_executor(None, self._generate, messages, stop, None, **kwargs)

    def _open_stream(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> TextStream | CompletedStream:
        # Rendering resolves the tags: a bad tag fails here, before any token.
        prompt = to_pisco_messages(messages)
        return self.pisco_model.stream_complete(prompt, **self._generation_args(stop, kwargs))

    def _last_chunk(self, stream: TextStream | CompletedStream) -> ChatGenerationChunk:
        """The closing chunk: no text, the exact token counts and the finish reason."""
        completion = stream.completion
        if completion is None:  # pragma: no cover - the core sets it once the stream is over
            raise RuntimeError("the PISCO stream ended without its completion")
        usage = _usage(completion)
        return ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=usage,
                response_metadata=self._metadata(completion.finish_reason),
                chunk_position="last",
            ),
            generation_info={"finish_reason": completion.finish_reason},
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        stream = self._open_stream(messages, stop, kwargs)
        try:
            # The pieces are stripped and cut at stop strings as invoke's answer is.
            for piece in stream:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        finally:
            # A consumer that stops reading closes this generator: stop generating at once
            # rather than run on to max_tokens under the model's lock.
            stream.close()
        yield self._last_chunk(stream)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The model runs in a worker thread; each piece is awaited there so the loop stays free.
        stream = await run_in_executor(None, self._open_stream, messages, stop, kwargs)
        done = object()
        try:
            while True:
                piece = await run_in_executor(None, next, stream, done)
                if piece is done:
                    break
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager:
                    await run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        finally:
            # Cancelled while a worker thread is still reading the stream, close() cannot close
            # that generator (ValueError) but has already told the generation to stop.
            with contextlib.suppress(ValueError):
                stream.close()
        yield self._last_chunk(stream)


def to_pisco_messages(messages: Sequence[BaseMessage]) -> list[dict[str, str]]:
    """LangChain messages as the ``[{"role", "content"}]`` prompt that ``PiscoModel`` takes.

    System, human and AI messages map to the ``system``, ``user`` and ``assistant`` roles;
    content blocks are joined as text. Tool messages and non-text content (images, audio,
    files) raise :class:`pisco_rag.PiscoInputError`.
    """
    if not messages:
        raise PiscoInputError("messages is empty; give at least one message")
    out = []
    for i, message in enumerate(messages):
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            role = "assistant"
        elif isinstance(message, ChatMessage) and message.role.lower() in _ROLES:
            role = _ROLES[message.role.lower()]
        else:
            kind = message.role if isinstance(message, ChatMessage) else message.type
            raise PiscoInputError(
                f"messages[{i}] is a {type(message).__name__} ({kind!r}); ChatPisco reads "
                "system, human and AI messages only (no tool calling)"
            )
        out.append({"role": role, "content": _text_of(message, f"messages[{i}]")})
    return out


def _text_of(message: BaseMessage, where: str) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        elif isinstance(block, dict) and block.get("type") in _NON_TEXT_BLOCKS:
            raise PiscoInputError(
                f"{where} holds a {block['type']!r} content block; ChatPisco reads text only"
            )
        # other blocks (reasoning, tool calls of earlier AI turns) are not text to read
    return "".join(parts)


def _usage(completion: Completion) -> UsageMetadata:
    return UsageMetadata(
        input_tokens=completion.prompt_tokens,
        output_tokens=completion.completion_tokens,
        total_tokens=completion.prompt_tokens + completion.completion_tokens,
    )
