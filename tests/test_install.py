"""The install: README and CI run the same test command, the dependency check names the
versions to install, and loading is quiet by default."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from packaging.version import Version

from pisco_rag import compat
from pisco_rag.compat import DependencyError, check_dependencies

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README starts with a bash block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_in_a_fresh_venv():
    ask, test = readme_commands()[:2]
    assert "pisco-rag ask" in ask and "pytest" in test
    script = (ROOT / ".ci" / "run").read_text()
    assert test in script.splitlines()
    assert "python3 -m venv" in script and 'source "$VENV/bin/activate"' in script
    assert "-c constraints.txt" in ask and "-c constraints.txt" in test


def test_constraints_pin_versions_inside_the_tested_ranges():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = Version(version)
    ranges = compat.tested_ranges()
    assert set(ranges) == {"transformers", "peft"}
    for name, req in ranges.items():
        assert pins[name] in req.specifier, f"constraints.txt pins {name} outside {req}"


@pytest.fixture
def fake_versions(monkeypatch):
    def use(**versions):
        monkeypatch.setattr(compat, "installed_version", lambda n: Version(versions[n]))
        check_dependencies.cache_clear()

    yield use
    check_dependencies.cache_clear()


def test_too_old_peft_names_the_versions_to_install(fake_versions):
    fake_versions(transformers="5.24.0", peft="0.16.0")
    with pytest.raises(DependencyError, match=r"peft 0\.16\.0 \(needs .*pip install .*'peft"):
        check_dependencies()


def test_newer_than_tested_warns_once(fake_versions):
    from pisco_rag import verbosity

    verbosity._warned.clear()
    fake_versions(transformers="99.0.0", peft="0.21.2")
    with pytest.warns(RuntimeWarning, match=r"not tested with transformers 99\.0\.0"):
        check_dependencies()
    check_dependencies.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_dependencies()  # the same message is not repeated


def test_tested_versions_pass_silently(fake_versions):
    ranges = compat.tested_ranges()
    lowest = {
        n: str(next(s for s in r.specifier if s.operator == ">=").version)
        for n, r in ranges.items()
    }
    fake_versions(**lowest)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_dependencies()


@pytest.mark.integration
def test_cli_ask_prints_the_answer_and_one_notice_only(tmp_path):
    """At default verbosity: no progress bar, no transformers message, one NOTE."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pisco_rag.cli",
            "ask",
            str(ROOT / "examples" / "docs"),
            "When was the Vallmo lighthouse built?",
            "--max-new-tokens",
            "8",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    err = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("NOTE: "), result.stderr
    out = result.stdout.splitlines()
    # a short answer decoded from memories is aligned to the closest span of the chunks
    assert re.match(
        r"Answer \(5 compressed chunks(, aligned to a passage span from '.*')?\): ", out[0]
    )
    assert out[1:3] == ["", "Sources:"]
    assert len(out) == 8 and all(re.match(r"  \d\. examples|  \d\. /", line) for line in out[3:])


def test_cli_help_imports_no_torch():
    """Help and argument errors answer at once: nothing heavy is imported to parse arguments."""
    code = (
        "import sys\n"
        "from pisco_rag.cli import build_parser\n"
        "build_parser().format_help()\n"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_cli_rejects_bad_numbers(value, capsys):
    from pisco_rag.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["ask", "examples/docs", "question?", "--top-k", value])
    assert exit_info.value.code == 2
    assert "--top-k" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ask", "examples/docs", "   "], "the question is empty"),
        (["ask", "no/such/folder", "question?"], "is not a folder"),
    ],
)
def test_cli_refuses_bad_arguments_before_loading_a_model(argv, message):
    """Checked by argparse in a fresh process: no model (not even torch) is loaded."""
    code = (
        "import sys\n"
        "from pisco_rag.cli import main\n"
        "try:\n"
        f"    main({argv!r})\n"
        "except SystemExit as e:\n"
        "    assert e.code == 2, e.code\n"
        "    assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert message in result.stderr


def test_unreachable_hub_means_local_cache_only(monkeypatch):
    """Offline, a hub id is looked up in the local cache only: a clear CheckpointError at
    once, not a minute of download retries."""
    import huggingface_hub

    from pisco_rag import CheckpointError, PiscoModel, checkpoints

    calls = []

    def fake_snapshot_download(name, **kwargs):
        calls.append(kwargs["local_files_only"])
        raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")

    real_check = checkpoints.hub_reachable.__wrapped__  # uncached
    monkeypatch.setattr(checkpoints, "hub_reachable", lambda: False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    with pytest.raises(CheckpointError, match="hf download owner/absent"):
        PiscoModel.from_pretrained("owner/absent")
    assert calls == [True]
    with pytest.raises(CheckpointError, match="could not be loaded"):
        PiscoModel.from_backbone("owner/absent-backbone")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert real_check() is False  # HF_HUB_OFFLINE answers without a connection
