"""Streaming answers: the worker thread that generates one answer, the :class:`TextStream`
that hands its text pieces to the caller, and the exit hook that stops streams still running.
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from .adapters import DECODER, use_adapter
from .prompting import RenderedPrompt

if TYPE_CHECKING:
    from .generation import Completion


class StreamingMixin:
    """:meth:`_stream` for :class:`~pisco_rag.model.PiscoModel`. Needs from the class
    ``model``, ``tokenizer``, ``_lock``, ``_llamacpp`` and the generation internals
    (``_generation_args``, ``_check_prompt_lengths``, ``_llamacpp_ids``, ``_activate_decoder``,
    ``_embed``, ``_completions``)."""

    def _stream(
        self,
        prompt: RenderedPrompt,
        max_new_tokens: int,
        stop: Sequence[str] | None,
        kwargs: dict[str, Any],
        adapter: Literal["decoder", "none"],
    ) -> TextStream:
        args = self._generation_args(max_new_tokens, stop, kwargs)
        self._check_prompt_lengths([prompt], max_new_tokens)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        cancel = threading.Event()
        llama_args = dict(args)  # llama.cpp checks the cancel event itself
        args["stopping_criteria"] = StoppingCriteriaList(
            [*args.get("stopping_criteria", []), _Cancelled(cancel)]
        )
        outcome: dict[str, Any] = {}

        def run() -> None:
            _LIVE_GENERATIONS[threading.current_thread()] = cancel
            try:
                with torch.no_grad(), self._lock:
                    if self._llamacpp is not None and adapter == "decoder":
                        ids = []
                        streamer.put(torch.empty(1, 0, dtype=torch.long))  # the (empty) prompt
                        for token in self._llamacpp_ids(prompt, llama_args, cancel):
                            ids.append(token)
                            streamer.put(torch.tensor([token]))
                        streamer.end()
                        outcome["ids"] = torch.tensor([ids])
                        return
                    self._activate_decoder(adapter)
                    try:
                        embeds, mask = self._embed([prompt])
                        outcome["ids"] = self.model.generate(
                            inputs_embeds=embeds, attention_mask=mask, streamer=streamer, **args
                        )
                    finally:
                        if adapter == "none":
                            use_adapter(self.model, DECODER)
            except BaseException as e:  # surfaced in the consumer's thread
                outcome["error"] = e
                streamer.end()
            finally:
                _LIVE_GENERATIONS.pop(threading.current_thread(), None)

        thread = threading.Thread(target=run, daemon=True, name="pisco-stream")
        thread.start()
        return TextStream(streamer, thread, cancel, outcome, stop, self, prompt, max_new_tokens)


class TextStream(Iterator[str]):
    """Text pieces of one answer as they are decoded. Joined, they equal the answer that
    :meth:`PiscoModel.complete` gives (stripped, cut at stop strings); once the stream is
    exhausted, :attr:`completion` holds it with its token counts. Closing the stream (or
    dropping it) stops the generation."""

    def __init__(self, streamer, thread, cancel, outcome, stop, model, prompt, max_new_tokens):
        self.completion: Completion | None = None
        self._cancel = cancel
        self._pieces = self._run(streamer, thread, outcome, stop, model, prompt, max_new_tokens)

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop the generation; safe to call from another thread while one is reading."""
        self._cancel.set()
        # "generator already executing" when another thread is reading: it ends at its next step
        with contextlib.suppress(ValueError):
            self._pieces.close()

    def __del__(self) -> None:
        self._cancel.set()

    def _run(self, streamer, thread, outcome, stop, model, prompt, max_new_tokens):
        text, sent = "", ""
        try:
            for piece in streamer:
                text, stopped = _cut_at_stop(text + piece, stop)
                ready = text.strip() if stopped else text.lstrip()
                ready = ready if stopped else ready[: len(ready.rstrip())]  # hold whitespace
                if len(ready) > len(sent):
                    yield ready[len(sent) :]
                    sent = ready
                if stopped:
                    self._cancel.set()
                    break
            thread.join()
            if "error" in outcome:
                raise outcome["error"]
            if "ids" in outcome:
                (self.completion,) = model._completions(
                    [prompt], outcome["ids"], max_new_tokens, stop
                )
        finally:
            self._cancel.set()


class CompletedStream(Iterator[str]):
    """A :class:`TextStream` of an answer known in full before it is handed over (a grounded
    answer: its span is found once the whole answer is decoded): one piece, then done."""

    def __init__(self, completion: Completion) -> None:
        self.completion: Completion | None = completion
        self._pieces = iter([completion.text] if completion.text else [])

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Nothing runs any more; kept so callers treat both streams alike."""


# Streams still generating; stopped and joined at interpreter exit, since a daemon thread
# killed inside a torch op aborts the process ("terminate called without an active exception").
_LIVE_GENERATIONS: dict[threading.Thread, threading.Event] = {}


@atexit.register
def _stop_live_generations(timeout_s: float = 30.0) -> None:
    for thread, cancel in list(_LIVE_GENERATIONS.items()):
        cancel.set()
        thread.join(timeout_s)


class _Cancelled(StoppingCriteria):
    """Stopping criterion: stop when the stream's consumer went away."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool)


def _cut_at_stop(text: str, stop: Sequence[str] | None) -> tuple[str, bool]:
    if not stop:
        return text, False
    cuts = [text.find(s) for s in stop if s and s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)
