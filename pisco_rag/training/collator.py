"""Records to tensors for the distillation student (:class:`DistillationCollator`)."""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import PiscoInputError
from ..memory import Memory
from ..model import PiscoModel
from ..prompting import pisco_encoder_inputs, text_ids
from .data import record_task, training_target

_PLACEHOLDER = Memory(
    torch.zeros(1, 1), "", "0" * 32
)  # rendering only needs to know where slots go


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
            batch = dict(zip(("enc_input_ids", "enc_attention_mask", "enc_query_mask"), inputs))
            if model.config.token_mean_memories:  # the compressor scores, memories are means
                ids, mask = pisco_encoder_inputs(
                    model.tokenizer, texts, model.mem_token_ids, width=None
                )
                batch.update(token_input_ids=ids, token_attention_mask=mask)
            return batch
        # padded to the longest chunk of the batch, not to the fixed inference width: the same
        # memories up to float rounding, with less padding to compute on
        ids, mask = pisco_encoder_inputs(model.tokenizer, texts, model.mem_token_ids, width=None)
        return {"enc_input_ids": ids, "enc_attention_mask": mask}


__all__ = ["DistillationCollator"]
