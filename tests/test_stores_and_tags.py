"""Memory stores on disk and in memory, tags in prompts, and bad input."""

from __future__ import annotations

import sqlite3
import threading

import pytest
import torch
from conftest import tiny_pisco

from pisco_rag import (
    CheckpointError,
    CorruptMemoryError,
    LRUMemoryStore,
    Memory,
    MemoryMismatchError,
    PiscoInputError,
    PiscoModel,
    SQLiteMemoryStore,
    TagError,
    memory_key,
)


def make_memory(i: int, fingerprint: str = "f" * 16, hidden: int = 4) -> Memory:
    return Memory(
        torch.full((8, hidden), float(i)),
        fingerprint,
        memory_key(fingerprint, f"t{i}"),
        text=f"t{i}",
    )


def test_lru_store_evicts_oldest_beyond_max_bytes():
    store = LRUMemoryStore(max_bytes=3 * (8 * 4 * 4 + 2))  # three memories: vectors and text
    memories = [make_memory(i) for i in range(4)]
    store.put_many(memories[:3])
    store.get(memories[0].key)  # touch: now the most recent
    store.put(memories[3])
    assert len(store) == 3
    assert store.get(memories[1].key) is None
    assert store.get(memories[0].key) is memories[0]


def test_memories_own_their_storage_and_the_bound_counts_it(tiny_model):
    batch = torch.randn(64, 8, 16)  # a batch's hidden states: 32 KiB
    memory = Memory(batch[3], "f" * 16, memory_key("f" * 16, "x"), text="x" * 100)
    assert memory.vectors.untyped_storage().nbytes() == 8 * 16 * 4  # a copy, not a view
    assert torch.equal(memory.vectors, batch[3]) and memory.nbytes == 8 * 16 * 4 + 100
    (compressed,) = tiny_model.compress(["A text whose memory must not pin its batch."])
    v = compressed.vectors
    assert v.untyped_storage().nbytes() == v.numel() * v.element_size()


def test_memory_refuses_nan_and_bad_keys_and_checksums_its_metadata(tmp_path):
    good = make_memory(1)
    with pytest.raises(PiscoInputError, match="NaN or infinite"):
        Memory(torch.full((8, 4), float("nan")), "f" * 16, good.key)
    with pytest.raises(PiscoInputError, match="32 lowercase hex"):
        LRUMemoryStore().tag(Memory(good.vectors, "f" * 16, "not-hex"))
    data = bytearray(good.to_bytes())
    i = data.find(b"ffffffffffffffff")  # the fingerprint in the header: damage it
    data[i] = ord("e")
    with pytest.raises(CorruptMemoryError, match="checksum"):
        Memory.from_bytes(bytes(data), key=good.key)
    store = SQLiteMemoryStore(tmp_path / "m.sqlite")
    store.put(good)
    with sqlite3.connect(tmp_path / "m.sqlite") as db:
        db.execute("UPDATE memories SET data = ?", (bytes(data),))
    with pytest.raises(CorruptMemoryError, match="checksum"):
        SQLiteMemoryStore(tmp_path / "m.sqlite").get(good.key)


def test_sqlite_store_persists_and_shares_secret(tmp_path):
    path = tmp_path / "mem.sqlite"
    store = SQLiteMemoryStore(path)
    memories = [make_memory(i) for i in range(60)]
    store.put_many(memories)
    reopened = SQLiteMemoryStore(path)
    assert reopened.secret == store.secret and len(reopened) == 60
    got = reopened.get_many([m.key for m in memories[:50]] + ["absent"])
    assert got[-1] is None
    for m, g in zip(memories[:50], got[:50], strict=True):
        assert g.key == m.key and g.text == m.text and torch.equal(g.vectors, m.vectors)
    tag = store.tag(memories[0])
    key, mac = tag.removeprefix("[[pisco:").removesuffix("]]").split(":")
    assert torch.equal(reopened.resolve(key, mac).vectors, memories[0].vectors)


def test_sqlite_store_concurrent_writers_and_readers(tmp_path):
    store = SQLiteMemoryStore(tmp_path / "mem.sqlite")
    errors = []

    def write(offset):
        try:
            for i in range(offset, offset + 40, 10):
                store.put_many([make_memory(j) for j in range(i, i + 10)])
                store.get_many([make_memory(j).key for j in range(i, i + 10)])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k * 40,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(SQLiteMemoryStore(tmp_path / "mem.sqlite")) == 160


def test_corrupt_entry_is_reported_by_key_and_nothing_else_is_lost(tmp_path):
    path = tmp_path / "mem.sqlite"
    store = SQLiteMemoryStore(path)
    memories = [make_memory(i) for i in range(3)]
    store.put_many(memories)
    with sqlite3.connect(path) as conn:  # flip bytes inside the tensor data of one entry
        data = bytearray(
            conn.execute("SELECT data FROM memories WHERE key = ?", (memories[1].key,)).fetchone()[
                0
            ]
        )
        data[-4:] = b"\xff\xff\xff\xff"
        conn.execute("UPDATE memories SET data = ? WHERE key = ?", (bytes(data), memories[1].key))
    with pytest.raises(CorruptMemoryError, match=memories[1].key):
        store.get_many([m.key for m in memories])
    assert torch.equal(store.get(memories[0].key).vectors, memories[0].vectors)
    assert torch.equal(store.get(memories[2].key).vectors, memories[2].vectors)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE memories SET data = ? WHERE key = ?", (b"garbage", memories[2].key))
    with pytest.raises(CorruptMemoryError, match="cannot be decoded"):
        store.get(memories[2].key)


def test_compress_recomputes_a_corrupt_entry(tmp_path):
    model = tiny_pisco(store=SQLiteMemoryStore(tmp_path / "mem.sqlite"))
    (first,) = model.compress(["The Elbe flows through Hamburg."])
    with sqlite3.connect(tmp_path / "mem.sqlite") as conn:
        conn.execute("UPDATE memories SET data = ? WHERE key = ?", (b"junk", first.key))
    (again,) = model.compress(["The Elbe flows through Hamburg."])
    torch.testing.assert_close(again.vectors, first.vectors)
    assert torch.equal(model.store.get(first.key).vectors, again.vectors)  # entry repaired


def test_sqlite_store_rejects_a_non_database(tmp_path):
    bad = tmp_path / "not-a-db.sqlite"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match="not a pisco-rag SQLite memory store"):
        SQLiteMemoryStore(bad)


def test_tags_resolve_in_prompts_and_survive_formatting(tiny_model):
    memories = tiny_model.compress(["The Elbe flows through Hamburg.", "Fuji is in Japan."])
    tags = tiny_model.tags(memories)
    template = "Context:\n{context}\n\nQuestion: {question}\nAnswer:"
    prompt = template.format(context="\n\n".join(tags), question="Where is Fuji?")
    rendered = tiny_model.render_prompt(prompt)
    assert [m.key for m in rendered.memories] == [m.key for m in memories]
    assert "[[pisco:" not in tiny_model.tokenizer.decode(rendered.input_ids)
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": f"  {tags[1]}\n\n\tWhere?  "},
    ]
    assert [m.key for m in tiny_model.render_prompt(chat).memories] == [memories[1].key]
    (completion,) = tiny_model.complete([prompt], max_new_tokens=4)
    assert completion.prompt_tokens == len(rendered.input_ids) and completion.completion_tokens >= 1


def test_plain_prompt_is_text_generation(tiny_model):
    (completion,) = tiny_model.complete(["Hello there"], max_new_tokens=3)
    assert completion.completion_tokens <= 3 and completion.finish_reason in ("stop", "length")
    assert tiny_model.render_prompt("Hello there").memories == []


def test_forged_malformed_and_foreign_tags_are_read_as_text(tiny_model):
    (memory,) = tiny_model.compress(["Forgery target text."])
    tag = tiny_model.tag(memory)
    forged = tag[:-6] + ("0000]]" if not tag.endswith("0000]]") else "1111]]")
    other = tiny_pisco(seed=4)  # another model with its own store: the tag is foreign there
    with pytest.warns(UserWarning, match="did not mint"):  # once: it may be a wrong store
        other.render_prompt(f"Context: {tag} ?")
    for model, text, kept in [
        (tiny_model, f"Context: {forged} ?", [forged]),
        (tiny_model, "Context: [[pisco:123]] [[ pisco:x]] ?", ["[[pisco:123]]", "[[ pisco:x]]"]),
        (other, f"Context: {tag} ?", [tag]),
    ]:
        rendered = model.render_prompt(text)
        assert rendered.memories == []
        decoded = model.tokenizer.decode(rendered.input_ids)
        assert all(k in decoded for k in kept)  # the tag-like text reaches the model as text
        (completion,) = model.complete([text], max_new_tokens=2)
        assert completion.completion_tokens >= 1


def test_evicted_memory_tag_is_unknown():
    model = tiny_pisco(store=LRUMemoryStore(max_bytes=8 * 64 * 4))  # room for one memory
    first, second = model.compress(["First text.", "Second text."])
    tag = model.store.tag(first)
    model.store.put(second)  # evicts the first
    with pytest.raises(TagError, match="no longer in the store"):
        model.complete([tag])


def test_memory_from_another_model_is_refused(tiny_model, tmp_path):
    other = tiny_pisco(seed=9)
    (foreign,) = other.compress(["Some text."])
    with pytest.raises(MemoryMismatchError, match=r"contexts\[0\]\[0\] was made by another"):
        tiny_model.generate(["Q?"], [[foreign]])
    # a shared persistent store: the tag resolves but the fingerprint does not match
    shared = SQLiteMemoryStore(tmp_path / "shared.sqlite")
    a, b = tiny_pisco(seed=5, store=shared), tiny_pisco(seed=6, store=shared)
    (m,) = a.compress(["Shared store text."])
    with pytest.raises(MemoryMismatchError, match="made by another model"):
        b.complete([a.tag(m)])


def test_text_that_spells_special_tokens_stays_text(tiny_model):
    (prompt,) = tiny_model._pisco_prompts(["Q?"], [["Look: <MEM0><SEP> and <|im_end|> here."]])
    assert prompt.memories == []
    assert tiny_model.mem_token_ids[0] not in prompt.input_ids
    assert prompt.input_ids.count(tiny_model.tokenizer.eos_token_id) == 2  # the template's own


@pytest.mark.parametrize(
    ("documents", "message"),
    [
        ("just one string", "wrap one document in a list"),
        (["ok", ""], r"documents\[1\] is empty"),
        (["ok", "   "], r"documents\[1\] is empty"),
        (["ok", 42], r"documents\[1\] must be a str, got int"),
        (None, "documents must be a list of strings"),
    ],
)
def test_bad_documents(tiny_model, documents, message):
    with pytest.raises(PiscoInputError, match=message):
        tiny_model.compress(documents)


def test_bad_generate_arguments(tiny_model):
    (memory,) = tiny_model.compress(["Some text."])
    with pytest.raises(PiscoInputError, match="contexts must be a list with one sequence"):
        tiny_model.generate(["Q1?", "Q2?"], [[memory]])
    with pytest.raises(PiscoInputError, match="contexts must be a list with one sequence"):
        tiny_model.generate(["Q1?"], None)
    with pytest.raises(PiscoInputError, match=r"questions\[0\] must be a non-empty string"):
        tiny_model.generate([""], [[memory]])
    with pytest.raises(PiscoInputError, match=r"contexts\[0\]\[1\] must be a Memory or a str"):
        tiny_model.generate(["Q?"], [[memory, 3.5]])
    with pytest.raises(PiscoInputError, match=r"contexts\[0\] must be a list"):
        tiny_model.generate(["Q?"], [memory])
    wrong_shape = Memory(memory.vectors[:4], memory.fingerprint, memory.key)
    with pytest.raises(MemoryMismatchError, match="has shape"):
        tiny_model.generate(["Q?"], [[wrong_shape]])


def test_adjacent_tags_form_contiguous_slots(tiny_model):
    memories = tiny_model.compress(["First adjacent text.", "Second adjacent text."])
    a, b = tiny_model.tags(memories)
    spaced = tiny_model.render_prompt(f"Background:\n{a}\n\n{b}\n\nQuestion: q")
    joined = tiny_model.render_prompt(f"Background:\n{a}{b}\n\nQuestion: q")
    assert spaced.input_ids == joined.input_ids and len(spaced.memories) == 2


def test_complete_with_plain_backbone(tiny_model):
    (memory,) = tiny_model.compress(["Plain backbone text."])
    (text,) = tiny_model.complete(["Say hi"], max_new_tokens=4, adapter="none")
    assert text.completion_tokens <= 4
    streamed = "".join(tiny_model.stream_complete("Say hi", max_new_tokens=4, adapter="none"))
    assert streamed.strip() == text.text
    with pytest.raises(PiscoInputError, match="reads text only"):
        tiny_model.complete([tiny_model.tag(memory)], adapter="none")
    # adapters are enabled again afterwards: the decoder adapter is in use for memories
    assert tiny_model.complete(["Say hi"], max_new_tokens=4, adapter="none") == [text]


def test_with_store_shares_weights_and_lock(tiny_model, tmp_path):
    other = tiny_model.with_store(SQLiteMemoryStore(tmp_path / "m.sqlite"))
    assert other.model is tiny_model.model and other._lock is tiny_model._lock
    assert other.fingerprint == tiny_model.fingerprint and other.store is not tiny_model.store
    (memory,) = other.compress(["Stored in the other store."])
    assert memory.key in other.store and memory.key not in tiny_model.store


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("[1, 2, 3]", "must hold a JSON object"),
        ("null", "must hold a JSON object"),
        ('"text"', "must hold a JSON object"),
        ('{"pisco_rag_format": "1", "backbone": "x"}', "not a format number"),
        ('{"pisco_rag_format": 1, "backbone": "x", "compression_rate": 0}', "compression_rate"),
        ('{"pisco_rag_format": 1, "backbone": null}', "backbone must name"),
    ],
)
def test_bad_config_json_is_a_checkpoint_error_naming_the_file(
    tiny_model, tmp_path, content, match
):
    tiny_model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=match) as info:
        PiscoModel.from_pretrained(tmp_path / "ckpt")
    assert "ckpt" in str(info.value)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: m.complete("hello"), "wrap one prompt in a list"),
        (lambda m: m.complete([[]]), "non-empty list of chat messages"),
        (lambda m: m.tag("a string"), "takes a Memory"),
        (lambda m: m.compress({"a": 1}), "must be a list of strings"),
        (lambda m: m.compress(["ok"], batch_size=0), "batch_size must be a positive int"),
        (lambda m: m.generate(["q?"], [[]], batch_size=-1), "batch_size must be a positive int"),
        (lambda m: m.compress(["bad \ud800 text"]), "lone surrogate"),
        (lambda m: m.complete(["bad \udfff"]), "lone surrogate"),
        (lambda m: m.generate(["q \ud800?"], [[]]), "lone surrogate"),
        (lambda m: m.compress(["ok"], long_documents="bogus"), "long_documents must be one of"),
    ],
)
def test_bad_arguments_are_clear_errors(tiny_model, call, match):
    with pytest.raises(PiscoInputError, match=match):
        call(tiny_model)


def test_read_only_store_serves_reads_and_refuses_writes_by_name(tmp_path):
    path = tmp_path / "ro" / "mem.sqlite"
    writer = SQLiteMemoryStore(path)
    memories = [make_memory(i) for i in range(3)]
    writer.put_many(memories)
    tag = writer.tag(memories[0])
    writer.close()
    reader = SQLiteMemoryStore(path, read_only=True)
    assert reader.read_only and len(reader) == 3 and reader.secret == writer.secret
    assert torch.equal(reader.get(memories[1].key).vectors, memories[1].vectors)
    key, mac = tag.removeprefix("[[pisco:").removesuffix("]]").split(":")
    assert reader.resolve(key, mac).key == memories[0].key
    with pytest.raises(ValueError, match=r"mem\.sqlite.*read-only"):
        reader.put(make_memory(9))
    with pytest.raises(ValueError, match="read-only"):
        reader.delete([memories[0].key])
    with pytest.raises(ValueError, match="does not exist"):
        SQLiteMemoryStore(tmp_path / "absent.sqlite", read_only=True)
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(ValueError, match="not a pisco-rag"):
        SQLiteMemoryStore(tmp_path / "junk.sqlite", read_only=True)
