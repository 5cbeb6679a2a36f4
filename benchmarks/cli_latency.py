"""Wall-clock time of the command line: ``--help``, ``ask --help`` and a whole ``ask`` (time to
the first answer, model loading included), for one or more checkouts side by side.

    python benchmarks/cli_latency.py [--checkout before=/path/to/old/checkout] [--repeats 3]

The current checkout is always measured (label ``now``); each ``--checkout LABEL=DIR`` adds
another source tree run with the same Python (so the same installed dependencies), for example
a ``git worktree`` of an older commit. The question is asked over ``examples/docs`` with the
embedded default, as in the README.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, environment, write

ROOT = Path(__file__).parents[1]
QUESTION = "When was the Vallmo lighthouse built?"
COMMANDS = {
    "help": ["--help"],
    "ask_help": ["ask", "--help"],
    "ask": ["ask", str(ROOT / "examples" / "docs"), QUESTION],
}


def time_command(checkout: Path, args: list[str], repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "pisco_rag.cli", *args],
            cwd=checkout,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise RuntimeError(f"{args} failed in {checkout}:\n{done.stderr[-2000:]}")
    return {"median_seconds": round(statistics.median(seconds), 3), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", action="append", default=[], help="LABEL=DIR")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--commands", nargs="+", choices=list(COMMANDS), default=list(COMMANDS))
    parser.add_argument("--out", default=str(RESULTS / "cli_latency.json"))
    args = parser.parse_args()

    checkouts = {"now": ROOT}
    for item in args.checkout:
        label, _, directory = item.partition("=")
        checkouts[label] = Path(directory).resolve()
    results = {
        label: {name: time_command(path, COMMANDS[name], args.repeats) for name in args.commands}
        for label, path in checkouts.items()
    }
    write(
        {"question": QUESTION, "repeats": args.repeats, "results": results, "env": environment()},
        Path(args.out),
    )


if __name__ == "__main__":
    main()
