"""Corpus compression on a local Ray cluster (2 CPUs) with a tiny saved model: the memories are
those of PiscoModel.compress, under the same keys; a killed run resumes; bad input is skipped."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora, tiny_backbone
from test_corpus import BAD, LetterEmbedder, bad_set, write_corpus

from pisco_rag import PiscoModel, SQLiteMemoryStore
from pisco_rag.corpus import compress_corpus

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")


@pytest.fixture(scope="module")
def cluster():
    tests = str(Path(__file__).parent)  # workers unpickle test helpers (LetterEmbedder)
    path = os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny PISCO model saved in the native format (its backbone saved beside it), so that
    each Ray worker can load it by path."""
    root = tmp_path_factory.mktemp("tiny")
    backbone, tok = tiny_backbone("llama")
    backbone.save_pretrained(root / "backbone")
    tok.save_pretrained(root / "backbone")
    model = PiscoModel.from_backbone(str(root / "backbone"), device="cpu")
    randomize_lora(model)
    model.save_pretrained(root / "ckpt")
    return root / "ckpt"


def assert_served_without_computing(model: PiscoModel, texts: list[str]) -> None:
    """model.compress finds every chunk of ``texts`` in its store: nothing is computed, and the
    stored memories are those it would compute."""
    expected = model.compress(texts, use_store=False)
    calls = []
    original = model._compress_batch
    model._compress_batch = lambda *a, **k: calls.append(1) or original(*a, **k)
    served = model.compress(texts)
    assert not calls, "a chunk stored by the Ray run was computed again"
    assert [m.key for m in served] == [m.key for m in expected]
    for memory, got in zip(expected, served, strict=True):
        assert got.fingerprint == model.fingerprint and got.text == memory.text
        torch.testing.assert_close(got.vectors, memory.vectors, atol=1e-5, rtol=1e-4)


def test_ray_lance_memories_are_those_of_compress_and_bad_input_is_skipped(
    cluster, checkpoint, tmp_path
):
    pytest.importorskip("lancedb")
    from pisco_rag.stores import LanceMemoryStore

    good = write_corpus(tmp_path / "corpus")
    result = compress_corpus(
        tmp_path / "corpus",
        tmp_path / "lance",
        model=str(checkpoint),
        format="lance",
        embedder=LetterEmbedder(),
        num_workers=2,
        show_progress=False,
    )
    store = LanceMemoryStore(tmp_path / "lance", embedder=LetterEmbedder())
    model = PiscoModel.from_pretrained(checkpoint, device="cpu", store=store)
    n_chunks = len(model.compress(good, use_store=False))
    assert result.fingerprint == model.fingerprint
    assert (result.documents, result.chunks) == (len(good), n_chunks)
    assert (result.compressed, result.already_stored, result.failed) == (n_chunks, 0, 0)
    assert bad_set(result.bad_inputs) == BAD  # every bad input reported by path, the run went on
    assert len(store) == result.entries == n_chunks
    assert_served_without_computing(model, good)
    # one vector database holds both: the retrieval vectors find the chunk's memory
    (memory, score), *_ = store.search("The Elbe flows through Hamburg.", k=3)
    assert memory.text == good[0] and score == pytest.approx(1.0, abs=1e-5)
    rows = store.table.search().where(f"key = '{memory.key}'").to_arrow().to_pylist()
    assert rows[0]["source"].endswith("elbe.txt") and rows[0]["chunk_index"] == 0
    assert len(rows[0]["vector"]) == LetterEmbedder.dim


SLOW_RUN = """
import sys, time
import ray, ray.data
from pisco_rag.corpus import ModelLoader, compress_corpus

CHECKPOINT, CORPUS, STORE, ADDRESS = sys.argv[1:5]

def slow_loader():
    model = ModelLoader(CHECKPOINT)()
    fast = model.compress_texts
    def slow(texts, queries=None):
        time.sleep(0.4)
        return fast(texts, queries)
    model.compress_texts = slow
    return model

ray.init(address=ADDRESS, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
compress_corpus(CORPUS, STORE, model=slow_loader, batch_size=2, rows_per_write=2,
                show_progress=False)
print("finished")
"""


def test_killed_ray_run_resumes_without_recomputing_stored_keys(cluster, checkpoint, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(30):
        (corpus / f"doc{i:02d}.txt").write_text(f"Document {i}: the tower in town {i} is old.")
    store_path = tmp_path / "memories.sqlite"
    store = SQLiteMemoryStore(store_path)
    script = tmp_path / "slow_run.py"
    script.write_text(textwrap.dedent(SLOW_RUN))
    driver = subprocess.Popen(
        [sys.executable, str(script), str(checkpoint), str(corpus), str(store_path), cluster],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 150
        while len(store) < 4:  # a few writes done, most of the corpus still to do
            assert driver.poll() is None, driver.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the run stored nothing in time"
            time.sleep(0.2)
    finally:
        driver.kill()  # SIGKILL: no clean-up of any kind
        driver.wait()
    settled, count = 0, -1
    while settled < 10:  # the killed job's actors stop; wait until nothing more is written
        settled = settled + 1 if len(store) == count else 0
        count = len(store)
        time.sleep(0.2)
    before = store.get_encoded(store.keys())
    assert 4 <= len(before) < 30

    result = compress_corpus(corpus, store_path, model=str(checkpoint), show_progress=False)
    assert result.already_stored == len(before)  # every stored key skipped ...
    assert result.compressed == 30 - len(before)  # ... and only the others computed
    assert result.failed == 0 and len(store) == 30
    assert store.get_encoded(list(before)) == before  # nothing already stored was lost
    model = PiscoModel.from_pretrained(checkpoint, device="cpu", store=store)
    assert_served_without_computing(model, [p.read_text() for p in sorted(corpus.iterdir())])
