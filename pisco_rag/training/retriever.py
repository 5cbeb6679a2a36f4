"""Training the retriever adapter (Invar-RAG, arXiv 2411.07021): one backbone that retrieves.

Three terms, on records with a question, candidate passages (``documents``), the gold one
(``gold_index``) and the small embedder's similarities (``retrieval_scores``, from
``pisco-rag build-data``: all-MiniLM-L6-v2's cosine):

- **alignment**: KL(MiniLM's softmax over the candidates || the retriever's), so the LLM's
  similarities start from a good small embedder's;
- **contrastive**: InfoNCE of the question against its gold passage, with every other passage
  of the batch (in-batch and retrieved hard negatives) as negatives;
- **invariance**: the question and a perturbation of it that keeps its meaning (word dropout,
  casing, two neighbouring words swapped, an added instruction, fewer candidates) should embed
  alike and rank the batch's passages alike: ``1 - cos(q, q')`` plus the symmetric KL between
  the two ranking distributions.

The loss is ``alignment_weight * alignment + contrastive + invariance_weight * invariance``;
each term is logged. Only the retriever adapter trains; memories and answers do not change.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import set_peft_model_state_dict
from tqdm.auto import tqdm

from ..adapters import DECODER, RETRIEVER, adapter_state_dict, use_adapter
from ..embedding import pool, retrieval_hidden, retrieval_rows
from ..errors import PiscoInputError
from ..prompting import left_pad
from . import LR_SCHEDULES

logger = logging.getLogger(__name__)

INSTRUCTIONS = ("Question: ", "Please answer: ", "Find passages about this: ")


# ---------------------------------------------------------------------- losses
def similarity_distribution(query: torch.Tensor, candidates: torch.Tensor, temperature: float):
    """Log-softmax over candidates of ``cos(query, candidate) / temperature`` (unit vectors:
    ``query [b, h]``, ``candidates [b, n, h]``)."""
    return F.log_softmax(torch.einsum("bh,bnh->bn", query, candidates) / temperature, dim=-1)


def alignment_loss(
    query: torch.Tensor, candidates: torch.Tensor, teacher: torch.Tensor, temperature: float
) -> torch.Tensor:
    """KL(softmax(teacher / T) || the retriever's distribution), mean over the batch."""
    student = similarity_distribution(query, candidates, temperature)
    target = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean")


def contrastive_loss(
    query: torch.Tensor, passages: torch.Tensor, gold: torch.Tensor, temperature: float
) -> torch.Tensor:
    """InfoNCE: ``query[i]`` against every passage of the batch (``passages [m, h]``), the
    right one being ``passages[gold[i]]``."""
    return F.cross_entropy(query @ passages.T / temperature, gold)


def invariance_loss(
    query: torch.Tensor,
    perturbed: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """``1 - cos(q, q')`` plus the symmetric KL between the rankings of the candidates by
    ``q`` and by ``q'`` (``keep [b, n]``: the candidates the perturbed query sees)."""
    drift = (1 - (query * perturbed).sum(-1)).mean()
    a = similarity_distribution(query, candidates, temperature)
    b = similarity_distribution(perturbed, candidates, temperature)
    if keep is not None:  # compare the rankings over the candidates both saw
        a = F.log_softmax(a.masked_fill(~keep, float("-inf")), dim=-1).masked_fill(~keep, 0.0)
        b = F.log_softmax(b.masked_fill(~keep, float("-inf")), dim=-1).masked_fill(~keep, 0.0)
    pa, pb = a.exp(), b.exp()
    if keep is not None:
        pa, pb = pa * keep, pb * keep
    kl = ((pa * (a - b)).sum(-1) + (pb * (b - a)).sum(-1)).mean() / 2
    return drift + kl


# ---------------------------------------------------------------------- perturbations
def perturb(question: str, rng: random.Random) -> str:
    """A variant of ``question`` with the same meaning: one of word dropout (one word of a
    long question), casing, two neighbouring words swapped, an added instruction."""
    words = question.split()
    kind = rng.randrange(4)
    if kind == 0 and len(words) > 4:
        del words[rng.randrange(len(words))]
    elif kind == 1:
        return question.lower() if rng.random() < 0.5 else question.capitalize()
    elif kind == 2 and len(words) > 2:
        i = rng.randrange(len(words) - 1)
        words[i], words[i + 1] = words[i + 1], words[i]
    else:
        return rng.choice(INSTRUCTIONS) + question
    return " ".join(words)


# ---------------------------------------------------------------------- training
@dataclass
class RetrieverConfig:
    output_dir: str
    batch_size: int = 8
    lr: float = 2e-4
    max_steps: int = 200
    temperature: float = 0.05
    alignment_weight: float = 1.0
    invariance_weight: float = 1.0
    seed: int = 0
    logging_steps: int = 10
    max_passage_tokens: int = 128  # passages are cropped to this for training (memory, speed)
    max_candidates: int = 3  # per question: the gold passage and the top retrieved negatives
    chunk_tokens: int = 1536  # padded tokens per forward pass, texts grouped by length
    # learning rate over the run (transformers' schedulers, no warmup): "constant", or
    # "linear"/"cosine" decay to zero at max_steps
    lr_schedule: str = "constant"
    save_steps: int = 50  # the adapter, optimizer and sampling state, for resuming
    resume: bool = False  # go on from output_dir's checkpoint if there is one
    # recompute each layer's activations in the backward pass: about a third more compute,
    # a fraction of the memory (larger batches, more in-batch negatives)
    gradient_checkpointing: bool = False
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise PiscoInputError(
                f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}"
            )


def _check_records(records: Sequence[dict[str, Any]]) -> None:
    for i, r in enumerate(records):
        docs = r.get("documents")
        if not r.get("question") or not docs or r.get("gold_index") is None:
            raise PiscoInputError(
                f"retriever record {i} needs a question, documents and gold_index "
                "(records of `pisco-rag build-data --split train`)"
            )
        if len(r.get("retrieval_scores") or []) != len(docs):
            raise PiscoInputError(
                f"retriever record {i} needs one retrieval_scores entry per document (MiniLM's "
                "similarities, which build-data writes) for the alignment term"
            )


def length_chunks(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Indices of texts grouped shortest first into forward passes of at most ``max_tokens``
    padded tokens (at least one text a pass): little padding, and tensors that stay small."""
    chunks: list[list[int]] = [[]]
    for i in sorted(range(len(lengths)), key=lambda i: lengths[i]):
        if chunks[-1] and (len(chunks[-1]) + 1) * lengths[i] > max_tokens:
            chunks.append([])
        chunks[-1].append(i)  # the longest of its chunk so far: the chunk's padded width
    return chunks


def _embed_grad(
    model, texts: list[str], prefix: str, crop: int | None, chunk_tokens: int
) -> torch.Tensor:
    """Unit vectors of ``texts`` with gradients, in forward passes of similar-length texts
    (padding a batch of passages to its longest one doubled the compute at 256 tokens)."""
    rows = retrieval_rows(model, texts, prefix, crop)  # tokenised once
    vectors, order = [], []
    for chunk in length_chunks([len(r) for r in rows], chunk_tokens):
        ids, mask = left_pad([rows[i] for i in chunk], model.tokenizer.pad_token_id)
        hidden = retrieval_hidden(model, ids, mask)
        vectors.append(pool(hidden, mask.to(hidden.device), model.config.retriever_pooling))
        order += chunk
    inverse = torch.empty(len(texts), dtype=torch.long)
    inverse[order] = torch.arange(len(texts))
    return torch.cat(vectors)[inverse.to(vectors[0].device)]


def retriever_step_loss(
    model, batch: Sequence[dict[str, Any]], config: RetrieverConfig, rng: random.Random
) -> dict[str, torch.Tensor]:
    """The three terms on one batch (the caller holds the model lock)."""
    prefix = model.config.retriever_query_prefix
    # the same candidate count across the batch
    n = min(config.max_candidates, *(len(r["documents"]) for r in batch))
    questions = [r["question"] for r in batch]
    chunk = config.chunk_tokens
    query = _embed_grad(model, questions, prefix, None, chunk)
    perturbed = _embed_grad(model, [perturb(q, rng) for q in questions], prefix, None, chunk)
    passages, gold, teacher = [], [], []
    for i, r in enumerate(batch):
        scores = r["retrieval_scores"]
        others = sorted(
            (j for j in range(len(r["documents"])) if j != r["gold_index"]),
            key=lambda j: -scores[j],
        )
        order = [r["gold_index"], *others][:n]  # the gold passage, then the hardest negatives
        passages += [r["documents"][j] for j in order]
        gold.append(i * n)
        teacher.append([float(scores[j]) for j in order])
    device = query.device
    cands = _embed_grad(model, passages, "", config.max_passage_tokens, chunk)
    cands = cands.reshape(len(batch), n, -1)
    # invariance ranks every passage of the batch (not only the question's own candidates,
    # where the gold one takes nearly all the probability): the order of the near misses is
    # what a perturbation changes in a corpus-wide top-10
    flat = cands.reshape(-1, cands.shape[-1])  # every passage of the batch, [b * n, h]
    total = flat.shape[0]
    keep = torch.ones(len(batch), total, dtype=torch.bool, device=device)
    if total > 2:  # the perturbed query sees fewer passages: its ranking must not depend on them
        keep[:, rng.sample(range(total), rng.randrange(1, total - 1))] = False
    t = config.temperature
    terms = {
        "alignment": alignment_loss(query, cands, torch.tensor(teacher, device=device), t),
        "contrastive": contrastive_loss(query, flat, torch.tensor(gold, device=device), t),
        "invariance": invariance_loss(query, perturbed, flat.expand(len(batch), -1, -1), t, keep),
    }
    terms["loss"] = (
        config.alignment_weight * terms["alignment"]
        + terms["contrastive"]
        + config.invariance_weight * terms["invariance"]
    )
    return terms


CHECKPOINT_FILE = "retriever_checkpoint.pt"


def _save_checkpoint(model, optimizer, rng: random.Random, step: int, log: list, path: Path):
    """The retriever adapter, the optimizer, the batch sampler and the log after ``step``,
    written atomically (an interrupted save leaves the previous checkpoint)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "adapter": adapter_state_dict(model.model, RETRIEVER),
        "optimizer": optimizer.state_dict(),
        "rng": rng.getstate(),
        "torch_rng": torch.get_rng_state(),
        "log": log,
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(model, optimizer, rng: random.Random, path: Path) -> tuple[int, list]:
    """Restore a :func:`_save_checkpoint` file; returns (the next step, the log so far)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        result = set_peft_model_state_dict(model.model, state["adapter"], adapter_name=RETRIEVER)
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, KeyError, ValueError, EOFError, pickle.UnpicklingError) as e:
        raise PiscoInputError(
            f"{path} is not a retriever checkpoint of this model ({e}); delete it to start over"
        ) from e
    if [k for k in result.missing_keys if f".{RETRIEVER}." in k and "lora_" in k]:
        raise PiscoInputError(f"{path} does not fit this model's retriever adapter")
    version, internal, gauss = state["rng"]
    rng.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch_rng"])
    return state["step"] + 1, list(state["log"])


def _lr_scheduler(optimizer: torch.optim.Optimizer, config: RetrieverConfig, done: int):
    """``config.lr_schedule`` over ``config.max_steps``, already ``done`` steps in. The rate
    always comes from ``config.lr`` (a resumed run takes a new ``lr`` and schedule), and the
    schedule is a function of the step, so a resumed run continues it exactly."""
    from transformers import get_scheduler

    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = config.lr
    scheduler = get_scheduler(
        config.lr_schedule, optimizer, num_warmup_steps=0, num_training_steps=config.max_steps
    )
    with warnings.catch_warnings():  # stepping before any optimizer.step(): on purpose here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done):
            scheduler.step()
    return scheduler


def train_retriever(model, records: Sequence[dict[str, Any]], config: RetrieverConfig) -> dict:
    """Train ``model``'s retriever adapter (added if missing) on ``records``; saves the model
    to ``output_dir/final`` and the log to ``output_dir/retriever_log.json``."""
    records = list(records)
    _check_records(records)
    model.add_retriever()
    params = [p for n, p in model.model.named_parameters() if f".{RETRIEVER}." in n]
    flags = {id(p): p.requires_grad for p in model.model.parameters()}
    for p in model.model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr)
    rng = random.Random(config.seed)
    out = Path(config.output_dir)
    log, parts, first = [], {}, 1
    if config.resume and (out / CHECKPOINT_FILE).is_file():
        first, log = _load_checkpoint(model, optimizer, rng, out / CHECKPOINT_FILE)
        logger.info("retriever training resumes after step %d", first - 1)
    scheduler = _lr_scheduler(optimizer, config, done=first - 1)
    start = time.perf_counter()
    model.model.train()
    if config.gradient_checkpointing:
        model.model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
    try:
        steps = range(first, config.max_steps + 1)
        for step in tqdm(steps, total=len(steps), disable=not config.show_progress):
            batch = rng.sample(records, min(config.batch_size, len(records)))
            with model._lock:
                try:
                    use_adapter(model.model, RETRIEVER)
                    for p in params:  # set_adapter switched the others off; ours stays on
                        p.requires_grad_(True)
                    terms = retriever_step_loss(model, batch, config, rng)
                    terms["loss"].backward()
                finally:
                    use_adapter(model.model, DECODER)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # this step's rate
            scheduler.step()
            optimizer.zero_grad()
            for k, v in terms.items():
                parts.setdefault(k, []).append(float(v.detach()))
            if step % config.logging_steps == 0 or step == config.max_steps:
                entry = {k: round(sum(v) / len(v), 4) for k, v in parts.items()}
                log.append(
                    {
                        "step": step,
                        "seconds": round(time.perf_counter() - start, 3),
                        "lr": float(f"{lr:.4g}"),
                        **entry,
                    }
                )
                logger.info("retriever step %d: %s", step, entry)
                parts = {}
            if step % config.save_steps == 0 or step == config.max_steps:
                _save_checkpoint(model, optimizer, rng, step, log, out / CHECKPOINT_FILE)
    finally:
        model.model.eval()
        if config.gradient_checkpointing:
            model.model.activation_checkpointing_disable()
        for p in model.model.parameters():
            p.requires_grad_(flags[id(p)])
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "final")
    (out / "retriever_log.json").write_text(
        json.dumps({"config": asdict(config), "log": log}, indent=2) + "\n"
    )
    return {"final": str(out / "final"), "log": log}


__all__ = [
    "RetrieverConfig",
    "alignment_loss",
    "contrastive_loss",
    "invariance_loss",
    "length_chunks",
    "perturb",
    "retriever_step_loss",
    "train_retriever",
]
