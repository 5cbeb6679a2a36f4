"""argparse argument types shared by the command line's subcommands."""

from __future__ import annotations

import argparse


def positive_int(value: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def question_text(value: str) -> str:
    """argparse type: a question with words in it (checked before any model loads)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("the question is empty; ask something")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("the question is not valid text") from None
    return value


def existing_folder(value: str) -> str:
    """argparse type: a folder that exists (checked before any model loads)."""
    import os

    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a folder")
    return value
