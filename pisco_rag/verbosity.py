"""How much pisco-rag and the libraries under it say.

By default a user sees answers and one notice per model, nothing else: loading hides
transformers' and huggingface_hub's progress bars and informational warnings, and pisco-rag's
own notices are emitted once per process. Turn the ``pisco_rag`` logger to INFO (or run the CLI
with ``--verbose``) to see everything again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Iterator

_lock = threading.Lock()
_warned: set[tuple[type[Warning], str]] = set()


def verbose() -> bool:
    """True when the ``pisco_rag`` logger shows INFO messages (``--verbose``)."""
    return logging.getLogger("pisco_rag").isEnabledFor(logging.INFO)


def set_verbose(on: bool) -> None:
    """Show (``True``) or hide the details of loading: pisco-rag's INFO logs, transformers'
    messages and progress bars."""
    logging.getLogger("pisco_rag").setLevel(logging.INFO if on else logging.WARNING)


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Silence transformers' and huggingface_hub's loading chatter (progress bars, the
    embedding-resize notice, load reports) unless :func:`verbose`. Errors still show."""
    if verbose():
        yield
        return
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers.utils import logging as hf_logging

    with _lock:
        level = hf_logging.get_verbosity()
        bars_were_on = hf_logging.is_progress_bar_enabled()
        hub_bars_were_off = are_progress_bars_disabled()
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        disable_progress_bars()
    try:
        yield
    finally:
        with _lock:
            hf_logging.set_verbosity(level)
            if bars_were_on:
                hf_logging.enable_progress_bar()
            if not hub_bars_were_off:
                enable_progress_bars()


def warn_once(message: str, category: type[Warning] = UserWarning, stacklevel: int = 2) -> None:
    """``warnings.warn`` the first time a message is seen in this process, then never again."""
    with _lock:
        if (category, message) in _warned:
            return
        _warned.add((category, message))
    warnings.warn(message, category, stacklevel=stacklevel + 1)


__all__ = ["quiet_loading", "set_verbose", "verbose", "warn_once"]
