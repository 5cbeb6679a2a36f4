"""argparse argument types shared by the command line's subcommands."""

from __future__ import annotations

import argparse


def _int_at_least(value: str, least: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < least:
        raise argparse.ArgumentTypeError(f"must be at least {least}, got {number}")
    return number


def positive_int(value: str) -> int:
    """argparse type: an integer of at least 1."""
    return _int_at_least(value, 1)


def non_negative_int(value: str) -> int:
    """argparse type: an integer of at least 0."""
    return _int_at_least(value, 0)


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
