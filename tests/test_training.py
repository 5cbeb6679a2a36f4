"""Training: bigbench records, teachers (resumable JSONL), the distillation trainer (loss goes
down, resume, gradient masking, OSCAR rerank term) and the command line, on tiny models."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import randomize_lora, tiny_backbone
from safetensors.torch import load_file
from transformers import TrainerCallback

from pisco_rag import PiscoInputError, PiscoModel
from pisco_rag.adapters import use_adapter
from pisco_rag.training import DistillationCollator, StudentModule, TrainConfig, train
from pisco_rag.training import data as data_mod
from pisco_rag.training.data import (
    EVAL_START,
    build_bigbench_records,
    check_split,
    in_retrieval_order,
    load_records,
    parse_bigbench_input,
    read_jsonl,
    write_jsonl,
)
from pisco_rag.training.student import RERANK_TEMPERATURE, distillation_loss
from pisco_rag.training.teacher import (
    CrossEncoderScorer,
    GoldRelevanceScorer,
    TextTeacher,
    annotate_jsonl,
    label_records,
    score_records,
)
from pisco_rag.training.trainable import setup_trainable

RECORDS = [
    {
        "id": "r0",
        "question": "Which river flows through Hamburg?",
        "documents": ["The Elbe flows through Hamburg and Dresden.", "Mount Fuji is in Japan."],
        "answer": "the Elbe",
        "gold_index": 0,
    },
    {
        "id": "r1",
        "question": "What is the highest peak in Japan?",
        "documents": ["Rye bread is sold at the bakery.", "Mount Fuji is the highest peak."],
        "answer": "Mount Fuji",
        "gold_index": 1,
    },
    {
        "id": "r2",
        "question": "What does the bakery sell?",
        "documents": ["The bakery sells rye bread and buns.", "The Elbe is a river."],
        "answer": "rye bread",
        "gold_index": 0,
    },
    {
        "id": "r3",
        "question": "Who wrote Faust?",
        "documents": ["Rye is a grain.", "Goethe wrote Faust in two parts."],
        "answer": "Goethe",
        "gold_index": 1,
    },
]


# ---------------------------------------------------------------------- fixtures
def pisco(seed: int = 0, path=None, scale: float = 1.0, **kwargs) -> PiscoModel:
    """A tiny Llama PISCO model without LoRA dropout (deterministic training). ``scale``
    multiplies the backbone's embeddings: a random tiny model's logits are all ~0 otherwise,
    and its loss can hardly move."""
    backbone, tok = tiny_backbone("llama", seed)
    with torch.no_grad():
        backbone.get_input_embeddings().weight.mul_(scale)
    if path is not None:
        backbone.save_pretrained(path)
        tok.save_pretrained(path)
        backbone, tok = str(path), None
    model = PiscoModel.from_backbone(
        backbone, tok, device="cpu", seed=seed, lora_dropout=0.0, **kwargs
    )
    randomize_lora(model, seed + 1)
    return model


def config(tmp_path, **kw) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / "run"),
        batch_size=2,
        decoder_lr=5e-3,
        compressor_lr=5e-3,
        logging_steps=1,
        save_steps=100,
        show_progress=False,
        target_field="answer",
    )
    return TrainConfig(**{**base, **kw})


def hash_embedder(texts):
    """A deterministic bag-of-words embedder (tests need no sentence model)."""
    out = np.zeros((len(texts), 64), dtype=np.float32)
    for row, t in enumerate(texts):
        for w in t.lower().replace("?", " ").split():
            out[row, zlib.crc32(w.encode()) % 64] += 1
    return out


def write_task(path, n: int) -> None:
    """A task.json in the bigbench format with n examples."""
    examples = []
    for i in range(n):
        name, real = f"Person{i}", f"Real{i}"
        examples.append(
            {
                "input": f"\nQuestion: who founded company{i}?\nContext: {name} founded "
                f"company{i} in year {1900 + i % 100} in town{i % 7} .",
                "target": name,
                "target_scores": {name: 1, real: 0},
            }
        )
    path.write_text(
        json.dumps({"name": "contextual_parametric_knowledge_conflicts", "examples": examples})
    )


@pytest.fixture(scope="module")
def big_task(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "task.json"
    write_task(path, EVAL_START + 8)
    return path


# ---------------------------------------------------------------------- data
def test_parse_bigbench_input():
    q, p = parse_bigbench_input("\nQuestion: who is x?\nContext: X is Y .\nMore text.")
    assert q == "who is x?" and p == "X is Y .\nMore text."
    with pytest.raises(PiscoInputError, match="format"):
        parse_bigbench_input("no question here")


def test_bigbench_records_respect_the_split(big_task):
    train = build_bigbench_records(
        big_task, "train", n_documents=4, limit=6, embedder=hash_embedder, pool_size=200
    )
    evals = build_bigbench_records(big_task, "eval", n_documents=4, embedder=hash_embedder)
    assert len(train) == 6 and len(evals) == 8
    assert all(r["index"] < EVAL_START and r["split"] == "train" for r in train)
    assert sorted(r["index"] for r in evals) == list(range(EVAL_START, EVAL_START + 8))
    for r in train + evals:
        assert len(r["documents"]) == 4 and len(set(r["documents"])) == 4
        gold = r["documents"][r["gold_index"]]
        assert f"company{r['index']} " in gold and r["answer"] == f"Person{r['index']}"
        assert r["original_answer"] == f"Real{r['index']}"
        assert len(r["retrieval_scores"]) == 4
        # distractors come from the same split only
        for d in r["documents"]:
            k = int(d.split("company")[1].split()[0])
            assert (k < EVAL_START) == (r["split"] == "train")
    again = build_bigbench_records(
        big_task, "train", n_documents=4, limit=6, embedder=hash_embedder, pool_size=200
    )
    assert again == train  # seeded: same sample, same order
    with pytest.raises(PiscoInputError, match="does not belong"):
        check_split([EVAL_START], "train")
    with pytest.raises(PiscoInputError, match="does not belong"):
        check_split([3], "eval")


def test_bigbench_records_in_retrieval_order(big_task):
    args = dict(n_documents=4, limit=6, embedder=hash_embedder, pool_size=200)
    shuffled = build_bigbench_records(big_task, "train", **args)
    ranked = build_bigbench_records(big_task, "train", order="retrieval", **args)
    assert ranked == [in_retrieval_order(r) for r in shuffled]
    for before, after in zip(shuffled, ranked, strict=True):
        assert after["retrieval_scores"] == sorted(before["retrieval_scores"], reverse=True)
        assert sorted(after["documents"]) == sorted(before["documents"])
        assert after["documents"][after["gold_index"]] == before["documents"][before["gold_index"]]
    # per-document fields follow their documents; ties keep their order
    rec = {
        "documents": ["a", "b", "c"],
        "retrieval_scores": [0.1, 0.5, 0.1],
        "teacher_scores": [1.0, 2.0, 3.0],
        "gold_index": 2,
    }
    assert in_retrieval_order(rec) == {
        "documents": ["b", "a", "c"],
        "retrieval_scores": [0.5, 0.1, 0.1],
        "teacher_scores": [2.0, 1.0, 3.0],
        "gold_index": 2,
    }
    with pytest.raises(PiscoInputError, match="retrieval_scores"):
        in_retrieval_order({"id": "x", "documents": ["a"]})
    with pytest.raises(PiscoInputError, match="order"):
        build_bigbench_records(big_task, "train", order="best", **args)


def test_bigbench_records_with_minilm(tmp_path):
    path = tmp_path / "task.json"
    write_task(path, EVAL_START + 5)
    records = build_bigbench_records(path, "eval", n_documents=3, limit=3, seed=1)
    assert len(records) == 3 and all(len(r["documents"]) == 3 for r in records)


def test_jsonl_and_datasets_loading(tmp_path):
    path = write_jsonl(RECORDS, tmp_path / "d.jsonl")
    assert read_jsonl(path) == RECORDS
    ds = load_records(path)
    assert len(ds) == 4 and ds[0]["question"] == RECORDS[0]["question"]
    ds.save_to_disk(str(tmp_path / "saved"))
    assert load_records(tmp_path / "saved")[3]["answer"] == "Goethe"
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "documents": "not a list"}) + "\n")
    with pytest.raises(PiscoInputError, match="'documents' must be a list"):
        load_records(bad)
    bad.write_text('{"question": "q"\n')
    with pytest.raises(PiscoInputError, match=r"bad\.jsonl:1"):
        load_records(bad)


# ---------------------------------------------------------------------- teachers
def test_annotation_is_incremental_and_resumes_after_a_crash(tmp_path):
    out = tmp_path / "labels.jsonl"
    calls = []

    def crashing(batch):
        calls.append([r["id"] for r in batch])
        if len(calls) == 2:
            raise RuntimeError("crash")
        return [f"answer {r['id']}" for r in batch]

    with pytest.raises(RuntimeError):
        annotate_jsonl(RECORDS, crashing, out, field="label", batch_size=2, show_progress=False)
    assert [r["id"] for r in read_jsonl(out)] == ["r0", "r1"]  # the first batch survived
    with out.open("a") as f:
        f.write('{"id": "r2", "question": "What')  # a line torn by the crash
    stats = annotate_jsonl(
        RECORDS,
        lambda b: [f"answer {r['id']}" for r in b],
        out,
        field="label",
        batch_size=2,
        show_progress=False,
    )
    assert stats == {"written": 2, "skipped": 2}
    rows = read_jsonl(out)
    assert [r["id"] for r in rows] == ["r0", "r1", "r2", "r3"]
    assert rows[3]["label"] == "answer r3" and rows[3]["documents"] == RECORDS[3]["documents"]
    with pytest.raises(PiscoInputError, match="exists"):
        annotate_jsonl(RECORDS, crashing, out, field="label", resume=False, show_progress=False)


def test_text_teacher_labels_records(tmp_path):
    backbone, tok = tiny_backbone("llama", 0)
    teacher = TextTeacher(backbone, tok, max_new_tokens=3, device="cpu")
    stats = label_records(
        RECORDS[:3], teacher, tmp_path / "l.jsonl", batch_size=2, show_progress=False
    )
    assert stats["written"] == 3
    labels = [r["label"] for r in read_jsonl(tmp_path / "l.jsonl")]
    # batched, left-padded generation gives the same answers as one at a time
    assert labels[2] == teacher([RECORDS[2]["question"]], [RECORDS[2]["documents"]])[0]


def test_rerank_teacher_scores(tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from pisco_rag.documents import minilm_path

    assert GoldRelevanceScorer()(RECORDS[:2]) == [[1.0, 0.0], [0.0, 1.0]]
    with pytest.raises(PiscoInputError, match="gold_index"):
        GoldRelevanceScorer()([{"question": "q", "documents": ["d"]}])
    # a tiny cross-encoder saved locally stands for any sentence-transformers CrossEncoder
    tok = AutoTokenizer.from_pretrained(minilm_path())
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1,
    )
    BertForSequenceClassification(cfg).save_pretrained(tmp_path / "ce")
    tok.save_pretrained(tmp_path / "ce")
    scorer = CrossEncoderScorer(str(tmp_path / "ce"), device="cpu")
    score_records(RECORDS, scorer, tmp_path / "s.jsonl", batch_size=3, show_progress=False)
    rows = read_jsonl(tmp_path / "s.jsonl")
    assert [len(r["teacher_scores"]) for r in rows] == [2, 2, 2, 2]
    direct = scorer.model.predict([(RECORDS[1]["question"], d) for d in RECORDS[1]["documents"]])
    assert rows[1]["teacher_scores"] == pytest.approx([float(x) for x in direct], abs=1e-5)


# ---------------------------------------------------------------------- the student
def test_training_prompt_is_the_inference_prompt():
    model = pisco()
    collator = DistillationCollator(model, "answer")
    rec = RECORDS[0]
    memories = model.compress(rec["documents"])
    (prompt,) = model._pisco_prompts([rec["question"]], [memories])
    batch = collator([rec, RECORDS[3]])
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    answer = model.tokenizer(rec["answer"], add_special_tokens=False)["input_ids"]
    assert row == prompt.input_ids + answer + [model.tokenizer.eos_token_id]
    labels = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert labels == [*answer, model.tokenizer.eos_token_id]  # loss on answer tokens only
    # the differentiable compression gives the inference memories
    student = StudentModule(model).eval()
    with torch.no_grad():
        vectors, _ = student.compress(batch["enc_input_ids"], batch["enc_attention_mask"])
    expected = torch.stack([m.vectors for m in memories])
    assert torch.allclose(vectors[:2], expected, atol=1e-5)


def test_a_few_steps_lower_the_loss_and_only_train_what_they_should(tmp_path):
    model = pisco(path=tmp_path / "backbone", scale=20)
    emb = model.model.get_input_embeddings().weight
    before = distillation_loss(model, RECORDS)["loss"]
    emb0 = emb.detach().clone()
    base0 = model.model.model.layers[0].self_attn.q_proj.base_layer.weight.detach().clone()
    lora = dict(model.model.named_parameters())
    enc_key = next(k for k in lora if "lora_B.encoder_adapter" in k)
    dec_key = next(k for k in lora if "lora_B.decoder_adapter" in k)
    enc0, dec0 = lora[enc_key].detach().clone(), lora[dec_key].detach().clone()
    fp0 = model.fingerprint

    result = train(
        model, RECORDS, config=config(tmp_path, max_steps=8, decoder_lr=2e-2, compressor_lr=2e-2)
    )
    after = distillation_loss(model, RECORDS)["loss"]
    assert after < before - 0.5, (before, after)
    losses = [h["loss"] for h in result["log_history"] if "loss" in h]
    assert len(losses) == 8 and losses[-1] < losses[0]

    changed = (emb.detach() != emb0).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= set(model._added_token_ids())  # gradient mask held
    assert torch.equal(model.model.model.layers[0].self_attn.q_proj.base_layer.weight, base0)
    assert not torch.equal(lora[enc_key], enc0) and not torch.equal(lora[dec_key], dec0)
    assert model.fingerprint != fp0 and not model.model.training
    # the native checkpoint reloads to the same weights
    reloaded = PiscoModel.from_pretrained(result["final"], device="cpu")
    assert reloaded.config.trained
    assert distillation_loss(reloaded, RECORDS)["loss"] == pytest.approx(after, abs=1e-4)


def test_training_refuses_eval_split_records(tiny_model, tmp_path):
    with pytest.raises(PiscoInputError, match="evaluation split"):
        train(tiny_model, [dict(RECORDS[0], split="eval")], output_dir=str(tmp_path))


class StepRecorder(TrainerCallback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def test_extra_args_override_the_training_arguments_set_by_train(tmp_path):
    cfg = config(tmp_path, max_steps=3, extra_args={"lr_scheduler_type": "constant"})
    out = train(pisco(), RECORDS, config=cfg)
    rates = [float(e["learning_rate"]) for e in out["log_history"] if "learning_rate" in e]
    assert len(rates) == 3 and rates[1:] == [5e-3, 5e-3]  # linear (the default) would decay


def test_resume_continues_from_the_saved_step(tmp_path):
    full = pisco()
    cfg = config(tmp_path, max_steps=4, save_steps=2)
    train(full, RECORDS, config=cfg)
    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert (checkpoint / "trainable.safetensors").is_file()
    assert (checkpoint / "optimizer.pt").is_file()
    assert json.loads((checkpoint / "config.json").read_text())["trained"] is True

    resumed = pisco()  # a fresh model: the checkpoint restores the weights
    recorder = StepRecorder()
    cfg2 = config(tmp_path, max_steps=4, save_steps=2, output_dir=str(tmp_path / "run2"))
    out = train(
        resumed, RECORDS, config=cfg2, resume_from_checkpoint=str(checkpoint), callbacks=[recorder]
    )
    assert recorder.steps == [3, 4] and out["global_step"] == 4
    a = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        assert torch.allclose(p, a[name], atol=1e-5), name  # same as the uninterrupted run
    with pytest.raises(PiscoInputError, match=r"trainable\.safetensors"):
        train(
            resumed, RECORDS, config=cfg2, resume_from_checkpoint=str(tmp_path / "run2" / "final")
        )


def oscar(seed: int = 0) -> PiscoModel:
    return pisco(seed, compressor="first-layers:1", rerank_head=True)


def test_oscar_rerank_distillation_term():
    model = oscar()
    recs = [dict(r, teacher_scores=[2.0, -1.0]) for r in RECORDS[:2]]
    batch = DistillationCollator(model, "answer")(recs)
    student = StudentModule(model, rerank_weight=0.05).eval()
    for p in model.compressor.parameters():
        p.requires_grad_(True)
    out = student(**batch)
    assert "rerank_loss" in out
    total = float(out["ce_loss"] + 0.05 * out["rerank_loss"])
    assert float(out["loss"].detach()) == pytest.approx(total)
    with torch.no_grad():  # the term is the L2 distance of head scores to teacher scores
        _, scores = model.compressor(batch["enc_input_ids"], batch["enc_attention_mask"])
    expected = ((scores - torch.tensor([2.0, -1.0, 2.0, -1.0])) ** 2).mean()
    assert float(out["rerank_loss"]) == pytest.approx(float(expected), rel=1e-4)
    out["loss"].backward()
    assert model.compressor.head.weight.grad is not None
    assert model.compressor.head.weight.grad.abs().sum() > 0
    plain = student(**DistillationCollator(model, "answer")(RECORDS[:2]))
    assert "rerank_loss" not in plain and torch.equal(plain["loss"], plain["ce_loss"])

    # listwise: cross-entropy of each question's softmax against softmax(teacher / 0.1)
    listwise = StudentModule(model, rerank_weight=0.05, rerank_loss="listwise").eval()
    out = listwise(**batch)
    target = torch.softmax(torch.tensor([2.0, -1.0]) / RERANK_TEMPERATURE, -1)
    by_question = [-(target * torch.log_softmax(scores[i : i + 2], -1)).sum() for i in (0, 2)]
    assert float(out["rerank_loss"]) == pytest.approx(float(sum(by_question) / 2), rel=1e-4)
    shifted = batch | {"teacher_scores": batch["teacher_scores"] + 5.0}
    assert float(listwise(**shifted)["rerank_loss"]) == pytest.approx(float(out["rerank_loss"]))
    held_out = distillation_loss(model, recs, rerank_loss="listwise")
    assert held_out["rerank_loss"] == pytest.approx(float(out["rerank_loss"]), rel=1e-4)
    with pytest.raises(PiscoInputError, match="rerank_loss"):
        TrainConfig(output_dir="x", rerank_loss="pairwise")

    # with context distillation too, every term is in the loss
    batch = DistillationCollator(model, "answer", text_teacher=True)(recs)
    both = StudentModule(model, rerank_weight=0.05, context_distillation=0.5).train()
    both.trainable = [p for n, p in model.model.named_parameters() if "decoder_adapter" in n]
    out = both(**batch)
    total = out["ce_loss"] + 0.5 * out["context_kl"] + 0.05 * out["rerank_loss"]
    assert float(out["loss"]) == pytest.approx(float(total), rel=1e-5)


def test_oscar_lora_compressor_trains_and_saves(tmp_path):
    model = pisco(compressor="first-layers:1", rerank_head=True, path=tmp_path / "bb")
    recs = [
        dict(r, teacher_scores=[1.0 if i == r["gold_index"] else 0.0 for i in range(2)])
        for r in RECORDS
    ]
    head0 = model.compressor.head.weight.detach().clone()
    result = train(model, recs, config=config(tmp_path, max_steps=2, compressor_tuning="lora"))
    assert any("rerank_loss" in h for h in result["log_history"])
    assert not torch.equal(model.compressor.head.weight, head0)
    loss = distillation_loss(model, recs)
    reloaded = PiscoModel.from_pretrained(result["final"], device="cpu")
    assert distillation_loss(reloaded, recs)["loss"] == pytest.approx(loss["loss"], abs=1e-4)
    stored = load_file(Path(result["final"]) / "compressor.safetensors")
    assert not [k for k in stored if k.startswith("body.")]  # by reference: LoRA factors only


def test_oscar_with_token_mean_memories_trains(tmp_path):
    """An OSCAR model reading token-mean memories: the student splices the same memories as
    inference, its head still learns from teacher scores, and the decoder adapter trains."""
    model = pisco(
        compressor="first-layers:1",
        rerank_head=True,
        compression_rate=4,
        memory_source="token-mean",
    )
    recs = [
        dict(r, teacher_scores=[1.0 if i == r["gold_index"] else 0.0 for i in (0, 1)])
        for r in RECORDS
    ]
    batch = DistillationCollator(model, "answer")(recs[:1])
    memories = model._token_mean_memories(batch["token_input_ids"], batch["token_attention_mask"])
    inference = model.compress(recs[0]["documents"], queries=[recs[0]["question"]] * 2)
    for row, memory in zip(memories, inference, strict=True):
        torch.testing.assert_close(row, memory.vectors, atol=1e-5, rtol=1e-5)
    student = StudentModule(model).eval()
    without = {k: v for k, v in batch.items() if not k.startswith("token_")}
    assert float(student(**batch)["ce_loss"]) != pytest.approx(float(student(**without)["ce_loss"]))
    head0 = model.compressor.head.weight.detach().clone()
    decoder0 = {n: p.detach().clone() for n, p in model.model.named_parameters() if "decoder" in n}
    result = train(model, recs, config=config(tmp_path, max_steps=2))
    assert any("rerank_loss" in h for h in result["log_history"])
    assert not torch.equal(model.compressor.head.weight, head0)
    changed = [
        n
        for n, p in model.model.named_parameters()
        if n in decoder0 and not torch.equal(p, decoder0[n])
    ]
    assert changed


def test_oscar_head_learning_rate_and_interaction_term():
    model = oscar()
    model.add_rerank_interaction()
    # the rerank term is computed on the full score: head + scale x late interaction
    recs = [dict(r, teacher_scores=[1.0, 0.0]) for r in RECORDS[:2]]
    batch = DistillationCollator(model, "answer")(recs)
    assert "enc_query_mask" in batch
    out = StudentModule(model, rerank_weight=1.0, rerank_loss="listwise").eval()(**batch)
    with torch.no_grad():
        _, scores = model.compressor(
            batch["enc_input_ids"], batch["enc_attention_mask"], batch["enc_query_mask"]
        )
    target = torch.softmax(torch.tensor([1.0, 0.0]) / RERANK_TEMPERATURE, -1)
    by_question = [-(target * torch.log_softmax(scores[i : i + 2], -1)).sum() for i in (0, 2)]
    assert float(out["rerank_loss"]) == pytest.approx(float(sum(by_question) / 2), rel=1e-4)

    setting = TrainConfig(
        output_dir="x", compressor_lr=1e-4, head_lr=5e-2, compressor_tuning="lora"
    )
    setup = setup_trainable(StudentModule(model), setting)
    try:
        lr_of = {id(p): g["lr"] for g in setup.groups for p in g["params"]}
        head = [*model.compressor.head.parameters(), model.compressor.interaction_scale]
        assert [lr_of[id(p)] for p in head] == [5e-2, 5e-2, 5e-2]
        rest = [
            p
            for n, p in setup.named.items()
            if n.startswith("compressor.") and "head" not in n and "interaction" not in n
        ]
        assert rest and {lr_of[id(p)] for p in rest} == {1e-4}
        # weight decay on matrices only; none on biases, scalars and the embedding rows
        decay_of = {id(p): g["weight_decay"] for g in setup.groups for p in g["params"]}
        for name, p in setup.named.items():
            matrix = p.ndim >= 2 and "embeddings" not in name and "norm" not in name.lower()
            assert decay_of[id(p)] == (setting.weight_decay if matrix else 0.0), name
    finally:
        setup.restore()
    with pytest.raises(PiscoInputError, match="head_lr"):
        TrainConfig(output_dir="x", head_lr=0.0)


# ---------------------------------------------------------------------- command line
def test_cli_build_train_eval(tmp_path, monkeypatch):
    from pisco_rag.training.cli import main

    def run(command: str) -> int:
        return main(command.format(d=tmp_path).split())

    write_task(tmp_path / "task.json", EVAL_START + 4)
    monkeypatch.setattr(data_mod, "default_embedder", lambda **kw: hash_embedder)
    build = "build-data {d}/task.json --n-documents 2 --quiet"
    assert run(build + " --split train --limit 4 --pool-size 50 --out {d}/train.jsonl") == 0
    assert run(build + " --split eval --order retrieval --out {d}/eval.jsonl") == 0
    ranked = read_jsonl(tmp_path / "eval.jsonl")
    assert all(r["retrieval_scores"] == sorted(r["retrieval_scores"], reverse=True) for r in ranked)
    backbone, tok = tiny_backbone("llama", 0)
    backbone.save_pretrained(tmp_path / "bb")
    tok.save_pretrained(tmp_path / "bb")
    train_cmd = (
        "train {d}/train.jsonl --from-backbone {d}/bb --output {d}/run --max-steps 2 "
        "--batch-size 2 --device cpu --quiet --eval-data {d}/eval.jsonl --eval-steps 2 "
        "--eval-generate 2"
    )
    assert run(train_cmd) == 0
    log = json.loads((tmp_path / "run" / "train_log.json").read_text())
    assert any("eval_loss" in h for h in log) and any("eval_match" in h for h in log)
    evaluate = "eval {d}/%s --model {d}/run/final --max-new-tokens 3 --device cpu --quiet"
    assert run(evaluate % "eval.jsonl" + " --out {d}/report.json") == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["data"]["n"] == 4 and {"text", "compressed"} <= set(report)
    assert run(evaluate % "train.jsonl" + " --out {d}/r2.json") == 2  # training records refused
    oscar_scores_token_mean_memories = (
        "train {d}/train.jsonl --from-backbone {d}/bb --output {d}/oscar --max-steps 1 "
        "--batch-size 2 --device cpu --quiet --compressor first-layers:1 --rerank-head "
        "--compression-rate 4 --memory-source token-mean"
    )
    assert run(oscar_scores_token_mean_memories) == 0
    saved = json.loads((tmp_path / "oscar" / "final" / "config.json").read_text())
    assert saved["memory_source"] == "token-mean" and saved["compressor"] == "first-layers"
    assert run(train_cmd.replace("train.jsonl", "eval.jsonl")) == 2  # eval records refused


CODE_WORDS = ["apple", "river", "stone", "cloud"]
SAME_QUESTION = [
    {
        "id": f"code{i}",
        "question": "What is the code word?",
        "documents": [f"The code word is {w}."],
        "answer": w,
    }
    for i, w in enumerate(CODE_WORDS)
]


@pytest.mark.integration
def test_overfit_check_answers_come_from_the_memories(tmp_path):
    """Every record asks the same question, so only the memories tell the answers apart: a
    broken objective (memories ignored, or no gradient through them) cannot pass. SmolLM2
    learns it in about 15 steps; a tiny random model cannot learn even plain answers."""
    from pisco_rag.evaluation.metrics import answer_metrics
    from pisco_rag.evaluation.runner import evaluate_rag

    model = PiscoModel.from_backbone(
        "embedded:smollm2-135m-instruct", device="cpu", lora_dropout=0.0
    )
    train(
        model,
        SAME_QUESTION,
        config=config(
            tmp_path,
            max_steps=40,
            batch_size=4,
            decoder_lr=1e-3,
            compressor_lr=1e-3,
            warmup_ratio=0.0,
            # every batch holds all 4 records either way; this 40-step recipe was tuned with the
            # random sampler's row order (with the length-grouped order it diverged once:
            # Match 0.25)
            group_by_length=False,
        ),
    )
    memories = [model.compress(r["documents"], use_store=False) for r in SAME_QUESTION]
    answers = model.generate([r["question"] for r in SAME_QUESTION], memories, max_new_tokens=4)
    assert answer_metrics(answers, CODE_WORDS)["match"] == 1.0, answers
    report = evaluate_rag(
        model, SAME_QUESTION, modes=["compressed"], allow_train_split=True, show_progress=False
    )
    d = report["diagnostics"]
    assert d["nll_memories"] < 0.2 * d["nll_no_context"], d  # the answers are in the memories
    assert report["compressed"]["metrics"]["match"] == 1.0


def test_pretraining_records_and_their_prompts(tmp_path):
    """Auto-encoding rebuilds the chunk after <AE>; continuation writes what follows it."""
    from pisco_rag.training.data import build_pretraining_records

    task = tmp_path / "task.json"
    write_task(task, 20)
    model = pisco()
    records = build_pretraining_records(
        task, model.tokenizer, doc_max_length=16, min_continuation_tokens=3, seed=0
    )
    assert {r["task"] for r in records} == {"ae", "continue"}
    assert all(r["index"] < 14000 and r["split"] == "train" for r in records)
    for r in records:
        if r["task"] == "ae":
            assert r["answer"] == r["documents"][0]
    collator = DistillationCollator(model, "answer")
    tok = model.tokenizer
    for task_name, tail in (("ae", ["<AE>"]), ("continue", [])):
        rec = next(r for r in records if r["task"] == task_name)
        batch = collator([rec])
        row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
        n_chunks = len(model.chunk(rec["documents"][0]))
        slots = [*model.mem_token_ids, tok.convert_tokens_to_ids("<SEP>")] * n_chunks
        prompt = [tok.bos_token_id, *slots, *tok.convert_tokens_to_ids(tail)]
        target = tok(rec["answer"], add_special_tokens=False)["input_ids"]
        assert row == [*prompt, *target, tok.eos_token_id]
    loss = distillation_loss(model, records[:4])["loss"]
    assert loss > 0


def test_question_likelihood_teacher_scores_are_question_log_likelihoods(tiny_model):
    from pisco_rag.training.teacher import QuestionLikelihoodScorer

    question = "Which river flows through Hamburg?"
    records = [{"question": question, "documents": [question + " " + question, "Unrelated."]}]
    scorer = QuestionLikelihoodScorer(tiny_model, batch_size=1)
    (scores,) = scorer(records)
    expected = [
        -x
        for x in tiny_model.answer_nll(
            [scorer.INSTRUCTION] * 2,
            [[d] for d in records[0]["documents"]],
            [question] * 2,
            adapter="none",
        )
    ]
    assert scores == pytest.approx(expected, abs=1e-5)
    assert len(scores) == 2 and all(s < 0 for s in scores)


def test_context_distillation_terms_by_hand(tmp_path):
    """The text teacher reads the documents as text with every adapter off; its next-token
    distributions and hidden states are compared with the student's on the tokens both
    sequences end with (the question, the turn markers, the answer)."""
    model = pisco(scale=20)
    recs = RECORDS[:2]
    batch = DistillationCollator(model, "answer", text_teacher=True)(recs)
    tok = model.tokenizer
    for row, rec in enumerate(recs):
        (text_prompt,) = model._pisco_prompts([rec["question"]], [rec["documents"]])
        answer = [*tok(rec["answer"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
        teacher = batch["teacher_input_ids"][row][batch["teacher_attention_mask"][row].bool()]
        assert teacher.tolist() == text_prompt.input_ids + answer
        shared = int(batch["shared_suffix"][row])
        suffix = tok.decode(teacher[-shared:])
        assert rec["question"] in suffix and "Background" not in suffix
        assert suffix.endswith(tok.decode(answer))

    student = StudentModule(model, context_distillation=0.5, hidden_distillation=2.0).train()
    student.trainable = [p for n, p in model.model.named_parameters() if "decoder_adapter" in n]
    out = student(**batch)
    total = out["ce_loss"] + 0.5 * out["context_kl"] + 2.0 * out["hidden_distance"]
    assert float(out["loss"].detach()) == pytest.approx(float(total), rel=1e-5)

    # the same two terms, position by position
    with torch.no_grad():
        use_adapter(model.model, None)
        t = model.model(
            input_ids=batch["teacher_input_ids"],
            attention_mask=batch["teacher_attention_mask"],
            position_ids=(batch["teacher_attention_mask"].cumsum(-1) - 1).clamp(min=0),
            output_hidden_states=True,
        )
        memories, _ = student.compress(batch["enc_input_ids"], batch["enc_attention_mask"])
        use_adapter(model.model, "decoder_adapter")
        embeds = model.model.get_input_embeddings()(batch["input_ids"])
        slots = torch.isin(batch["input_ids"], torch.tensor(model.mem_token_ids))
        embeds[slots] = memories.reshape(-1, memories.shape[-1])
        mask = batch["attention_mask"]
        s = model.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            output_hidden_states=True,
        )
    kls, dists = [], {layer: [] for layer in range(len(t.hidden_states) - 2, 0, -4)}
    for row in range(len(recs)):
        for back in range(2, int(batch["shared_suffix"][row]) + 1):  # predicts a shared token
            p_t = torch.log_softmax(t.logits[row, -back], -1)
            p_s = torch.log_softmax(s.logits[row, -back], -1)
            kls.append(float((p_t.exp() * (p_t - p_s)).sum()))
            for layer in dists:
                h_t, h_s = t.hidden_states[layer][row, -back], s.hidden_states[layer][row, -back]
                dists[layer].append(float((h_s - h_t).pow(2).sum() / h_t.pow(2).sum()))
    assert float(out["context_kl"]) == pytest.approx(sum(kls) / len(kls), rel=1e-3)
    by_layer = [sum(v) / len(v) for v in dists.values()]
    assert float(out["hidden_distance"]) == pytest.approx(sum(by_layer) / len(by_layer), rel=1e-3)
    assert float(out["context_kl"]) > 0

    out["loss"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.trainable)
    # evaluation (no teacher inputs, or eval mode) is the plain answer loss
    plain = student.eval()(**batch)
    assert "context_kl" not in plain and torch.equal(plain["loss"], plain["ce_loss"])


def test_context_distillation_training_brings_the_student_to_the_text_reader(tmp_path):
    model = pisco(scale=20)
    result = train(
        model,
        RECORDS,
        # the KL term weighs most here: the tiny model's answer loss is ~25 nats
        config=config(tmp_path, max_steps=12, context_distillation=50.0),
    )
    kl = [h["context_kl"] for h in result["log_history"] if "context_kl" in h]
    assert len(kl) == 12 and sum(kl[-3:]) < sum(kl[:3]), kl
    with pytest.raises(PiscoInputError, match="hidden_distillation"):
        TrainConfig(output_dir=str(tmp_path), hidden_distillation=-1)


def test_text_context_rows_read_their_documents_as_text(tmp_path):
    """With text_context_ratio, a fixed share of the records is read as text by the decoder
    adapter (no memories, no compressor input, no rerank target); the rest as memories."""
    model = oscar()
    recs = [dict(r, teacher_scores=[1.0, -1.0]) for r in RECORDS]
    collator = DistillationCollator(model, "answer", text_context_ratio=0.7)
    as_text = [collator.reads_text(r) for r in recs]
    assert as_text == [True, False, False, True]  # decided by the question, every time
    batch = collator(recs)
    tok = model.tokenizer
    for row, rec in enumerate(recs):
        ids = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        answer = [*tok(rec["answer"], add_special_tokens=False)["input_ids"], tok.eos_token_id]
        has_slots = any(i in model.mem_token_ids for i in ids)
        assert has_slots != as_text[row]
        if as_text[row]:
            (text_prompt,) = model._pisco_prompts([rec["question"]], [rec["documents"]])
            assert ids == text_prompt.input_ids + answer
    n_chunks = sum(
        len(model.chunk(d)) for r, t in zip(recs, as_text) if not t for d in r["documents"]
    )
    assert batch["enc_input_ids"].shape[0] == n_chunks
    assert batch["score_mask"].tolist() == [False, False, True, True, True, True, False, False]

    student = StudentModule(model).train()
    out = student(**batch)
    assert torch.isfinite(out["loss"]) and torch.isfinite(out["rerank_loss"])
    only_text = DistillationCollator(model, "answer", text_context_ratio=0.7)([recs[0], recs[3]])
    assert "enc_input_ids" not in only_text
    assert torch.isfinite(student(**only_text)["loss"])
    with pytest.raises(PiscoInputError, match="text_context_ratio"):
        TrainConfig(output_dir=str(tmp_path), text_context_ratio=1.0)


def test_batches_group_rows_of_similar_length(tmp_path, monkeypatch):
    """Batches are grouped by decoder row length (on by default): the long text rows and the
    short memory rows of a text_context_ratio run share a batch only where transformers'
    sampler closes a mega-batch, so neither pads the other. The length a record is grouped by
    is the width its row really has."""
    model = pisco()
    long = [dict(r, documents=[" ".join([d] * 5) for d in r["documents"]]) for r in RECORDS]
    ae = {"id": "ae0", "task": "ae", "question": "", "documents": [RECORDS[0]["documents"][0]]}
    ae["answer"] = ae["documents"][0]
    collator = DistillationCollator(model, "answer", text_context_ratio=0.7)
    assert [collator.reads_text(r) for r in long] == [True, False, False, True]
    for rec in [*long, ae]:
        assert collator([rec])["input_ids"].shape[1] == collator.decoder_length(rec)
    assert min(collator.decoder_length(long[i]) for i in (0, 3)) > max(
        collator.decoder_length(long[i]) for i in (1, 2)
    )

    batches: list[list[bool]] = []
    collate = DistillationCollator.__call__

    def spy(self, records):
        batches.append([self.reads_text(r) for r in records])
        return collate(self, records)

    monkeypatch.setattr(DistillationCollator, "__call__", spy)
    recs = [dict(r, id=f"{r['id']}-{i}") for i in range(16) for r in long]  # half text rows
    # 64 records in batches of 2: 4 mega-batches of 16 sorted by length, so at most 4 of the
    # 32 batches mix the two kinds (a random order mixes about half of them)
    train(model, recs, config=config(tmp_path, max_steps=32, text_context_ratio=0.7))
    assert len(batches) == 32
    assert sum(len(set(b)) > 1 for b in batches) <= 4, batches


def test_cli_train_reader_takes_a_learning_rate_schedule(tmp_path):
    """``pisco-rag train --lr-schedule constant`` reaches the reader's TrainingArguments."""
    from pisco_rag.cli import main

    backbone, tok = tiny_backbone("llama", 2)
    backbone.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    write_jsonl([dict(r, split="train") for r in RECORDS], data)
    argv = ["train", str(data), "--output", str(tmp_path / "run")]
    argv += ["--from-backbone", str(tmp_path / "base"), "--max-steps", "3", "--batch-size", "2"]
    argv += ["--logging-steps", "1", "--save-steps", "3"]
    argv += ["--decoder-lr", "1e-3", "--compressor-lr", "1e-3"]
    argv += ["--warmup-ratio", "0"]
    argv += ["--lr-schedule", "constant", "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    state = json.loads((tmp_path / "run" / "checkpoint-3" / "trainer_state.json").read_text())
    rates = [e["learning_rate"] for e in state["log_history"] if "learning_rate" in e]
    assert rates == pytest.approx([1e-3] * 3)  # linear, the default, would decay
