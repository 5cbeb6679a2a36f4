"""Corpus compression without Ray (the local engine), reading corpora with bad input, and the
persistent stores at scale: narrowed vectors, size on disk, writers in many processes."""

from __future__ import annotations

import multiprocessing
import pickle
import sqlite3

import numpy as np
import pytest
import torch
from conftest import LONG_TEXT, tiny_pisco

from pisco_rag import Memory, PiscoInputError, SQLiteMemoryStore, memory_key
from pisco_rag.corpus import ParquetShards, compress_corpus
from pisco_rag.documents import iter_documents, list_corpus_files
from pisco_rag.stores import decode_memory, encode_memory

TEXTS = ["The Elbe flows through Hamburg.", "Paris is the capital of France.", LONG_TEXT]


def write_corpus(folder):
    """A corpus in every supported format, with bad input of every kind; returns the texts of
    its good documents."""
    pa = pytest.importorskip("pyarrow")  # installed with the ray extra (ray[data])
    pq = pytest.importorskip("pyarrow.parquet")
    folder.mkdir()
    (folder / "elbe.txt").write_text(TEXTS[0])
    (folder / "notes.md").write_text(TEXTS[2])
    (folder / "empty.txt").write_text("  \n")
    (folder / "latin1.txt").write_bytes(b"caf\xe9 au lait")  # not UTF-8
    (folder / "dangling.txt").symlink_to(folder / "missing-target")  # unreadable
    (folder / "ignored.csv").write_text("not, a, corpus, file")
    (folder / "records.jsonl").write_text(
        '{"text": "Paris is the capital of France."}\n'
        '{"text": ""}\n'
        "this line is not JSON\n"
        '{"title": "no text field"}\n'
        '{"text": 42}\n'
        '{"text": "Rome is the capital of Italy."}\n'
    )
    pq.write_table(
        pa.table({"text": ["Berlin is the capital of Germany.", None, "   "]}),
        folder / "table.parquet",
    )
    return [
        TEXTS[0],
        TEXTS[2],
        TEXTS[1],
        "Rome is the capital of Italy.",
        "Berlin is the capital of Germany.",
    ]


BAD = {
    ("dangling.txt", None),
    ("empty.txt", None),
    ("latin1.txt", None),
    ("records.jsonl", 1),
    ("records.jsonl", 2),
    ("records.jsonl", 3),
    ("records.jsonl", 4),
    ("table.parquet", 1),
    ("table.parquet", 2),
}


def bad_set(bad_inputs):
    return {(b.path.rsplit("/", 1)[-1], b.index) for b in bad_inputs}


def test_corpus_reading_reports_bad_input_with_paths(tmp_path):
    good = write_corpus(tmp_path / "corpus")
    files = list_corpus_files(tmp_path / "corpus")
    assert "ignored.csv" not in {p.name for p in files} and len(files) == 7
    docs, bad = [], []
    for path in files:
        for d, b in iter_documents(path):
            docs += d
            bad += b
    assert sorted(d.text for d in docs) == sorted(good)
    assert bad_set(bad) == BAD
    assert all(str(tmp_path) in b.path for b in bad)
    reasons = {(b.path.rsplit("/", 1)[-1], b.index): b.reason for b in bad}
    assert "UnicodeDecodeError" in reasons[("latin1.txt", None)]
    assert "not a JSON line" in reasons[("records.jsonl", 2)]
    assert "int, not a string" in reasons[("records.jsonl", 4)]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_corpus_files(tmp_path / "nope")


@pytest.mark.parametrize("fmt", ["sqlite", "parquet"])
def test_local_engine_gives_compress_memories_and_resumes(tmp_path, fmt):
    model = tiny_pisco()
    good = write_corpus(tmp_path / "corpus")
    out = tmp_path / ("out.sqlite" if fmt == "sqlite" else "shards")
    result = compress_corpus(
        tmp_path / "corpus", out, model=model, engine="local", format=fmt, show_progress=False
    )
    expected = model.compress(good, use_store=False)
    assert result.documents == len(good) and result.chunks == len(expected)
    assert result.compressed == len(expected) and result.failed == 0
    assert bad_set(result.bad_inputs) == BAD and result.entries == len(expected)
    if fmt == "parquet":
        shards = ParquetShards(out)
        store = SQLiteMemoryStore(tmp_path / "from-shards.sqlite")
        assert shards.load_into(store) == len(expected)
    else:
        store = SQLiteMemoryStore(out)
    for memory, got in zip(expected, store.get_many([m.key for m in expected]), strict=True):
        assert got is not None and got.text == memory.text
        torch.testing.assert_close(got.vectors, memory.vectors, atol=1e-5, rtol=1e-4)
    again = compress_corpus(
        tmp_path / "corpus", out, model=model, engine="local", format=fmt, show_progress=False
    )
    assert again.compressed == 0 and again.already_stored == len(expected)


def test_corpus_arguments_are_checked(tmp_path):
    model = tiny_pisco()
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(PiscoInputError, match="format"):
        compress_corpus(tmp_path, tmp_path / "o", model=model, engine="local", format="csv")
    with pytest.raises(PiscoInputError, match="num_workers"):
        compress_corpus(tmp_path, tmp_path / "o", model=model, num_workers=0)
    with pytest.raises(PiscoInputError, match="not a loaded PiscoModel"):
        compress_corpus(tmp_path, tmp_path / "o", model=model, engine="ray")
    oscar = tiny_pisco(compressor="first-layers:1")
    with pytest.raises(PiscoInputError, match="OSCAR"):
        compress_corpus(tmp_path, tmp_path / "o.sqlite", model=oscar, engine="local")


def test_narrowed_store_vectors_and_their_effect(tmp_path):
    model = tiny_pisco()
    memories = model.compress(TEXTS, use_store=False)
    full = SQLiteMemoryStore(tmp_path / "f32.sqlite")
    full.put_many(memories)
    for dtype, max_rel_err in (("float16", 1e-3), ("bfloat16", 1e-2), ("int8", 1e-2)):
        store = SQLiteMemoryStore(tmp_path / f"{dtype}.sqlite", dtype=dtype)
        store.put_many(memories)
        for memory, got in zip(memories, store.get_many([m.key for m in memories]), strict=True):
            assert got.vectors.dtype == torch.float32 and got.text == memory.text
            err = (got.vectors - memory.vectors).abs().max() / memory.vectors.abs().max()
            cos = torch.nn.functional.cosine_similarity(got.vectors, memory.vectors, dim=-1)
            assert err < max_rel_err and cos.min() > 0.999
        stored = sum(len(d) for d in store.get_encoded([m.key for m in memories]).values())
        original = sum(len(d) for d in full.get_encoded([m.key for m in memories]).values())
        n_mem, hidden = memories[0].vectors.shape
        per_row = {"int8": 3 * hidden - 4}.get(dtype, 2 * hidden)  # bytes saved per memory row
        saved = len(memories) * n_mem * per_row
        assert abs((original - stored) - saved) < 64 * len(memories)  # headers differ slightly
        assert store.size_on_disk > 0
        # a reopened store (another process, say) reads the same entries
        assert pickle.loads(pickle.dumps(store)).get(memories[0].key).key == memories[0].key
    question = ["Which river flows through Hamburg?"]
    half = SQLiteMemoryStore(tmp_path / "float16.sqlite").get_many([m.key for m in memories])
    assert model.generate(question, [half], max_new_tokens=4) == model.generate(
        question, [memories], max_new_tokens=4
    )
    with pytest.raises(ValueError, match="dtype"):
        SQLiteMemoryStore(tmp_path / "x.sqlite", dtype="int4")


def test_float16_overflow_is_kept_in_float32():
    memory = Memory(torch.full((2, 3), 1e6), "f" * 16, "k")
    assert decode_memory(encode_memory(memory, "float16"), widen=True).vectors[0, 0] == 1e6


def _write_from_process(store: SQLiteMemoryStore, worker: int, barrier) -> None:
    barrier.wait(timeout=120)  # every process starts writing at the same moment
    for start in range(0, 200, 20):
        store.put_many(
            Memory(torch.full((8, 16), float(worker * 200 + i)), "f" * 16, f"w{worker}-{i}")
            for i in range(start, start + 20)
        )
        got = store.get_many([f"w{worker}-{i}" for i in range(start, start + 20)])
        assert all(m is not None for m in got)


def test_sqlite_store_bulk_writes_from_many_processes(tmp_path):
    store = SQLiteMemoryStore(tmp_path / "mem.sqlite", dtype="float16")
    store.put_many([Memory(torch.ones(8, 16), "f" * 16, "kept")])
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_write_from_process, args=(store, w, barrier)) for w in (1, 2)]
    for p in procs:
        p.start()
    _write_from_process(store, 0, barrier)  # this process writes too
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(store) == 601
    keys = [f"w{w}-{i}" for w in range(3) for i in range(200)]
    got = store.get_many(keys)
    assert [float(m.vectors[0, 0]) for m in got] == [
        w * 200 + i for w in range(3) for i in range(200)
    ]
    assert torch.equal(store.get("kept").vectors, torch.ones(8, 16))
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_existing_keys_without_decoding(tmp_path):
    store = SQLiteMemoryStore(tmp_path / "mem.sqlite")
    keys = [memory_key("f" * 16, f"t{i}") for i in range(3)]
    store.put_many([Memory(torch.zeros(2, 2), "f" * 16, k) for k in keys[:2]])
    assert store.existing([*keys, "absent"]) == set(keys[:2])
    with sqlite3.connect(store.path) as conn:  # a damaged entry still counts as present
        conn.execute("UPDATE memories SET data = ? WHERE key = ?", (b"junk", keys[0]))
    assert store.existing(keys) == set(keys[:2])


class LetterEmbedder:
    """A deterministic stand-in for MiniLM: normalised letter counts."""

    dim = 26

    def __call__(self, texts):
        out = np.zeros((len(texts), 26), np.float32)
        for row, text in enumerate(texts):
            for ch in text.lower():
                if "a" <= ch <= "z":
                    out[row, ord(ch) - 97] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_lance_store_keeps_memories_beside_retrieval_vectors(tmp_path):
    pytest.importorskip("lancedb")
    from pisco_rag.stores import LanceMemoryStore

    model = tiny_pisco(store=LanceMemoryStore(tmp_path / "lance", embedder=LetterEmbedder()))
    memories = model.compress(TEXTS)
    assert len(model.store) == len(memories)
    calls = []
    original = model._compress_batch
    model._compress_batch = lambda *a, **k: calls.append(1) or original(*a, **k)
    model.compress(TEXTS)
    assert not calls  # served from the Lance table
    model.store.optimize()
    (best, score), *_ = model.store.search("The Elbe flows through Hamburg.", k=2)
    assert best.key == memories[0].key and score == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(best.vectors, memories[0].vectors)
    reopened = pickle.loads(pickle.dumps(model.store))
    assert reopened.secret == model.store.secret and reopened.size_on_disk > 0
    assert reopened.existing([memories[1].key, "nope"]) == {memories[1].key}


def test_a_worker_with_another_model_refuses_to_run(tmp_path):
    from pisco_rag.corpus import CompressStage

    with pytest.raises(PiscoInputError, match="fingerprint"):
        CompressStage(tiny_pisco(), "0" * 16, SQLiteMemoryStore(tmp_path / "m.sqlite"))


def test_cli_compress_corpus_formats_without_ray(tmp_path, capsys):
    from conftest import randomize_lora, tiny_backbone

    from pisco_rag import PiscoModel
    from pisco_rag.cli import main

    backbone, tok = tiny_backbone("llama")
    backbone.save_pretrained(tmp_path / "backbone")
    tok.save_pretrained(tmp_path / "backbone")
    model = PiscoModel.from_backbone(str(tmp_path / "backbone"), device="cpu")
    randomize_lora(model)
    model.save_pretrained(tmp_path / "ckpt")
    good = write_corpus(tmp_path / "corpus")
    n = len(model.compress(good, use_store=False))
    common = ["--model", str(tmp_path / "ckpt"), "--quiet"]
    out = tmp_path / "shards"
    args = ["compress", str(tmp_path / "corpus"), "--store", str(out), "--format", "parquet"]
    assert main([*args, "--dtype", "float16", *common]) == 0
    printed = capsys.readouterr().out
    assert f"{n} compressed, 0 already stored" in printed and "skipped" in printed
    assert "latin1.txt" in printed and "records.jsonl (record 2)" in printed
    assert len(ParquetShards(out)) == n
    assert main([*args, *common]) == 0
    assert f"0 compressed, {n} already stored" in capsys.readouterr().out
