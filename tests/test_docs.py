"""Every Python code block of the README and docs/*.md runs as written, offline.

The blocks of one file run in order in one namespace (a later block may use what an earlier
one defined), in a fresh working directory. A block that needs the network, a GPU or hours is
marked in the Markdown source by the line ``<!-- doc-test: skip (reason) -->`` just above it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(
    r"(?:^<!-- doc-test: skip \((?P<reason>[^\n]+)\) -->\n)?^```python\n(?P<code>.*?)^```$",
    re.S | re.M,
)


def code_blocks(path: Path) -> list[tuple[str | None, str]]:
    return [(m["reason"], m["code"]) for m in BLOCK.finditer(path.read_text())]


def test_every_skip_marker_is_attached_to_a_block():
    for path in DOCS:
        text = path.read_text()
        markers = text.count("<!-- doc-test: skip")
        assert markers == sum(r is not None for r, _ in code_blocks(path)), path.name


@pytest.mark.integration
@pytest.mark.parametrize(
    "path",
    [p for p in DOCS if any(reason is None for reason, _ in code_blocks(p))],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_code_blocks_run_as_written(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__doc_test__"}
    ran = 0
    for i, (reason, code) in enumerate(code_blocks(path)):
        if reason:
            continue
        exec(compile(code, f"{path.name} (python block {i + 1})", "exec"), namespace)
        ran += 1
    assert ran >= 1
