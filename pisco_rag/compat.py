"""A startup check of the installed transformers and peft against the ranges pisco-rag was
tested with, so a bad pair fails with the versions to install instead of an error from deep
inside a library.

The ranges come from the package's own metadata (``pyproject.toml``), the one place they are
written; ``constraints.txt`` in the repository pins the exact versions of the last test run.
"""

from __future__ import annotations

import functools
from importlib import metadata

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from .errors import PiscoError
from .verbosity import warn_once

CHECKED = ("transformers", "peft")
DISTRIBUTION = "pisco-rag"


class DependencyError(PiscoError, ImportError):
    """An installed dependency is a version pisco-rag is known not to work with."""


def tested_ranges() -> dict[str, Requirement]:
    """The requirement of each checked dependency, as pisco-rag's metadata declares it."""
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return {}
    out = {}
    for line in requires:
        req = Requirement(line)
        if req.name in CHECKED and req.marker is None:
            out[req.name] = req
    return out


def installed_version(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


@functools.cache
def check_dependencies() -> None:
    """Raise :class:`DependencyError` when transformers or peft is older than the tested
    range (a pair known not to work); warn once when one is newer than any version tested."""
    ranges = tested_ranges()
    too_old, untested = [], []
    for name, req in ranges.items():
        version = installed_version(name)
        if version is None or version in req.specifier:
            continue
        lower = [s for s in req.specifier if s.operator in (">=", ">", "==", "~=")]
        if any(version not in SpecifierSet(str(s)) for s in lower):
            too_old.append(f"{name} {version} (needs {req.specifier})")
        else:
            untested.append(f"{name} {version} (tested: {req.specifier})")
    install = " ".join(f"'{r}'" for r in ranges.values())
    if too_old:
        raise DependencyError(
            f"pisco-rag does not work with {', '.join(too_old)}. Install the tested versions: "
            f"pip install {install}, or pip install -c constraints.txt (the exact set the tests "
            "passed with, in the pisco-rag repository)."
        )
    if untested:
        warn_once(
            f"pisco-rag was not tested with {', '.join(untested)}; if something fails, install "
            f"the tested versions: pip install {install}",
            RuntimeWarning,
        )


__all__ = ["DependencyError", "check_dependencies", "tested_ranges"]
