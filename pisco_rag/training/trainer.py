"""Sequence-level distillation of a PISCO / OSCAR model with transformers' ``Trainer``.

The student (compressor + decoder) reads each record's documents as memories and learns to
write the target answer (a teacher's ``label`` or the gold ``answer``): cross-entropy on the
answer tokens only, with exactly the prompt used at inference (``renderer.pisco_turns`` +
``render``, then the answer tokens and eos). What trains:

- PISCO: ``encoder_adapter`` and ``decoder_adapter`` (LoRA) and the embedding rows of the added
  tokens (``<MEM0..>``, ``<AE>``, ``<ENC>``, ``<SEP>``): a gradient hook zeroes every other row,
  and the embedding group has no weight decay, so the base vocabulary never moves;
- OSCAR: the compressor (fully, or LoRA with its memory/rerank token rows), connector and
  reranking head, and ``decoder_adapter``; with ``teacher_scores`` the head is distilled
  (weight ``rerank_weight``, 0.05) with an L2 term on the scores (``rerank_loss="l2"``, as in
  OSCAR) or, scale-free, the cross-entropy of the head's softmax over each question's documents
  against the teacher's (``"listwise"``, teacher scores divided by ``RERANK_TEMPERATURE``).

AdamW (weight decay 0.1, none on biases/norms/embeddings), separate learning rates for the
compressor and the decoder, 5% linear warm-up then linear decay, gradient clipping 1.0,
gradient accumulation, bf16 autocast on GPU, checkpoints every ``save_steps`` (pisco-rag native
format + ``trainable.safetensors`` + the Trainer's optimizer/scheduler/RNG state) and resume,
periodic evaluation (loss, and optionally Match of generated answers).

The differentiable forward lives here because :meth:`PiscoModel._compress_batch` and
:meth:`PiscoModel._embed` run under ``torch.no_grad``; it mirrors them op for op.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments

from ..adapters import DECODER, ENCODER, use_adapter
from ..errors import PiscoInputError
from ..memory import Memory
from ..model import PiscoModel, tail_forward
from ..prompting import pisco_encoder_inputs, text_ids
from . import RERANK_LOSSES
from .data import load_records, record_task, resolve_target_field, training_target

logger = logging.getLogger(__name__)

RERANK_TEMPERATURE = 0.1  # listwise: teacher scores of 0/1 (gold) give the gold 0.9998

TRAINABLE_FILE = "trainable.safetensors"
_PLACEHOLDER = Memory(
    torch.zeros(1, 1), "", "0" * 32
)  # rendering only needs to know where slots go


@dataclass
class TrainConfig:
    """Hyper-parameters and bookkeeping of a distillation run (defaults follow the papers)."""

    output_dir: str
    target_field: str | None = None  # "label" (teacher) or "answer"; None: label if present
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    batch_size: int = 8
    eval_batch_size: int | None = None
    gradient_accumulation_steps: int = 1
    decoder_lr: float = 1e-4
    compressor_lr: float = 1e-4  # encoder adapter / OSCAR compressor, memory-token embeddings
    # the OSCAR reranking head (a dense layer on a hidden state of norm ~100 whose spread over
    # documents is a few %): None = compressor_lr, which moves its scores apart too slowly
    head_lr: float | None = None
    weight_decay: float = 0.1
    warmup_ratio: float = 0.05
    max_grad_norm: float = 1.0
    rerank_weight: float = 0.05
    rerank_loss: Literal["l2", "listwise"] = "l2"
    compressor_tuning: Literal["full", "lora"] = "full"  # OSCAR compressors
    max_answer_tokens: int = 64
    logging_steps: int = 10
    eval_steps: int | None = None  # None: evaluate only at the end (if there is eval data)
    eval_generate: int = 0  # also generate answers for this many eval records (Match)
    save_steps: int = 500
    save_total_limit: int | None = 3
    bf16: bool | None = None  # None: on CUDA with bf16 support
    seed: int = 0
    dataloader_num_workers: int = 0
    gradient_checkpointing: bool = False
    # standardise memories before training (PiscoModel.calibrate_memories) on the first
    # training documents, unless the model already is
    calibrate_memories: bool = False
    # context distillation from the same backbone reading the documents as text (adapters off):
    # KL on the next-token distributions of every position after the context (question, answer)
    context_distillation: float = 0.0
    # ... and the relative squared distance of the hidden states there, every 4th layer
    hidden_distillation: float = 0.0
    # this share of QA records is read as text by the decoder adapter, so it keeps reading text
    text_context_ratio: float = 0.0
    # batches of records whose decoder rows have about the same length (transformers'
    # LengthGroupedSampler): text rows and memory rows, or auto-encoding and QA rows, do not
    # pad each other
    group_by_length: bool = True
    show_progress: bool = True
    # more TrainingArguments, or other values of those set here (lr_scheduler_type...)
    extra_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_lr is not None and not self.head_lr > 0:
            raise PiscoInputError(f"head_lr must be positive, got {self.head_lr}")
        if self.rerank_loss not in RERANK_LOSSES:
            raise PiscoInputError(
                f"rerank_loss must be one of {RERANK_LOSSES}, got {self.rerank_loss!r}"
            )
        if self.compressor_tuning not in ("full", "lora"):
            raise PiscoInputError(
                f"compressor_tuning must be 'full' or 'lora', got {self.compressor_tuning!r}"
            )
        for name in ("batch_size", "gradient_accumulation_steps", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise PiscoInputError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("context_distillation", "hidden_distillation"):
            if getattr(self, name) < 0:
                raise PiscoInputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.text_context_ratio < 1:
            raise PiscoInputError(
                f"text_context_ratio must be in [0, 1) (the share of records read as text), "
                f"got {self.text_context_ratio}"
            )
        if not 0 <= self.warmup_ratio < 1:
            raise PiscoInputError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


# ---------------------------------------------------------------------- collation
class DistillationCollator:
    """Turns records into tensors: compressor inputs for every chunk of every document, and
    left-padded decoder sequences (PISCO prompt with one memory slot per chunk, then the
    answer and eos) with labels on the answer tokens only."""

    def __init__(
        self,
        model: PiscoModel,
        target_field: str | None,
        max_answer_tokens: int = 64,
        text_teacher: bool = False,
        text_context_ratio: float = 0.0,
    ) -> None:
        self.model = model
        self.target_field = target_field
        self.max_answer_tokens = max_answer_tokens
        self.text_teacher = text_teacher
        self.text_context_ratio = text_context_ratio
        tok = model.tokenizer
        if tok.eos_token_id is None:
            raise PiscoInputError("the backbone's tokenizer has no eos token")

    def prompt_ids(self, question: str, n_chunks: int) -> list[int]:
        """Token ids of the inference prompt with ``n_chunks`` memory slots."""
        r = self.model.renderer
        turns = r.pisco_turns(question, [_PLACEHOLDER] * n_chunks, self.model.config.system_prompt)
        return r.render(turns).input_ids

    def reads_text(self, record: dict[str, Any]) -> bool:
        """Whether the decoder would read this QA record's documents as text instead of
        memories: a fixed ``text_context_ratio`` share of the records, chosen by a hash of the
        question (the same records on every epoch and after a resume). Only records whose
        documents fill at most two chunks are read as text (a long text row would pad the whole
        batch to its length)."""
        if not self.text_context_ratio:
            return False
        return zlib.crc32(record["question"].encode()) / 2**32 < self.text_context_ratio

    def text_prompt_ids(self, question: str, documents: Sequence[str]) -> list[int]:
        """Token ids of the text-RAG prompt: the documents inline where the memories go."""
        r = self.model.renderer
        return r.render(
            r.pisco_turns(question, documents, self.model.config.system_prompt)
        ).input_ids

    def pretraining_prompt_ids(self, task: str, n_chunks: int) -> list[int]:
        """Naver's pre-training layout, no chat template: bos, the memory slots, then ``<AE>``
        for auto-encoding (rebuild the chunk) or nothing for continuation (go on with the text
        that follows the chunk)."""
        tok, model = self.model.tokenizer, self.model
        slots = [*model.mem_token_ids, tok.convert_tokens_to_ids("<SEP>")] * n_chunks
        tail = [tok.convert_tokens_to_ids("<AE>")] if task == "ae" else []
        return [tok.bos_token_id, *slots, *tail]

    def _row(self, rec: dict[str, Any]) -> tuple[list[tuple[int, str]], bool, list[int], list[int]]:
        """One record's chunks ``(document index, text)`` for the compressor, whether the
        decoder reads it as text, and its decoder prompt and target token ids."""
        model, tok = self.model, self.model.tokenizer
        task = record_task(rec)
        chunks = [(d, c) for d, doc in enumerate(rec["documents"]) for c in model.chunk(doc)]
        as_text = task == "qa" and len(chunks) <= 2 and self.reads_text(rec)
        if as_text:
            chunks = []
            prompt = self.text_prompt_ids(rec["question"], rec["documents"])
            limit = self.max_answer_tokens
        elif task == "qa":
            prompt = self.prompt_ids(rec["question"], len(chunks))
            limit = self.max_answer_tokens
        else:
            prompt = self.pretraining_prompt_ids(task, len(chunks))
            limit = model.config.doc_max_length
        answer: list[int] = []
        field_name = self.target_field if task == "qa" else "answer"
        if field_name is not None:
            target = training_target(rec, field_name)
            if target is None:
                raise PiscoInputError(f"record {rec.get('id')!r} has no {field_name!r} to learn")
            answer = [*text_ids(tok, target)[:limit], tok.eos_token_id]
        return chunks, as_text, prompt, answer

    def decoder_length(self, rec: dict[str, Any]) -> int:
        """Length of the record's decoder row (prompt and target): what batches are grouped by,
        so that memory rows and long text rows do not pad each other."""
        _, _, prompt, answer = self._row(rec)
        return len(prompt) + len(answer)

    def __call__(self, records: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        tok = self.model.tokenizer
        texts, queries, chunk_doc, rows = [], [], [], []
        scores, score_mask, doc_record, n_docs = [], [], [], 0
        teacher_rows: list[list[int]] = []
        for rec in records:
            chunks, as_text, prompt, answer = self._row(rec)
            texts += [c for _, c in chunks]
            queries += [rec["question"]] * len(chunks)
            chunk_doc += [n_docs + d for d, _ in chunks]
            teacher = rec.get("teacher_scores")
            scores += [float(s) for s in teacher] if teacher else [0.0] * len(rec["documents"])
            score_mask += [teacher is not None and not as_text] * len(rec["documents"])
            doc_record += [len(rows)] * len(rec["documents"])
            n_docs += len(rec["documents"])
            rows.append((prompt, answer))
            if self.text_teacher:
                distil = record_task(rec) == "qa" and not as_text
                text = self.text_prompt_ids(rec["question"], rec["documents"]) if distil else []
                teacher_rows.append(text + answer if text else [])
        batch = self._compressor_inputs(texts, queries) if texts else {}
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for row, (prompt, answer) in enumerate(rows):
            seq = prompt + answer
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
            if answer:
                labels[row, width - len(answer) :] = torch.tensor(answer)
        batch.update(input_ids=ids, attention_mask=mask, labels=labels)
        if self.text_teacher:
            batch.update(self._teacher_inputs(teacher_rows, [p + a for p, a in rows]))
        if any(score_mask):
            batch["teacher_scores"] = torch.tensor(scores, dtype=torch.float32)
            batch["score_mask"] = torch.tensor(score_mask, dtype=torch.bool)
            batch["chunk_document"] = torch.tensor(chunk_doc, dtype=torch.long)
            batch["document_record"] = torch.tensor(doc_record, dtype=torch.long)
        return batch

    def _teacher_inputs(
        self, teacher_rows: list[list[int]], student_rows: list[list[int]]
    ) -> dict[str, torch.Tensor]:
        """Left-padded text-RAG rows and, per row, how many final tokens the two sequences
        share (the question, the turn markers and the answer: the positions to distil)."""
        pad = self.model.tokenizer.pad_token_id
        width = max(1, *(len(t) for t in teacher_rows))
        ids = torch.full((len(teacher_rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(teacher_rows), width), dtype=torch.long)
        shared = torch.zeros(len(teacher_rows), dtype=torch.long)
        for row, (teacher, student) in enumerate(zip(teacher_rows, student_rows, strict=True)):
            if not teacher:
                continue
            ids[row, width - len(teacher) :] = torch.tensor(teacher)
            mask[row, width - len(teacher) :] = 1
            n = 0
            while n < min(len(teacher), len(student)) and teacher[-1 - n] == student[-1 - n]:
                n += 1
            shared[row] = n
        return {"teacher_input_ids": ids, "teacher_attention_mask": mask, "shared_suffix": shared}

    def _compressor_inputs(self, texts: list[str], queries: list[str]) -> dict[str, torch.Tensor]:
        model = self.model
        if model.compressor is not None:  # OSCAR: query-dependent
            comp = model.compressor
            inputs = comp.encode_inputs(texts, queries, query_mask=comp.interaction)
            return dict(zip(("enc_input_ids", "enc_attention_mask", "enc_query_mask"), inputs))
        # padded to the longest chunk of the batch, not to the fixed inference width: the same
        # memories up to float rounding, with less padding to compute on
        ids, mask = pisco_encoder_inputs(model.tokenizer, texts, model.mem_token_ids, width=None)
        return {"enc_input_ids": ids, "enc_attention_mask": mask}


# ---------------------------------------------------------------------- the student
class StudentModule(nn.Module):
    """The differentiable forward of a :class:`PiscoModel`: compress, splice, decode, loss."""

    accepts_loss_kwargs = False  # per-batch mean; the Trainer scales for accumulation

    def __init__(
        self,
        pisco: PiscoModel,
        rerank_weight: float = 0.05,
        context_distillation: float = 0.0,
        hidden_distillation: float = 0.0,
        rerank_loss: str = "l2",
    ) -> None:
        super().__init__()
        self.backbone = pisco.model
        self.compressor = pisco.compressor
        self.rerank_weight = rerank_weight
        self.rerank_loss = rerank_loss
        self.context_distillation = context_distillation
        self.hidden_distillation = hidden_distillation
        object.__setattr__(self, "pisco", pisco)  # not a submodule
        self.trainable: list[nn.Parameter] = []

    def _keep_trainable(self) -> None:
        # peft's set_adapter switches requires_grad off for the inactive adapter, which would
        # drop its gradient at backward time: switch it back on for everything being trained.
        for p in self.trainable:
            p.requires_grad_(True)

    def compress(
        self,
        enc_input_ids: torch.Tensor,
        enc_attention_mask: torch.Tensor,
        enc_query_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(memories ``[chunks, n_mem, hidden]``, rerank scores ``[chunks]`` or None)."""
        if self.compressor is not None:
            memories, scores = self.compressor(enc_input_ids, enc_attention_mask, enc_query_mask)
            return self.pisco.standardise_memories(memories), scores
        if self.pisco.config.compressor == "token-mean":
            return self.pisco._token_mean_memories(enc_input_ids, enc_attention_mask), None
        use_adapter(self.backbone, ENCODER)
        self._keep_trainable()
        hidden = self.backbone.base_model(
            input_ids=enc_input_ids, attention_mask=enc_attention_mask
        )[0]
        return self.pisco.standardise_memories(hidden[:, -self.pisco.n_mem :, :]), None

    @torch.no_grad()
    def _text_teacher(self, ids: torch.Tensor, mask: torch.Tensor, keep: int) -> Any:
        """The plain backbone (every adapter off) reading the documents as text."""
        use_adapter(self.backbone, None)
        try:
            embeds = self.backbone.get_input_embeddings()(ids)
            return tail_forward(
                self.backbone, embeds, mask, keep, hidden=self.hidden_distillation > 0
            )
        finally:
            use_adapter(self.backbone, DECODER)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        enc_input_ids: torch.Tensor | None = None,
        enc_attention_mask: torch.Tensor | None = None,
        enc_query_mask: torch.Tensor | None = None,
        teacher_scores: torch.Tensor | None = None,
        score_mask: torch.Tensor | None = None,
        chunk_document: torch.Tensor | None = None,
        document_record: torch.Tensor | None = None,
        teacher_input_ids: torch.Tensor | None = None,
        teacher_attention_mask: torch.Tensor | None = None,
        shared_suffix: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        pisco = self.pisco
        distil = (
            shared_suffix is not None
            and self.training
            and (self.context_distillation > 0 or self.hidden_distillation > 0)
        )
        with pisco._lock:
            memories, scores = None, None
            if enc_input_ids is not None:  # None: every row reads its documents as text
                memories, scores = self.compress(enc_input_ids, enc_attention_mask, enc_query_mask)
            use_adapter(self.backbone, DECODER)
            self._keep_trainable()
            embeds = self.backbone.get_input_embeddings()(input_ids)
            slots = torch.isin(
                input_ids, torch.tensor(pisco.mem_token_ids, device=input_ids.device)
            )
            slots &= attention_mask.bool()
            n_vectors = 0 if memories is None else memories.shape[0] * memories.shape[1]
            if int(slots.sum()) != n_vectors:
                raise PiscoInputError(
                    "the batch's memory slots do not match its memories; a document may contain "
                    "memory-token strings"
                )
            if memories is not None:
                vectors = memories.reshape(-1, memories.shape[-1]).to(embeds.dtype)
                embeds = embeds.masked_scatter(slots.unsqueeze(-1), vectors)
            answer_len = int((labels != -100).sum(-1).max())
            keep = answer_len + 1  # answers sit at the end of the left-padded rows
            if distil:
                keep = max(keep, int(shared_suffix.max()))
                teacher = self._text_teacher(teacher_input_ids, teacher_attention_mask, keep)
                self._keep_trainable()
            student = tail_forward(
                self.backbone,
                embeds,
                attention_mask,
                keep,
                hidden=distil and self.hidden_distillation > 0,
            )
        logits = student.logits
        targets = labels[:, -keep:][:, 1:]
        ce = nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
        )
        out = {"loss": ce, "ce_loss": ce.detach()}
        if distil:
            # positions inside the shared suffix that predict a token of it
            index = torch.arange(keep, device=logits.device)
            where = (index >= keep - shared_suffix.unsqueeze(1)) & (index < keep - 1)
            where &= attention_mask[:, -keep:].bool()
            if where.any():
                if self.context_distillation > 0:
                    kl = context_kl(logits, teacher.logits, where)
                    out["loss"] = out["loss"] + self.context_distillation * kl
                    out["context_kl"] = kl.detach()
                if self.hidden_distillation > 0:
                    hid = hidden_distance(student.hidden_states, teacher.hidden_states, where, keep)
                    out["loss"] = out["loss"] + self.hidden_distillation * hid
                    out["hidden_distance"] = hid.detach()
        if scores is not None and teacher_scores is not None and self.rerank_weight:
            doc_scores = torch.full(
                (teacher_scores.shape[0],), float("-inf"), device=scores.device, dtype=scores.dtype
            ).scatter_reduce(0, chunk_document, scores, reduce="amax", include_self=False)
            mask = score_mask.bool()
            student_scores, target = doc_scores[mask].float(), teacher_scores[mask].float()
            if self.rerank_loss == "listwise":
                rerank = listwise_rerank_loss(student_scores, target, document_record[mask])
            else:
                rerank = ((student_scores - target) ** 2).mean()
            out["loss"] = out["loss"] + self.rerank_weight * rerank
            out["rerank_loss"] = rerank.detach()
        return out


def listwise_rerank_loss(
    scores: torch.Tensor, teacher: torch.Tensor, group: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of ``softmax(scores)`` against ``softmax(teacher / RERANK_TEMPERATURE)``
    within each ``group`` (one question's documents), mean over the groups."""
    terms = [
        -(
            torch.softmax(teacher[group == g] / RERANK_TEMPERATURE, -1)
            * torch.log_softmax(scores[group == g], -1)
        ).sum()
        for g in group.unique()
    ]
    return torch.stack(terms).mean()


def context_kl(student: torch.Tensor, teacher: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) of next-token distributions, mean over the ``where`` positions
    (logits ``[rows, positions, vocab]``, aligned from the end)."""
    s = nn.functional.log_softmax(student[where].float(), dim=-1)
    t = nn.functional.log_softmax(teacher[where].float(), dim=-1)
    return nn.functional.kl_div(s, t, log_target=True, reduction="batchmean")


def hidden_distance(
    student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], where: torch.Tensor, keep: int
) -> torch.Tensor:
    """Mean over layers (every 4th, counted down from the one before last; the logits cover
    the last) of ``|h_s - h_t|^2 / |h_t|^2`` at the ``where`` positions of the last ``keep``
    tokens."""
    layers = range(len(teacher) - 2, 0, -4)
    terms = []
    for layer in layers:
        s, t = student[layer][:, -keep:][where].float(), teacher[layer][:, -keep:][where].float()
        terms.append(((s - t).pow(2).sum(-1) / t.pow(2).sum(-1).clamp(min=1e-6)).mean())
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------- what trains
@dataclass
class TrainableSetup:
    """Parameter groups and the hooks/flags to undo after training."""

    groups: list[dict[str, Any]]
    named: dict[str, nn.Parameter]
    hooks: list[Any]
    saved_flags: list[tuple[nn.Parameter, bool]]

    def restore(self) -> None:
        for h in self.hooks:
            h.remove()
        for p, flag in self.saved_flags:
            p.requires_grad_(flag)
        self.hooks.clear()


def _row_mask_hook(param: nn.Parameter, rows: Sequence[int]):
    mask = torch.zeros(param.shape[0], 1, dtype=param.dtype, device=param.device)
    mask[list(rows)] = 1
    return param.register_hook(lambda grad: grad * mask.to(grad.dtype))


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim < 2 or "norm" in name.lower() or "bias" in name


def add_compressor_lora(pisco: PiscoModel) -> None:
    """Wrap an OSCAR compressor body with a LoRA adapter (peft) for LoRA tuning."""
    from peft import LoraConfig, PeftModel, get_peft_model

    body = pisco.compressor.body
    if isinstance(body, PeftModel):
        return
    cfg = pisco.config
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear",
    )
    pisco.compressor.body = get_peft_model(body, lora)


def setup_trainable(student: StudentModule, config: TrainConfig) -> TrainableSetup:
    """Freeze everything, then enable and group what trains (see the module docstring)."""
    pisco = student.pisco
    params = list(student.named_parameters())
    saved = [(p, p.requires_grad) for _, p in params]
    for _, p in params:
        p.requires_grad_(False)
    decoder, compressor, embeddings = [], [], []
    for name, p in pisco.model.named_parameters():
        if f"lora_A.{DECODER}" in name or f"lora_B.{DECODER}" in name:
            decoder.append((f"backbone.{name}", p))
        elif f".{ENCODER}." in name and "lora_" in name:
            compressor.append((f"backbone.{name}", p))
    emb = pisco.model.get_input_embeddings().weight
    embeddings.append(("backbone.embeddings", emb))
    masked = [(emb, pisco._added_token_ids())]
    if pisco.compressor is not None:
        comp = pisco.compressor
        if config.compressor_tuning == "lora":
            add_compressor_lora(pisco)
            student.compressor = comp  # re-register (the body changed)
            for name, p in comp.named_parameters():
                if name.startswith("body.") and "lora_" not in name:
                    continue
                compressor.append((f"compressor.{name}", p))
            cemb = comp.body.get_input_embeddings().weight
            rows = [*comp.mem_token_ids]
            if comp.rerank_token_id is not None:
                rows.append(comp.rerank_token_id)
            embeddings.append(("compressor.embeddings", cemb))
            masked.append((cemb, rows))
        else:
            compressor += [(f"compressor.{n}", p) for n, p in comp.named_parameters()]
    seen: set[int] = set()
    named: dict[str, nn.Parameter] = {}

    def unique(items):
        out = []
        for name, p in items:
            if id(p) not in seen:
                seen.add(id(p))
                named[name] = p
                out.append((name, p))
        return out

    embeddings, decoder, compressor = unique(embeddings), unique(decoder), unique(compressor)
    scoring = ("compressor.head.", "compressor.interaction_scale")
    head = [(n, p) for n, p in compressor if n.startswith(scoring)]
    compressor = [(n, p) for n, p in compressor if not n.startswith(scoring)]
    head_lr = config.compressor_lr if config.head_lr is None else config.head_lr
    wd = config.weight_decay
    groups = [
        {"params": [p for _, p in embeddings], "lr": config.compressor_lr, "weight_decay": 0.0},
        {
            "params": [p for n, p in decoder if not _no_decay(n, p)],
            "lr": config.decoder_lr,
            "weight_decay": wd,
        },
        {
            "params": [p for n, p in decoder if _no_decay(n, p)],
            "lr": config.decoder_lr,
            "weight_decay": 0.0,
        },
        {
            "params": [p for n, p in compressor if not _no_decay(n, p)],
            "lr": config.compressor_lr,
            "weight_decay": wd,
        },
        {
            "params": [p for n, p in compressor if _no_decay(n, p)],
            "lr": config.compressor_lr,
            "weight_decay": 0.0,
        },
        {"params": [p for n, p in head if not _no_decay(n, p)], "lr": head_lr, "weight_decay": wd},
        {"params": [p for n, p in head if _no_decay(n, p)], "lr": head_lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    for p in named.values():
        p.requires_grad_(True)
    hooks = [_row_mask_hook(param, rows) for param, rows in masked]
    student.trainable = list(named.values())
    return TrainableSetup(groups, named, hooks, saved)


# ---------------------------------------------------------------------- saving
def save_checkpoint(pisco: PiscoModel, directory: str | os.PathLike[str]) -> None:
    """The native pisco-rag format (``PiscoModel.from_pretrained`` reads it); a LoRA-tuned
    first-layers compressor is stored by reference (its LoRA factors), like the decoder."""
    pisco.config.trained = True
    pisco.save_pretrained(directory)


class PiscoTrainer(Trainer):
    """``Trainer`` with pisco-rag's parameter groups, native checkpoints and loss logging."""

    def __init__(
        self,
        *args: Any,
        pisco: PiscoModel,
        setup: TrainableSetup,
        answer_eval: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.pisco = pisco
        self.setup = setup
        self.answer_eval = answer_eval or []
        self._parts: dict[str, list[float]] = {}

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        if self.optimizer is None:
            args = self.args
            self.optimizer = torch.optim.AdamW(
                self.setup.groups,
                betas=(args.adam_beta1, args.adam_beta2),
                eps=args.adam_epsilon,
            )
        return self.optimizer

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        outputs = model(**inputs)
        if model.training:
            for key in ("ce_loss", "rerank_loss", "context_kl", "hidden_distance"):
                if key in outputs:
                    self._parts.setdefault(key, []).append(float(outputs[key]))
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            for key, values in self._parts.items():
                if values:
                    logs[key] = round(sum(values) / len(values), 4)
            self._parts = {}
        super().log(logs, start_time)

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        metrics = super().evaluate(*args, **kwargs)
        if self.answer_eval:
            extra = generation_match(self.pisco, self.answer_eval)
            self.log(extra)
            metrics.update(extra)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        from safetensors.torch import save_file

        save_checkpoint(self.pisco, output_dir)
        save_file(
            {n: p.detach().contiguous().cpu() for n, p in self.setup.named.items()},
            os.path.join(output_dir, TRAINABLE_FILE),
            metadata={"format": "pt"},
        )
        args = {k: v for k, v in self.args.to_dict().items() if _jsonable(v)}
        Path(output_dir, "training_args.json").write_text(json.dumps(args, indent=2) + "\n")

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        load_trainable(self.setup, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        ckpt = self.state.best_model_checkpoint
        if ckpt:
            load_trainable(self.setup, ckpt)


def _jsonable(v: Any) -> bool:
    try:
        json.dumps(v)
    except (TypeError, ValueError):
        return False
    return True


def load_trainable(setup: TrainableSetup, checkpoint: str | os.PathLike[str]) -> None:
    """Copy a checkpoint's ``trainable.safetensors`` into the live parameters."""
    from safetensors.torch import load_file

    path = Path(checkpoint) / TRAINABLE_FILE
    if not path.is_file():
        raise PiscoInputError(
            f"resume_from_checkpoint {str(checkpoint)!r} has no {TRAINABLE_FILE}: it is not a "
            "checkpoint of `pisco-rag train`"
        )
    saved = load_file(path)
    missing = sorted(set(setup.named) - set(saved))
    unexpected = sorted(set(saved) - set(setup.named))
    if missing or unexpected:
        raise PiscoInputError(
            f"resume_from_checkpoint {str(checkpoint)!r} does not fit this model and setup "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); resume with the same model "
            "and compressor_tuning"
        )
    with torch.no_grad():
        for name, p in setup.named.items():
            if saved[name].shape != p.shape:
                raise PiscoInputError(f"{path}: {name} has shape {tuple(saved[name].shape)}")
            p.copy_(saved[name].to(p.dtype))


# ---------------------------------------------------------------------- evaluation helpers
@torch.no_grad()
def distillation_loss(
    pisco: PiscoModel,
    records: Sequence[dict[str, Any]],
    target_field: str = "answer",
    *,
    batch_size: int = 8,
    rerank_weight: float = 0.05,
    rerank_loss: str = "l2",
) -> dict[str, float]:
    """Mean training loss of ``records`` under the current weights (eval mode, no gradient):
    ``{"loss", "ce_loss"[, "rerank_loss"]}``, averaged over batches."""
    student = StudentModule(pisco, rerank_weight=rerank_weight, rerank_loss=rerank_loss).eval()
    collator = DistillationCollator(pisco, target_field)
    sums: dict[str, float] = {}
    n = 0
    for start in range(0, len(records), batch_size):
        batch = collator(list(records[start : start + batch_size]))
        batch = {k: v.to(pisco.device) for k, v in batch.items()}
        out = student(**batch)
        for k, v in out.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        n += 1
    use_adapter(pisco.model, DECODER)
    return {k: v / n for k, v in sums.items()}


def generation_match(
    pisco: PiscoModel, records: Sequence[dict[str, Any]], max_new_tokens: int = 32
) -> dict[str, float]:
    """Match of compressed-RAG answers on ``records`` (gold ``answer``), without the store,
    and the answer-likelihood diagnostics (``answer_diagnostics``): they show memories
    starting to carry the answer long before Match moves."""
    from ..evaluation.metrics import answer_metrics
    from ..evaluation.runner import answer_diagnostics

    was_training = pisco.model.training
    pisco.model.eval()
    if pisco.compressor is not None:
        pisco.compressor.eval()
    pisco.refresh_fingerprint()
    try:
        contexts = []
        for rec in records:
            queries = [rec["question"]] * len(rec["documents"]) if pisco.config.is_oscar else None
            contexts.append(pisco.compress(rec["documents"], queries=queries, use_store=False))
        questions = [r["question"] for r in records]
        preds = pisco.generate(questions, contexts, max_new_tokens=max_new_tokens)
        diagnostics = answer_diagnostics(
            pisco,
            questions,
            [r["documents"] for r in records],
            contexts,
            [r["answer"] for r in records],
        )
    finally:
        if was_training:
            pisco.model.train()
            if pisco.compressor is not None:
                pisco.compressor.train()
    m = answer_metrics(preds, [r["answer"] for r in records])
    return {
        "eval_match": m["match"],
        "eval_f1": m["f1"],
        **{f"eval_{k}": round(v, 4) for k, v in diagnostics.items()},
    }


# ---------------------------------------------------------------------- entry point
def _default_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def train(
    model: PiscoModel,
    train_data: Any,
    eval_data: Any = None,
    config: TrainConfig | None = None,
    *,
    resume_from_checkpoint: str | bool | None = None,
    callbacks: list[TrainerCallback] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Distil ``model`` on ``train_data`` (JSONL path, saved dataset, ``datasets.Dataset`` or
    list of records); returns ``{"final": dir, "global_step": n, "log_history": [...]}``.

    ``resume_from_checkpoint``: a ``checkpoint-N`` directory of an earlier run (with the same
    model and settings), or True for the latest one in ``output_dir``. The final model is saved
    in the native format under ``output_dir/final``; ``model`` is trained in place and left in
    eval mode with a fresh fingerprint.
    """
    if config is None:
        if "output_dir" not in overrides:
            raise PiscoInputError("train() needs config=TrainConfig(...) or output_dir=")
        config = TrainConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    if model.dtype in (torch.float16, torch.bfloat16):
        logger.warning(
            "the model's weights are %s: training updates in half precision lose small steps; "
            "load it with dtype=torch.float32 (bf16 autocast is used on GPU)",
            model.dtype,
        )
    train_ds = load_records(train_data)
    if "split" in train_ds.column_names and "eval" in set(train_ds["split"]):
        raise PiscoInputError(
            "train_data holds records of the evaluation split (split='eval'): never train on "
            "them; build training records with `pisco-rag build-data --split train`"
        )
    target = resolve_target_field(train_ds.column_names, config.target_field)
    missing = sum(1 for t in train_ds[target] if t is None or t == "" or t == [])
    if missing:
        train_ds = train_ds.filter(lambda r: training_target(r, target) is not None)
        logger.warning("%d training records have no %r and are skipped", missing, target)
        if len(train_ds) == 0:
            raise PiscoInputError(f"no training record has a {target!r}")
    if "teacher_scores" in train_ds.column_names and (
        model.compressor is None or model.compressor.head is None
    ):
        logger.warning("teacher_scores are ignored: the model has no reranking head")
        train_ds = train_ds.remove_columns("teacher_scores")
    eval_ds = load_records(eval_data, split="validation") if eval_data is not None else None
    eval_target = None
    if eval_ds is not None:
        eval_target = target if target in eval_ds.column_names else "answer"
        if eval_target not in eval_ds.column_names:
            raise PiscoInputError(f"eval data has neither {target!r} nor 'answer'")
        if "teacher_scores" in eval_ds.column_names and (
            model.compressor is None or model.compressor.head is None
        ):
            eval_ds = eval_ds.remove_columns("teacher_scores")

    if config.calibrate_memories and model.config.memory_shift is None:
        sample = train_ds.select(range(min(len(train_ds), 32)))
        texts = [d for r in sample for d in r["documents"]]
        queries = [r["question"] or "" for r in sample for _ in r["documents"]]
        model.calibrate_memories(texts, queries if model.config.is_oscar else None)
        logger.info("memories standardised on %d training documents", len(texts))
    distil = config.context_distillation > 0 or config.hidden_distillation > 0
    collator = DistillationCollator(
        model,
        target,
        config.max_answer_tokens,
        text_teacher=distil,
        text_context_ratio=config.text_context_ratio,
    )
    eval_collator = DistillationCollator(model, eval_target, config.max_answer_tokens)
    if config.group_by_length:  # the sampler groups evaluation batches too
        train_ds = _with_lengths(train_ds, collator, config.show_progress)
        if eval_ds is not None:
            eval_ds = _with_lengths(eval_ds, eval_collator, config.show_progress)
    bf16 = _default_bf16() if config.bf16 is None else config.bf16
    has_eval = eval_ds is not None
    arguments = dict(
        output_dir=config.output_dir,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size or config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.decoder_lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type="linear",
        max_grad_norm=config.max_grad_norm,
        max_steps=config.max_steps,
        num_train_epochs=config.num_train_epochs,
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_eval and config.eval_steps else "no",
        eval_steps=config.eval_steps if has_eval and config.eval_steps else None,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        bf16=bf16,
        seed=config.seed,
        dataloader_num_workers=config.dataloader_num_workers,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        prediction_loss_only=True,
        report_to="none",
        disable_tqdm=not config.show_progress,
        use_cpu=model.device.type == "cpu",
    )
    args = TrainingArguments(**{**arguments, **config.extra_args})  # extra_args override
    answer_eval = None
    if has_eval and config.eval_generate:
        if "answer" not in eval_ds.column_names:
            raise PiscoInputError("eval_generate needs an 'answer' field in the eval data")
        answer_eval = [eval_ds[i] for i in range(min(config.eval_generate, len(eval_ds)))]
    student = StudentModule(
        model,
        rerank_weight=config.rerank_weight,
        context_distillation=config.context_distillation,
        hidden_distillation=config.hidden_distillation,
        rerank_loss=config.rerank_loss,
    )
    setup = setup_trainable(student, config)
    try:
        if config.gradient_checkpointing:
            model.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        trainer = PiscoTrainer(
            model=student,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            data_collator=collator,
            callbacks=callbacks,
            pisco=model,
            setup=setup,
            answer_eval=answer_eval,
        )
        if eval_ds is not None:
            trainer.get_eval_dataloader = _eval_loader(trainer, eval_collator)
        result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
        if eval_ds is not None:
            trainer.evaluate()
    finally:
        student.eval()
        setup.restore()
        if config.gradient_checkpointing:
            model.model.activation_checkpointing_disable()
        use_adapter(model.model, DECODER)
        model.refresh_fingerprint()
    final = Path(config.output_dir) / "final"
    save_checkpoint(model, final)
    history = trainer.state.log_history
    (Path(config.output_dir) / "train_log.json").write_text(json.dumps(history, indent=2) + "\n")
    return {
        "final": str(final),
        "global_step": trainer.state.global_step,
        "train_loss": result.training_loss if not math.isnan(result.training_loss) else None,
        "log_history": history,
    }


def _with_lengths(ds: Any, collator: DistillationCollator, show_progress: bool) -> Any:
    """``ds`` with a ``length`` column (decoder row lengths) for the length-grouped sampler."""
    if "length" in ds.column_names:
        ds = ds.remove_columns("length")
    rows = tqdm(ds, desc="decoder row lengths", disable=not show_progress, leave=False)
    return ds.add_column("length", [collator.decoder_length(r) for r in rows])


def _eval_loader(trainer: PiscoTrainer, collator: DistillationCollator):
    original = trainer.get_eval_dataloader

    def get_eval_dataloader(eval_dataset: Any = None):
        saved = trainer.data_collator
        trainer.data_collator = collator
        try:
            return original(eval_dataset)
        finally:
            trainer.data_collator = saved

    return get_eval_dataloader


__all__ = [
    "DistillationCollator",
    "PiscoTrainer",
    "StudentModule",
    "TrainConfig",
    "distillation_loss",
    "generation_match",
    "load_trainable",
    "save_checkpoint",
    "setup_trainable",
    "train",
]
