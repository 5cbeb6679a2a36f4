"""Teachers for distillation: answers from text RAG with a causal LM, and rerank scores.

Both write their output incrementally to JSONL (one record per line, flushed and fsynced per
batch) and resume after a crash: records already in the output (by ``id``) are skipped, and a
last line cut short by the crash is dropped.

Rerank teachers (``teacher_scores``, one per document):

- ``cross-encoder:<name or path>`` (or any name/path): a sentence-transformers ``CrossEncoder``;
- ``gold``: an offline substitute that runs anywhere: the gold passage scores ``positive``
  (1.0), every other document (MiniLM-retrieved hard negatives) ``negative`` (0.0); needs
  ``gold_index``;
- ``minilm``: an offline graded substitute: the cosine similarity of question and document
  under all-MiniLM-L6-v2 (a bi-encoder, weaker than a cross-encoder);
- ``lm-likelihood``: offline and graded: log p(question | passage) per token under the
  embedded SmolLM2 reading the passage as text (unsupervised passage re-ranking).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..config import SYSTEM_PROMPT
from ..errors import PiscoInputError
from ..prompting import left_pad
from .data import validate_record

logger = logging.getLogger(__name__)

Annotator = Callable[[list[dict[str, Any]]], list[Any]]


# ---------------------------------------------------------------------- incremental JSONL
def _read_done(path: Path) -> set[str]:
    """Ids already written to ``path``. A last line cut short by a crash is dropped; any
    other line that is not a record with an ``id`` is an error."""
    if not path.exists():
        return set()
    data = path.read_bytes()
    complete = data.rfind(b"\n") + 1
    tail = data[complete:]
    if tail.strip():
        try:
            json.loads(tail)["id"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            logger.warning("%s: dropping a torn last line left by an interrupted run", path)
            with path.open("r+b") as f:
                f.truncate(complete)
        else:  # complete record, only its newline is missing
            with path.open("ab") as f:
                f.write(b"\n")
            complete = len(data) + 1
            data += b"\n"
    done: set[str] = set()
    for n, line in enumerate(data[:complete].split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            done.add(str(json.loads(line)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise PiscoInputError(
                f"output {str(path)!r} line {n} is not a record with an 'id': it is not an "
                "output of this command; remove it or choose another output"
            ) from None
    return done


def annotate_jsonl(
    records: Iterable[dict[str, Any]],
    annotate: Annotator,
    output: str | os.PathLike[str],
    *,
    field: str,
    batch_size: int = 8,
    resume: bool = True,
    desc: str = "annotating",
    show_progress: bool = True,
) -> dict[str, int]:
    """Write each record plus ``field = annotate(batch)[k]`` to ``output``, batch by batch.

    Records need an ``id`` (else their position is used). With ``resume`` (default) records
    whose id is already in ``output`` are skipped; without it an existing non-empty output is
    an error. Returns ``{"written": n, "skipped": m}``.
    """
    if batch_size < 1:
        raise PiscoInputError(f"batch_size must be at least 1, got {batch_size}")
    path = Path(output)
    if not resume and path.exists() and path.stat().st_size:
        raise PiscoInputError(
            f"output {str(path)!r} exists; pass resume=True (--resume) to continue it, or remove it"
        )
    done = _read_done(path) if resume else set()
    pending, skipped = [], 0
    for pos, rec in enumerate(records):
        rec = dict(rec)
        rec.setdefault("id", str(pos))
        validate_record(rec, f"record {rec['id']!r}")
        if str(rec["id"]) in done:
            skipped += 1
        else:
            pending.append(rec)
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with (
        path.open("a", encoding="utf-8") as f,
        tqdm(total=len(pending), desc=desc, disable=not show_progress, unit="record") as bar,
    ):
        for start in range(0, len(pending), batch_size):
            batch = pending[start : start + batch_size]
            values = annotate(batch)
            if len(values) != len(batch):
                raise RuntimeError(f"the annotator returned {len(values)} values for {len(batch)}")
            for rec, value in zip(batch, values):
                f.write(json.dumps({**rec, field: value}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
            written += len(batch)
            bar.update(len(batch))
    return {"written": written, "skipped": skipped}


# ---------------------------------------------------------------------- answer teacher
class TextTeacher:
    """Text RAG with a causal LM: the PISCO prompt with the documents as text, greedy decoding.

    ``model``: a name or path (``embedded:<name>``, a local directory, a hub id), a transformers
    causal LM (with ``tokenizer``), or a :class:`~pisco_rag.PiscoModel` (read with its adapters
    disabled: the plain backbone)."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        max_new_tokens: int = 64,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        system_prompt: str = SYSTEM_PROMPT,
    ) -> None:
        from ..model import PiscoModel, default_device

        if max_new_tokens < 1:
            raise PiscoInputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.system_prompt = system_prompt
        self.pisco: PiscoModel | None = model if isinstance(model, PiscoModel) else None
        if self.pisco is not None:
            return
        if isinstance(model, (str, os.PathLike)):
            from ..checkpoints import load_backbone

            model, tokenizer = load_backbone(str(model), dtype=dtype, local_files_only=False)
        elif tokenizer is None:
            raise PiscoInputError("tokenizer is required when model is a model instance")
        from ..prompting import PromptRenderer

        self.device = torch.device(device) if device else default_device()
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.renderer = PromptRenderer(tokenizer, n_mem=1)

    @torch.no_grad()
    def __call__(self, questions: Sequence[str], documents: Sequence[Sequence[str]]) -> list[str]:
        """One answer per question, reading its documents as text."""
        if self.pisco is not None:
            return self.pisco.generate_from_text(
                questions,
                documents,
                adapter="none",
                max_new_tokens=self.max_new_tokens,
                batch_size=max(1, len(questions)),
            )
        ids = [
            self.renderer.render(
                self.renderer.pisco_turns(q, list(docs), self.system_prompt)
            ).input_ids
            for q, docs in zip(questions, documents, strict=True)
        ]
        pad = self.tokenizer.pad_token_id
        input_ids, mask = left_pad(ids, pad)
        width = input_ids.shape[1]
        out = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
        return [
            self.tokenizer.decode(row[width:], skip_special_tokens=True).strip()
            for row in out.tolist()
        ]


def label_records(
    records: Iterable[dict[str, Any]],
    teacher: Callable[[Sequence[str], Sequence[Sequence[str]]], list[str]],
    output: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    resume: bool = True,
    field: str = "label",
    show_progress: bool = True,
) -> dict[str, int]:
    """Write each record with the teacher's answer under ``field`` (default ``label``) to the
    JSONL ``output``, incrementally and resumably (see :func:`annotate_jsonl`)."""

    def annotate(batch: list[dict[str, Any]]) -> list[str]:
        return list(teacher([r["question"] for r in batch], [r["documents"] for r in batch]))

    return annotate_jsonl(
        records,
        annotate,
        output,
        field=field,
        batch_size=batch_size,
        resume=resume,
        desc="teacher answers",
        show_progress=show_progress,
    )


# ---------------------------------------------------------------------- rerank teachers
class CrossEncoderScorer:
    """Relevance scores from a sentence-transformers ``CrossEncoder`` (name or path)."""

    def __init__(
        self, name_or_path: str, *, device: str | None = None, batch_size: int = 32
    ) -> None:
        from sentence_transformers import CrossEncoder

        try:
            self.model = CrossEncoder(name_or_path, device=device)
        except OSError as e:
            raise PiscoInputError(
                f"cross-encoder {name_or_path!r} could not be loaded ({str(e).splitlines()[0]}); "
                "without network, pass a local directory, or use the offline 'gold' or 'minilm' "
                "scorers"
            ) from None
        self.batch_size = batch_size

    def __call__(self, records: list[dict[str, Any]]) -> list[list[float]]:
        pairs = [(r["question"], d) for r in records for d in r["documents"]]
        flat = self.model.predict(pairs, batch_size=self.batch_size, show_progress_bar=False)
        flat = [float(x) for x in flat]
        out, pos = [], 0
        for r in records:
            out.append(flat[pos : pos + len(r["documents"])])
            pos += len(r["documents"])
        return out


class GoldRelevanceScorer:
    """Offline substitute: ``positive`` for the gold passage, ``negative`` for the others."""

    def __init__(self, positive: float = 1.0, negative: float = 0.0) -> None:
        self.positive, self.negative = positive, negative

    def __call__(self, records: list[dict[str, Any]]) -> list[list[float]]:
        out = []
        for r in records:
            gold = r.get("gold_index")
            if gold is None:
                raise PiscoInputError(
                    f"record {r.get('id')!r} has no 'gold_index': the 'gold' scorer needs it; "
                    "use a cross-encoder or 'minilm'"
                )
            out.append(
                [self.positive if i == gold else self.negative for i in range(len(r["documents"]))]
            )
        return out


class EmbeddingScorer:
    """Offline graded substitute: cosine similarity under a sentence embedder (MiniLM)."""

    def __init__(self, model_name_or_path: str | None = None, device: str | None = None) -> None:
        from ..documents import SentenceEmbedder

        self.embedder = SentenceEmbedder(model_name_or_path, device=device)

    def __call__(self, records: list[dict[str, Any]]) -> list[list[float]]:
        q = self.embedder([r["question"] for r in records])
        out = []
        for row, r in enumerate(records):
            d = self.embedder(r["documents"])
            out.append([round(float(x), 6) for x in d @ q[row]])
        return out


class QuestionLikelihoodScorer:
    """Offline graded teacher (unsupervised passage re-ranking, Sachan et al. 2022): the mean
    log-likelihood per token of the question given the passage, read as text by the plain
    backbone of a :class:`~pisco_rag.PiscoModel` (by default the embedded SmolLM2)."""

    INSTRUCTION = "Write a question that this passage answers."

    def __init__(self, model: Any = None, batch_size: int = 8) -> None:
        if model is None:
            from ..model import PiscoModel

            model = PiscoModel.from_pretrained("embedded")
        self.model = model
        self.batch_size = batch_size

    def __call__(self, records: list[dict[str, Any]]) -> list[list[float]]:
        pairs = [(r["question"], d) for r in records for d in r["documents"]]
        nll = self.model.answer_nll(
            [self.INSTRUCTION] * len(pairs),
            [[d] for _, d in pairs],
            [q for q, _ in pairs],
            adapter="none",
            batch_size=self.batch_size,
        )
        out, i = [], 0
        for r in records:
            n = len(r["documents"])
            out.append([round(-x, 6) for x in nll[i : i + n]])
            i += n
        return out


def make_scorer(spec: str, *, device: str | None = None) -> Callable:
    """A rerank teacher from a spec: ``gold``, ``minilm``, ``lm-likelihood`` (log p(question |
    passage) under the embedded SmolLM2), ``cross-encoder:<name or path>`` or a bare
    cross-encoder name/path."""
    if not spec:
        raise PiscoInputError(
            "scorer must be 'gold', 'minilm', 'lm-likelihood' or a cross-encoder name/path"
        )
    if spec == "gold":
        return GoldRelevanceScorer()
    if spec == "minilm":
        return EmbeddingScorer(device=device)
    if spec == "lm-likelihood":
        from ..model import PiscoModel

        return QuestionLikelihoodScorer(PiscoModel.from_pretrained("embedded", device=device))
    return CrossEncoderScorer(spec.removeprefix("cross-encoder:"), device=device)


def score_records(
    records: Iterable[dict[str, Any]],
    scorer: Callable[[list[dict[str, Any]]], list[list[float]]],
    output: str | os.PathLike[str],
    *,
    batch_size: int = 16,
    resume: bool = True,
    show_progress: bool = True,
) -> dict[str, int]:
    """Write each record with ``teacher_scores`` (one per document) to the JSONL ``output``,
    incrementally and resumably."""
    return annotate_jsonl(
        records,
        scorer,
        output,
        field="teacher_scores",
        batch_size=batch_size,
        resume=resume,
        desc="rerank teacher",
        show_progress=show_progress,
    )


__all__ = [
    "CrossEncoderScorer",
    "EmbeddingScorer",
    "GoldRelevanceScorer",
    "TextTeacher",
    "annotate_jsonl",
    "label_records",
    "make_scorer",
    "score_records",
]
