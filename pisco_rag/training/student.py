"""The differentiable forward of a PISCO / OSCAR model and its losses (:class:`StudentModule`).

It lives here because :meth:`PiscoModel._compress_batch` and :meth:`PiscoModel._embed` run
under ``torch.no_grad``; it mirrors them op for op: compress, splice the memories into the
decoder's prompt, decode, then cross-entropy on the answer tokens, plus the optional context
distillation (KL, hidden states) and the OSCAR head's rerank loss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..adapters import DECODER, ENCODER, use_adapter
from ..errors import PiscoInputError
from ..model import PiscoModel, tail_forward
from .collator import DistillationCollator

RERANK_TEMPERATURE = 0.1  # listwise: teacher scores of 0/1 (gold) give the gold 0.9998


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
        if self.pisco.config.token_mean_memories:
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
        token_input_ids: torch.Tensor | None = None,
        token_attention_mask: torch.Tensor | None = None,
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
            if token_input_ids is not None:  # OSCAR scores, token-mean memories
                memories = pisco._token_mean_memories(token_input_ids, token_attention_mask)
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


__all__ = [
    "RERANK_TEMPERATURE",
    "StudentModule",
    "context_kl",
    "distillation_loss",
    "hidden_distance",
    "listwise_rerank_loss",
]
