"""Peak memory of the whole pipeline (retrieve, compress, answer) with one backbone for all
three stages against all-MiniLM-L6-v2 retrieval plus the same reader.

Each configuration runs ``pisco-rag ask`` over a folder in its own process; the peak resident
memory of that process is reported (``ru_maxrss`` of the child).

    python benchmarks/pipeline_memory.py --model DIR [--folder examples/docs]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from _common import RESULTS, environment, write

QUESTION = "When was the Vallmo lighthouse built?"


def peak_rss_mib(command: list[str]) -> tuple[float, str]:
    """(peak RSS of the command's process in MiB, its output): one wrapper process per command,
    so that RUSAGE_CHILDREN holds only that command."""
    probe = (
        "import resource, subprocess, sys\n"
        "out = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "sys.stderr.write(out.stderr[-2000:]) if out.returncode else None\n"
        "print(out.stdout)\n"
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.exit(out.returncode)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *command], capture_output=True, text=True, check=False
    )
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stderr}")
    *output, peak = done.stdout.strip().splitlines()
    return int(peak) / 1024, "\n".join(output)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a PISCO model with a retriever adapter")
    parser.add_argument("--folder", default=str(Path(__file__).parents[1] / "examples" / "docs"))
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline_memory.json")
    args = parser.parse_args()
    rows = {}
    for retriever in ("pisco", "minilm"):
        command = [
            *[sys.executable, "-m", "pisco_rag.cli", "ask", args.folder, QUESTION],
            *["--model", args.model, "--retriever", retriever],
        ]
        peak, output = peak_rss_mib(command)
        rows[retriever] = {"peak_rss_mib": round(peak, 1), "answer": output.splitlines()[0]}
        print(retriever, rows[retriever])
    write(
        {
            "benchmark": "pipeline_memory",
            "question": QUESTION,
            "model": args.model,
            "pipelines": {
                "one backbone (retriever adapter)": rows["pisco"],
                "all-MiniLM-L6-v2 + the same reader": rows["minilm"],
            },
            "saved_mib": round(rows["minilm"]["peak_rss_mib"] - rows["pisco"]["peak_rss_mib"], 1),
            "environment": environment(),
        },
        args.out,
    )


if __name__ == "__main__":
    main()
