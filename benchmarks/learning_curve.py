"""Learning curves of consecutive training stages (`pisco-rag train` run folders): training
loss against examples seen, one stage after the other; the answer-likelihood diagnostics the
trainer logs at each evaluation (gold-answer NLL with the text, the memories, another
question's memories and no context); and the final eval reports.

    python benchmarks/learning_curve.py runs/pre runs/qa1 --batch-size 8 \
        --reports benchmarks/results/eval_pisco_smollm2_k1.json ... \
        --out benchmarks/results/learning_curve_smollm2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DIAGNOSTICS = ("nll_text", "nll_memories", "nll_shuffled_memories", "nll_no_context")


def stage_points(run: Path, batch_size: int, offset: int) -> tuple[list[dict], list[dict]]:
    """(training-loss points, evaluation-diagnostics points) of one run folder."""
    log = json.loads((run / "train_log.json").read_text())
    losses = [
        {
            "stage": run.name,
            "step": h["step"],
            "examples": offset + h["step"] * batch_size,
            "loss": h["loss"],
        }
        for h in log
        if "loss" in h and "step" in h
    ]
    diagnostics = {  # one per step: the final evaluation repeats the last one
        h["step"]: {
            "stage": run.name,
            "step": h["step"],
            "examples": offset + h["step"] * batch_size,
            **{k: float(h[f"eval_{k}"]) for k in (*DIAGNOSTICS, "gap_recovered", "match")},
        }
        for h in log
        if "eval_gap_recovered" in h and "step" in h
    }
    return losses, list(diagnostics.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run folders, in training order")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reports", nargs="*", default=[], help="pisco-rag eval reports")
    parser.add_argument("--out", required=True, help="output path without suffix (.json, .png)")
    parser.add_argument("--command", default=None, help="the commands that made the runs")
    args = parser.parse_args()
    points: list[dict] = []
    evals: list[dict] = []
    offset = 0
    for run in map(Path, args.runs):
        stage, diagnostics = stage_points(run, args.batch_size, offset)
        points += stage
        evals += diagnostics
        offset = stage[-1]["examples"] if stage else offset
    reports = {}
    for path in args.reports:
        r = json.loads(Path(path).read_text())
        reports[Path(path).stem] = {
            k: r[k]["metrics"] for k in ("text", "text_decoder", "compressed") if k in r
        } | {"diagnostics": r.get("diagnostics"), "command": r.get("command")}
    out = Path(args.out)
    result = {
        "command": args.command,
        "curve": points,
        "diagnostics_during_training": evals,
        "evaluations": reports,
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(12 if evals else 7, 4), squeeze=False)
    ax = axes[0][0]
    for stage in dict.fromkeys(p["stage"] for p in points):
        xs = [p["examples"] for p in points if p["stage"] == stage]
        ys = [p["loss"] for p in points if p["stage"] == stage]
        ax.plot(xs, ys, marker=".", label=stage)
    ax.set_xlabel("training examples seen")
    ax.set_ylabel("training loss (token cross-entropy)")
    ax.set_title("training loss, stage after stage")
    ax.legend()
    if evals:
        ax = axes[0][1]
        xs = [e["examples"] for e in evals]
        for key in DIAGNOSTICS:
            ax.plot(xs, [e[key] for e in evals], marker="o", label=key.removeprefix("nll_"))
        ax.set_xlabel("training examples seen")
        ax.set_ylabel("gold-answer NLL per token (eval)")
        ax.set_title("do the memories carry the answer?")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(f"-> {out.with_suffix('.json')}, {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
