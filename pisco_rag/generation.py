"""Generation: answers from memories and/or text (PISCO prompts or prompt-level chat with
memory tags), answer likelihoods, and the decoder backends (torch, or llama.cpp).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from .adapters import DECODER, use_adapter
from .errors import MemoryMismatchError, PiscoInputError
from .grounding import ground_answer
from .memory import Memory
from .prompting import (
    ChatTurn,
    RenderedPrompt,
    Segment,
    check_batch_size,
    check_encodable,
    check_segment,
    left_pad,
    split_tags,
    text_ids,
)
from .streaming import CompletedStream, TextStream, _cut_at_stop

Messages = str | Sequence[dict[str, Any]]


@dataclass
class Completion:
    """One generated answer with its token counts."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: Literal["stop", "length"]


class GenerationMixin:
    """Generation methods of :class:`~pisco_rag.model.PiscoModel`. Needs from the class
    ``model``, ``tokenizer``, ``config``, ``store``, ``renderer``, ``mem_token_ids``, ``_lock``,
    ``_llamacpp``, the properties ``n_mem``, ``hidden_size``, ``device``, ``dtype``,
    ``fingerprint``, ``_input_embeddings``, and ``_stream`` (:mod:`pisco_rag.streaming`)."""

    def generate(
        self,
        questions: Sequence[str],
        contexts: Sequence[Sequence[Memory | str]],
        *,
        max_new_tokens: int = 64,
        batch_size: int = 8,
        show_progress: bool = False,
        ground_answers: bool = False,
        **generation_kwargs: Any,
    ) -> list[str]:
        """Answer each question from its contexts: ``contexts[i]`` mixes :class:`Memory` objects
        and plain text passages, any number (0 included). Greedy unless generation arguments
        (``do_sample``, ``temperature``...) say otherwise; batched with left padding.
        ``ground_answers=True`` replaces each short answer by the most similar span of its
        contexts' text (:func:`~pisco_rag.grounding.ground_answer`; memories need their
        ``text``)."""
        prompts = self._pisco_prompts(questions, contexts)
        passages = (
            [_context_texts(ctx, f"contexts[{i}]") for i, ctx in enumerate(contexts)]
            if ground_answers
            else None
        )
        out: list[str] = []
        for start in tqdm(
            range(0, len(prompts), check_batch_size(batch_size)),
            desc="generating",
            disable=not show_progress,
        ):
            batch = prompts[start : start + batch_size]
            out += [c.text for c in self._generate(batch, max_new_tokens, None, generation_kwargs)]
        if passages is not None:
            out = [ground_answer(a, texts) for a, texts in zip(out, passages)]
        return out

    def stream(
        self,
        question: str,
        context: Sequence[Memory | str],
        *,
        max_new_tokens: int = 64,
        **generation_kwargs: Any,
    ) -> TextStream:
        """Like :meth:`generate` for one question, yielding text pieces as they are decoded."""
        (prompt,) = self._pisco_prompts([question], [context])
        return self._stream(prompt, max_new_tokens, None, generation_kwargs, "decoder")

    def generate_from_text(
        self,
        questions: Sequence[str],
        documents: Sequence[Sequence[str]],
        *,
        adapter: Literal["decoder", "none"] = "decoder",
        max_new_tokens: int = 64,
        batch_size: int = 8,
        **generation_kwargs: Any,
    ) -> list[str]:
        """The uncompressed baseline on the same weights: the same PISCO prompt with the
        documents as text. ``adapter="decoder"`` (default) reads with ``decoder_adapter``
        active, as the papers' text-RAG baseline on a PISCO model; ``adapter="none"`` reads
        with the plain backbone (adapters disabled)."""
        for i, docs in enumerate(documents):
            for j, d in enumerate(docs):
                if not isinstance(d, str):
                    raise PiscoInputError(
                        f"documents[{i}][{j}] must be a str, got {type(d).__name__}"
                    )
        prompts = self._pisco_prompts(questions, documents)
        out: list[str] = []
        for start in range(0, len(prompts), check_batch_size(batch_size)):
            batch = prompts[start : start + batch_size]
            result = self._generate(batch, max_new_tokens, None, generation_kwargs, adapter=adapter)
            out += [c.text for c in result]
        return out

    @torch.no_grad()
    def answer_nll(
        self,
        questions: Sequence[str],
        contexts: Sequence[Sequence[Memory | str]],
        answers: Sequence[str],
        *,
        adapter: Literal["decoder", "none"] = "decoder",
        batch_size: int = 8,
    ) -> list[float]:
        """Mean negative log-likelihood per token of each ``answers[i]`` (then eos) after the
        PISCO prompt of ``questions[i]`` with ``contexts[i]`` (memories and/or text, or none):
        the diagnostic that shows whether memories carry the answer before Match moves."""
        if len(answers) != len(questions):
            raise PiscoInputError(
                f"answers has {len(answers)} entries for {len(questions)} questions"
            )
        prompts = self._pisco_prompts(questions, contexts)
        eos = self.tokenizer.eos_token_id
        out: list[float] = []
        for start in range(0, len(prompts), check_batch_size(batch_size)):
            batch, n_answer = [], []
            for p, a in zip(
                prompts[start : start + batch_size], answers[start : start + batch_size]
            ):
                answer = [*text_ids(self.tokenizer, a), eos]
                batch.append(RenderedPrompt([*p.input_ids, *answer], p.memories))
                n_answer.append(len(answer))
            keep = max(n_answer) + 1
            with self._lock:
                self._activate_decoder(adapter)
                try:
                    embeds, mask = self._embed(batch)
                    logits = tail_logits(self.model, embeds, mask, keep).float()
                finally:
                    if adapter == "none":
                        use_adapter(self.model, DECODER)
            for row, (p, n) in enumerate(zip(batch, n_answer)):
                targets = torch.tensor(p.input_ids[-n:], device=logits.device)
                row_logits = logits[row, -n - 1 : -1]
                out.append(float(torch.nn.functional.cross_entropy(row_logits, targets)))
        return out

    def tag(self, memory: Memory) -> str:
        """The tag that stands for ``memory`` in a text prompt (stores it in :attr:`store`)."""
        if not isinstance(memory, Memory):
            raise PiscoInputError(
                f"tag() takes a Memory (from compress()), got {type(memory).__name__}"
            )
        self._check_memory(memory, "memory")
        return self.store.tag(memory)

    def tags(self, memories: Sequence[Memory]) -> list[str]:
        return [self.tag(m) for m in memories]

    def render_prompt(
        self, prompt: Messages, *, add_generation_prompt: bool = True
    ) -> RenderedPrompt:
        """Resolve the memory tags of a prompt string or chat messages (``[{"role", "content"}]``)
        and tokenise it with the backbone's chat template. Whitespace between two adjacent
        tags is dropped, so consecutive memories form contiguous slots as in PISCO's prompt."""
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        if not isinstance(prompt, Sequence) or not prompt:
            raise PiscoInputError(
                "a prompt must be a str or a non-empty list of chat messages "
                f"({{'role', 'content'}} dicts), got {prompt!r:.80}"
            )
        turns = []
        for i, msg in enumerate(prompt):
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
                raise PiscoInputError(
                    f"prompt[{i}] must be a dict with a 'role' and a str 'content'"
                )
            check_encodable(msg["content"], f"prompt[{i}]['content']")
            content = _join_adjacent_memories(split_tags(msg["content"], self.store.resolve))
            for seg in content:
                if isinstance(seg, Memory):
                    self._check_memory(seg, f"a memory tag in prompt[{i}]")
            turns.append(ChatTurn(msg.get("role", "user"), content))
        return self.renderer.render(turns, add_generation_prompt=add_generation_prompt)

    def complete(
        self,
        prompts: Sequence[Messages],
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] | None = None,
        adapter: Literal["decoder", "none"] = "decoder",
        ground_answers: bool = False,
        **generation_kwargs: Any,
    ) -> list[Completion]:
        """Prompt-level generation for framework adapters: each prompt is a string or chat
        messages whose memory tags are resolved from :attr:`store`. A prompt without tags is
        plain text generation; ``adapter="none"`` reads it with the plain backbone.
        ``ground_answers=True`` aligns each short answer to the most similar span of the text
        of the prompt's memories (:func:`~pisco_rag.grounding.ground_answer`)."""
        if isinstance(prompts, (str, Mapping)) or not isinstance(prompts, Sequence):
            raise PiscoInputError(
                "prompts must be a list of prompts (each a str or chat messages); wrap one "
                f"prompt in a list: complete([prompt]), got {type(prompts).__name__}"
            )
        rendered = [self.render_prompt(p) for p in prompts]
        if adapter == "none" and any(r.memories for r in rendered):
            raise PiscoInputError("adapter='none' reads text only; the prompt holds memory tags")
        passages = (
            [_context_texts(r.memories, f"prompts[{i}]") for i, r in enumerate(rendered)]
            if ground_answers
            else None
        )
        results = self._generate(rendered, max_new_tokens, stop, generation_kwargs, adapter=adapter)
        if passages is not None:
            results = [
                replace(c, text=ground_answer(c.text, texts)) for c, texts in zip(results, passages)
            ]
        return results

    def stream_complete(
        self,
        prompt: Messages,
        *,
        max_new_tokens: int = 256,
        stop: Sequence[str] | None = None,
        adapter: Literal["decoder", "none"] = "decoder",
        ground_answers: bool = False,
        **generation_kwargs: Any,
    ) -> TextStream | CompletedStream:
        """Like :meth:`complete` for one prompt, yielding text pieces; the stream's
        ``completion`` has the token counts once it is exhausted. A grounded answer comes in
        one piece (its span is known only once the whole answer is decoded)."""
        if ground_answers:
            (result,) = self.complete(
                [prompt],
                max_new_tokens=max_new_tokens,
                stop=stop,
                adapter=adapter,
                ground_answers=True,
                **generation_kwargs,
            )
            return CompletedStream(result)
        rendered = self.render_prompt(prompt)
        if adapter == "none" and rendered.memories:
            raise PiscoInputError("adapter='none' reads text only; the prompt holds memory tags")
        return self._stream(rendered, max_new_tokens, stop, generation_kwargs, adapter)

    # ------------------------------------------------------------------ internals
    def _pisco_prompts(
        self, questions: Sequence[str], contexts: Sequence[Sequence[Memory | str]]
    ) -> list[RenderedPrompt]:
        if isinstance(questions, str):
            raise PiscoInputError(
                "questions must be a list of strings; wrap one question in a list"
            )
        if contexts is None or isinstance(contexts, str) or len(contexts) != len(questions):
            raise PiscoInputError(
                f"contexts must be a list with one sequence of memories/passages per question "
                f"({len(questions)} questions, got "
                f"{'none' if contexts is None else len(contexts)}); use [] for a question "
                "without context"
            )
        prompts = []
        for i, (q, ctx) in enumerate(zip(questions, contexts)):
            if not isinstance(q, str) or not q.strip():
                raise PiscoInputError(f"questions[{i}] must be a non-empty string, got {q!r}")
            check_encodable(q, f"questions[{i}]")
            if isinstance(ctx, (str, Memory)):
                raise PiscoInputError(f"contexts[{i}] must be a list of memories/passages")
            segs = [check_segment(c, f"contexts[{i}][{j}]") for j, c in enumerate(ctx)]
            for j, s in enumerate(segs):
                if isinstance(s, Memory):
                    self._check_memory(s, f"contexts[{i}][{j}]")
            turns = self.renderer.pisco_turns(q, segs, self.config.system_prompt)
            prompts.append(self.renderer.render(turns))
        return prompts

    def _check_memory(self, memory: Memory, where: str) -> None:
        if memory.fingerprint != self.fingerprint:
            raise MemoryMismatchError(
                f"{where} was made by another model (fingerprint {memory.fingerprint}, this "
                f"model is {self.fingerprint}); compress the text again with this model"
            )
        if tuple(memory.vectors.shape) != (self.n_mem, self.hidden_size):
            raise MemoryMismatchError(
                f"{where} has shape {tuple(memory.vectors.shape)}, this model reads "
                f"{(self.n_mem, self.hidden_size)}"
            )

    def _embed(self, prompts: Sequence[RenderedPrompt]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded input embeddings with all memories spliced in by one masked write."""
        ids, mask = left_pad([p.input_ids for p in prompts], self.tokenizer.pad_token_id)
        ids, mask = ids.to(self.device), mask.to(self.device)
        embeds = self._input_embeddings(ids)
        memories = [m.vectors for p in prompts for m in p.memories]
        if memories:
            slots = torch.isin(ids, torch.tensor(self.mem_token_ids, device=self.device))
            slots &= mask.bool()
            vectors = torch.cat(memories).to(self.device, self.dtype)
            if int(slots.sum()) != vectors.shape[0]:
                raise PiscoInputError(
                    "the prompt's memory slots do not match its memories; a text passage may "
                    "contain memory-token strings"
                )
            embeds = embeds.masked_scatter(slots.unsqueeze(-1), vectors)
        return embeds, mask

    def _generation_args(
        self, max_new_tokens: int, stop: Sequence[str] | None, kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise PiscoInputError(
                f"max_new_tokens must be an int, got {type(max_new_tokens).__name__} "
                f"{max_new_tokens!r}"
            )
        if max_new_tokens < 1:
            raise PiscoInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        args: dict[str, Any] = {"do_sample": False, "max_new_tokens": max_new_tokens}
        args["pad_token_id"] = self.tokenizer.pad_token_id
        args.update(kwargs)
        if args.get("temperature") == 0:
            args.pop("temperature")
            args["do_sample"] = False
        if not args["do_sample"]:
            for k in ("temperature", "top_p", "top_k"):
                args.pop(k, None)
        if stop:
            args["stop_strings"] = list(stop)
            args["tokenizer"] = self.tokenizer
        return args

    @torch.no_grad()
    def _generate(
        self,
        prompts: Sequence[RenderedPrompt],
        max_new_tokens: int,
        stop: Sequence[str] | None,
        kwargs: dict[str, Any],
        adapter: Literal["decoder", "none"] = "decoder",
    ) -> list[Completion]:
        if not prompts:
            return []
        args = self._generation_args(max_new_tokens, stop, kwargs)
        self._check_prompt_lengths(prompts, max_new_tokens)
        if self._llamacpp is not None and adapter == "decoder":
            with self._lock:
                rows = [list(self._llamacpp_ids(p, args)) for p in prompts]
            width = max(len(r) for r in rows)
            pad = self.tokenizer.pad_token_id
            out = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
            return self._completions(prompts, out, max_new_tokens, stop)
        with self._lock:
            self._activate_decoder(adapter)
            try:
                embeds, mask = self._embed(prompts)
                out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, **args)
            finally:
                if adapter == "none":
                    use_adapter(self.model, DECODER)
        return self._completions(prompts, out, max_new_tokens, stop)

    # ------------------------------------------------------------------ llama.cpp decoding
    def set_decoding_backend(
        self,
        backend: Literal["torch", "llama.cpp"] = "torch",
        *,
        weights: str = "f32",
        n_ctx: int | None = None,
    ) -> None:
        """Answer with the decoder in llama.cpp (``"llama.cpp"``: greedy only, much faster at
        batch 1 on CPUs; needs ``pisco-rag[llama-cpp]``) or in torch (``"torch"``, default).
        ``weights``: ``"f32"`` (the torch path's answers), ``"f16"``, ``"q8_0"`` or ``"q4_1"``
        (faster, may differ). Compression, reranking and text mode without the adapter stay in
        torch. The decoder is written once as a GGUF file under the cache directory.
        ``n_ctx``: llama.cpp's context (default: the backbone's; its KV cache is allocated up
        front, so a smaller one saves memory)."""
        if backend not in ("torch", "llama.cpp"):
            raise PiscoInputError(f"backend must be 'torch' or 'llama.cpp', got {backend!r}")
        with self._lock:
            if self._llamacpp is not None:
                self._llamacpp.close()
                self._llamacpp = None
            if backend == "llama.cpp":
                from .llamacpp_decoder import LlamaCppDecoder

                self._llamacpp = LlamaCppDecoder(self, weights, n_ctx=n_ctx)

    @property
    def decoding_backend(self) -> str:
        """``"torch"`` or ``"llama.cpp"`` (see :meth:`set_decoding_backend`)."""
        return "torch" if self._llamacpp is None else "llama.cpp"

    def _llamacpp_ids(self, prompt: RenderedPrompt, args: dict[str, Any], cancel=None):
        """Greedy ids for one prompt from llama.cpp (the caller holds the model lock)."""
        unsupported = sorted(set(args) - _LLAMACPP_ARGS)
        if args.get("do_sample") or unsupported:
            raise PiscoInputError(
                "the llama.cpp decoder decodes greedily with max_new_tokens, min_new_tokens "
                f"and stop only (got {unsupported or 'do_sample=True'}); call "
                "set_decoding_backend('torch') for other generation settings"
            )
        if self._llamacpp.fingerprint != self.fingerprint:  # weights changed: write them again
            old = self._llamacpp
            self.set_decoding_backend("llama.cpp", weights=old.weights, n_ctx=old.context)
        stop = args.get("stop_strings") or []
        # a stop string spans at most 4 byte-level tokens per character: decode only that tail
        tail = 4 * max((len(s) for s in stop), default=0) + 1

        def should_stop(ids: list[int]) -> bool:
            if cancel is not None and cancel.is_set():
                return True
            return bool(stop) and any(s in self.tokenizer.decode(ids[-tail:]) for s in stop)

        embeds, _ = self._embed([prompt])
        return self._llamacpp.stream_ids(
            embeds[0],
            args["max_new_tokens"],
            eos_ids=self._eos_ids(),
            min_new_tokens=args.get("min_new_tokens") or 0,
            should_stop=should_stop,
        )

    @property
    def context_window(self) -> int | None:
        """The backbone's maximum sequence length (prompt and answer), if it declares one."""
        config = getattr(self.model.config, "text_config", None) or self.model.config
        return getattr(config, "max_position_embeddings", None)

    def _check_prompt_lengths(self, prompts: Sequence[RenderedPrompt], max_new: int) -> None:
        """Refuse, before taking the model lock, a prompt the backbone cannot read whole."""
        window = self.context_window
        if window is None:
            return
        for i, p in enumerate(prompts):
            if len(p.input_ids) + max_new > window:
                raise PiscoInputError(
                    f"prompt {i} is {len(p.input_ids)} tokens and asks for up to {max_new} new "
                    f"ones, beyond the backbone's context of {window} tokens: shorten the "
                    "question or history, retrieve fewer documents, or lower max_new_tokens"
                )

    def _activate_decoder(self, adapter: str) -> None:
        if adapter == "none":
            use_adapter(self.model, None)
        elif adapter == "decoder":
            use_adapter(self.model, DECODER)
        else:
            raise PiscoInputError(f"adapter must be 'decoder' or 'none', got {adapter!r}")

    def _eos_ids(self) -> list[int]:
        """Every id that ends an answer (the generation config's and the tokenizer's)."""
        eos = {*_as_list(self.model.generation_config.eos_token_id), self.tokenizer.eos_token_id}
        return sorted(t for t in eos if t is not None)

    def _completions(
        self,
        prompts: Sequence[RenderedPrompt],
        out: torch.Tensor,
        max_new_tokens: int,
        stop: Sequence[str] | None,
    ) -> list[Completion]:
        """Decode generated ids: cut at the first eos and at stop strings, count tokens."""
        eos = set(self._eos_ids())
        pad = self.tokenizer.pad_token_id
        results = []
        for p, row in zip(prompts, out.tolist()):
            end = next((k for k, t in enumerate(row) if t in eos), None)
            if end is not None:
                tokens, n = row[:end], end + 1
            else:
                while pad not in eos and row and row[-1] == pad:
                    row.pop()
                tokens, n = row, len(row)
            text, stopped = _cut_at_stop(
                self.tokenizer.decode(tokens, skip_special_tokens=True), stop
            )
            reason = "stop" if end is not None or stopped else "length"
            results.append(Completion(text.strip(), len(p.input_ids), n, reason))
        return results


# ---------------------------------------------------------------------- helpers
def _context_texts(context: Sequence[Memory | str], where: str) -> list[str]:
    """The text of a question's passages and memories, for grounding its answer."""
    texts = [c if isinstance(c, str) else c.text for c in context]
    if any(t is None for t in texts):
        raise PiscoInputError(
            f"ground_answers needs the text of every memory, and a memory of {where} carries "
            "none (a store that keeps vectors only); compress the text again, or turn "
            "ground_answers off"
        )
    return texts


def tail_forward(
    backbone: PreTrainedModel,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    keep: int,
    hidden: bool = False,
) -> Any:
    """Forward pass of left-padded rows (position ids from the mask, as in generation) that
    keeps the logits of the last ``keep`` positions, and every layer's hidden states when
    ``hidden``: what answer likelihoods and the training losses need."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return backbone(
        inputs_embeds=embeds,
        attention_mask=mask,
        position_ids=positions,
        logits_to_keep=keep,
        use_cache=False,
        output_hidden_states=hidden,
    )


def tail_logits(
    backbone: PreTrainedModel, embeds: torch.Tensor, mask: torch.Tensor, keep: int
) -> torch.Tensor:
    """Logits of the last ``keep`` positions of left-padded rows."""
    return tail_forward(backbone, embeds, mask, keep).logits


def _join_adjacent_memories(segments: list[Segment]) -> list[Segment]:
    """Drop whitespace-only text between two memories."""
    return [
        seg
        for k, seg in enumerate(segments)
        if not (
            isinstance(seg, str)
            and not seg.strip()
            and 0 < k < len(segments) - 1
            and isinstance(segments[k - 1], Memory)
            and isinstance(segments[k + 1], Memory)
        )
    ]


_LLAMACPP_ARGS = {
    "do_sample",
    "max_new_tokens",
    "min_new_tokens",
    "pad_token_id",
    "stop_strings",
    "tokenizer",
}


def _as_list(x: int | list[int] | None) -> list[int]:
    return [] if x is None else [x] if isinstance(x, int) else list(x)
