"""Smoke tests: each benchmark script runs on a tiny model and writes its JSON (no timings
are asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def run_script(*args: str) -> None:
    done = subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"{args[0]} exited {done.returncode}:\n{done.stderr[-4000:]}"


def test_splice_overhead_script_runs(tmp_path):
    out = tmp_path / "splice.json"
    run_script(
        "benchmarks/splice_overhead.py",
        "--tiny",
        "--repeats",
        "1",
        "--k",
        "3",
        "--new-tokens",
        "4",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["k_memories"] == 3 and result["new_tokens"] == 4
    assert set(result["median_seconds"]) == {"from_memories", "plain_prompt"}
    assert result["environment"]["command"].endswith(f"--out {out}")


def test_compression_cost_script_runs(tmp_path):
    out = tmp_path / "cost.json"
    run_script(
        "benchmarks/compression_cost.py", "--tiny", "--repeats", "1", "--k", "2", "--out", str(out)
    )
    result = json.loads(out.read_text())
    assert result["k_documents"] == 2 and result["compressor_layers"] == 1
    assert set(result["median_seconds"]) == {"pisco_full_backbone", "oscar_first_layers"}


def test_speed_script_runs(tmp_path):
    out = tmp_path / "speed.json"
    subprocess.run(
        [
            sys.executable,
            "benchmarks/speed.py",
            "--tiny",
            "--repeats",
            "1",
            "--batch",
            "2",
            "--k",
            "2",
            "--new-tokens",
            "2",
            "--scaling-ks",
            "1",
            "3",
            "--out",
            str(out),
        ],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=900,
    )
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"text", "pisco", "oscar"}
    for row in result["modes"].values():
        assert row["prefill_gflops"] > 0 and set(row["scaling_ms_per_query"]) == {"1", "3"}
    # the compressed prompt is shorter than the text prompt by construction
    assert result["modes"]["pisco"]["prompt_tokens"] < result["modes"]["text"]["prompt_tokens"]
    assert out.with_suffix(".png").is_file()


def test_store_scale_script_runs(tmp_path):
    out = tmp_path / "store.json"
    run_script(
        "benchmarks/store_scale.py",
        "--tiny",
        "--sizes",
        "300",
        "600",
        "--writers",
        "1",
        "--repeats",
        "3",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert [row["entries"] for row in result["sizes"]] == [300, 600]
    assert set(result["sizes"][1]["sqlite"]) >= {"read_10_keys", "read_50_keys", "bytes_per_entry"}
    effect = result["narrowed_storage_effect"]
    assert effect["float16"]["min_cosine"] > 0.99 and effect["int8"]["min_cosine"] > 0.99
    assert result["environment"]["command"].endswith(f"--out {out}")


def test_ray_throughput_script_runs(tmp_path):
    pytest.importorskip("ray.data")
    out = tmp_path / "ray.json"
    run_script(
        "benchmarks/ray_throughput.py",
        "--tiny",
        "--documents",
        "6",
        "--warmup-documents",
        "0",
        "--workers",
        "1",
        "--num-cpus",
        "1",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert result["documents"] == 6 and [r["workers"] for r in result["runs"]] == [1]
    assert result["runs"][0]["documents_per_second"] > 0


def eval_records(path: Path, n: int = 3) -> Path:
    """A tiny evaluation file in the layout of ``pisco-rag build-data``."""
    with path.open("w") as f:
        for i in range(n):
            docs = [f"Passage {j} about river number {i}." for j in range(3)]
            record = {
                "id": f"eval-{i}",
                "split": "eval",
                "question": f"Which river is number {i}?",
                "documents": docs,
                "gold_index": i % 3,
                "retrieval_scores": [0.5, 0.4, 0.3],
                "answer": f"river {i}",
            }
            f.write(json.dumps(record) + "\n")
    return path


def test_quality_script_runs(tmp_path):
    out = tmp_path / "quality.json"
    data = eval_records(tmp_path / "eval.jsonl")
    run_script(
        "benchmarks/quality.py",
        "--tiny",
        "--eval",
        str(data),
        "--ks",
        "1",
        "2",
        "--prompt-k",
        "2",
        "--max-new-tokens",
        "3",
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())
    assert set(result["by_k"]) == {"1", "2"}
    for rows in result["by_k"].values():
        assert {"text", "pisco", "oscar"} <= set(rows)
        assert 0.0 <= rows["pisco"]["metrics"]["match"] <= 1.0
    assert set(result["prompts"]) == {"pisco_prompt", "llamaindex_default_prompt"}
    assert (tmp_path / "quality.png").stat().st_size > 0


def test_reranking_script_runs(tmp_path):
    out = tmp_path / "reranking.json"
    data = eval_records(tmp_path / "eval.jsonl", n=4)
    run_script(
        "benchmarks/reranking.py",
        "--tiny",
        "--eval",
        str(data),
        "--out",
        str(out),
        "--teacher",
        "lm-likelihood",
    )
    rankers = json.loads(out.read_text())["rankers"]
    # retrieval_scores put document 0 first; the gold passages are 0, 1, 2, 0
    assert rankers["minilm_first_stage"]["metrics"]["recall@1"] == 0.5
    assert rankers["minilm_first_stage"]["metrics"]["mrr"] == pytest.approx(
        (1 + 1 / 2 + 1 / 3 + 1) / 4
    )
    assert 0.0 <= rankers["oscar_head"]["metrics"]["ndcg@5"] <= 1.0
    assert "metrics" not in rankers["cross_encoder"]
    teacher = rankers["teacher_lm_likelihood"]["metrics"]
    assert 0.0 <= teacher["recall@1"] <= teacher["recall@5"] <= 1.0
    assert (tmp_path / "reranking.png").stat().st_size > 0


def test_train_throughput_script_runs(tmp_path):
    out = tmp_path / "throughput.json"
    data = eval_records(tmp_path / "train.jsonl", n=4)  # the layout of training records too
    run_script(
        "benchmarks/train_throughput.py",
        "--tiny",
        "--train",
        str(data),
        "--steps",
        "1",
        "--recipes",
        "shipped_default",
        "oscar_fp32",
        "oscar_fp32_text_rows_grouped",
        "--out",
        str(out),
    )
    recipes = json.loads(out.read_text())["recipes"]
    assert set(recipes) == {"shipped_default", "oscar_fp32", "oscar_fp32_text_rows_grouped"}
    assert all(r["examples_per_second"] > 0 and r["timed_steps"] == 1 for r in recipes.values())
    assert recipes["shipped_default"]["speedup_vs_shipped_default"] == 1.0


def test_cli_latency_script_runs(tmp_path):
    out = tmp_path / "cli.json"
    run_script(
        "benchmarks/cli_latency.py",
        "--commands",
        "help",
        "ask_help",
        "--repeats",
        "1",
        "--checkout",
        f"same={ROOT}",
        "--out",
        str(out),
    )
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"now", "same"}
    assert all(r["help"]["median_seconds"] > 0 for r in results.values())


def test_accelerator_run_script_runs_end_to_end(tmp_path):
    """The one-call accelerator run, on a tiny model and tiny data on the CPU: every phase
    trains, the model and both evaluation reports land in --out."""

    def write_jsonl(name: str, records: list[dict]) -> str:
        path = tmp_path / name
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return str(path)

    passages = [f"River number {i} flows through town {i} and then to the sea." for i in range(6)]
    pretrain = write_jsonl(
        "pre.jsonl",
        [
            {
                "id": f"p{i}",
                "split": "train",
                "question": "",
                "task": task,
                "documents": [p],
                "answer": p if task == "ae" else "and then it rains.",
            }
            for i, p in enumerate(passages)
            for task in ("ae", "continue")
        ],
    )
    qa = [
        {
            "id": f"q{i}",
            "split": "train",
            "question": f"Where does river {i} flow?",
            "documents": [p],
            "gold_index": 0,
            "answer": f"town {i}",
        }
        for i, p in enumerate(passages)
    ]
    k1 = write_jsonl("k1.jsonl", qa)
    k3 = write_jsonl(
        "k3.jsonl",
        [
            dict(r, documents=[r["documents"][0], *passages[:2]], teacher_scores=[1.0, 0.0, 0.0])
            for r in qa
        ],
    )
    evaluation = write_jsonl("eval.jsonl", [dict(r, split="eval") for r in qa[:3]])
    out = tmp_path / "out"
    run_script(
        "benchmarks/accelerator_run.py",
        "--tiny",
        "--pretrain",
        pretrain,
        "--train-k1",
        k1,
        "--train-k3",
        k3,
        "--eval",
        evaluation,
        "--eval-k5",
        evaluation,
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path / "work"),
        "--minutes",
        "1",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
    )
    run = json.loads((out / "run.json").read_text())
    assert [p["steps"] for p in run["phases"].values()] == [2, 2, 2]
    assert (out / "model" / "config.json").is_file()
    for name in ("k1", "k5"):
        report = json.loads((out / f"eval_{name}.json").read_text())
        assert report["data"]["n"] == 3 and "gap_recovered" in report["diagnostics"]
    assert json.loads((out / "train_log_k3.json").read_text())


def test_retriever_throughput_script_runs(tmp_path):
    out = tmp_path / "retriever_throughput.json"
    data = eval_records(tmp_path / "train.jsonl", n=4)
    recipes = ["one_forward_b4", "length_chunks_b4"]
    run_script(
        "benchmarks/retriever_throughput.py",
        "--tiny",
        "--train",
        str(data),
        "--steps",
        "1",
        "--recipes",
        *recipes,
        "--out",
        str(out),
    )
    result = json.loads(out.read_text())["recipes"]
    assert list(result) == recipes
    assert all(r["timed_steps"] == 1 and r["peak_rss_mib"] > 0 for r in result.values())
    assert result["one_forward_b4"]["speedup_vs_one_forward_b4"] == 1.0


def test_retrieval_script_runs(tmp_path):
    out = tmp_path / "retrieval.json"
    data = eval_records(tmp_path / "eval.jsonl", n=4)
    run_script("benchmarks/retrieval.py", "--tiny", "--eval", str(data), "--out", str(out))
    result = json.loads(out.read_text())
    assert result["questions"] == 4 and result["corpus_passages"] == 12
    assert {"bm25", "minilm", "pisco_backbone_untrained_mean"} <= set(result["retrievers"])
    for r in result["retrievers"].values():
        assert 0.0 <= r["metrics"]["recall@1"] <= r["metrics"]["recall@5"] <= 1.0
        assert 0.0 <= r["top10_jaccard_under_perturbation"] <= 1.0


def test_memory_readability_script_runs(tmp_path):
    out = tmp_path / "readability.json"
    data = eval_records(tmp_path / "eval.jsonl", n=4)
    train = tmp_path / "train.jsonl"
    train.write_text(data.read_text().replace('"split": "eval"', '"split": "train"'))
    script = ["benchmarks/memory_readability.py", "--tiny", "--train", str(train)]
    script += ["--eval", str(data), "--out", str(out)]
    run_script(*script, "--anchor-steps", "2", "--decoder-steps", "2")
    result = json.loads(out.read_text())
    assert result["questions"] == 4
    expected = {"compressor", "compressor_after_anchor", "oracle_segment_sum"}
    assert expected | {"oracle_segment_mean", "oracle_segment_mean_rescaled"} == set(
        result["memories"]
    )
    curve = result["decoder_on_oracle"]["curve"]
    for d in [*result["memories"].values(), *curve]:
        diff = d["nll_memories"] - d["nll_shuffled_memories"]
        assert abs(d["own_minus_shuffled"] - diff) < 1e-3
    # the compressor's memories move when it is anchored; the oracles use no compressor
    before, after = result["memories"]["compressor"], result["memories"]["compressor_after_anchor"]
    assert before["nll_memories"] != after["nll_memories"]
    assert before["nll_text"] == after["nll_text"]
    assert [p["step"] for p in result["anchor"]["curve"]] == [2]
    # the decoder trained: its no-context NLL moved away from the untrained model's
    assert [p["examples"] for p in curve] == [16]
    assert curve[0]["nll_no_context"] != result["memories"]["oracle_segment_mean"]["nll_no_context"]
    assert 0.0 <= curve[0]["match_memories_k1"] <= 1.0
    run_script(*script, "--decoder-only", "--compression-rate", "4", "--decoder-steps", "1")
    result = json.loads(out.read_text())
    assert "memories" not in result and result["decoder_on_oracle"]["compression_rate"] == 4
    assert [p["step"] for p in result["decoder_on_oracle"]["curve"]] == [1]


def test_grounding_script_scores_stored_answers(tmp_path):
    """Grounding a stored report: a misspelled name becomes right, nothing runs a model."""
    records = [
        {
            "id": "a",
            "documents": ["Its keeper was Oskar Berg until 1969 ."],
            "answer": "Oskar Berg",
        },
        {"id": "b", "documents": ["The Elbe flows through Hamburg ."], "answer": "Elbe"},
    ]
    predictions = [
        {"id": "a", "answer": "Oskar Berg", "text": "Oskar Berg", "compressed": "Oskar Beg"},
        {"id": "b", "answer": "Elbe", "text": "The Elbe", "compressed": "Paris"},
    ]
    (tmp_path / "records.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    report = {"model": {"name": "m"}, "predictions": predictions}
    (tmp_path / "report.json").write_text(json.dumps(report))
    out = tmp_path / "grounding.json"
    run_script(
        "benchmarks/grounding.py",
        str(tmp_path / "report.json"),
        str(tmp_path / "records.jsonl"),
        "--out",
        str(out),
    )
    modes = json.loads(out.read_text())["reports"]["report.json"]["modes"]
    assert modes["compressed"]["as_decoded"]["match"] == 0.0
    assert modes["compressed"]["grounded"]["0.75"]["match"] == 0.5  # "Oskar Beg" -> "Oskar Berg"
    assert modes["text"]["grounded"]["0.75"]["match"] == 1.0
    assert all(g["matches_lost"] == 0 for m in modes.values() for g in m["grounded"].values())
