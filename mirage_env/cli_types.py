"""Argument types of the command line: a bad value is refused before any work starts.

Each is an ``argparse`` ``type=``: it returns the parsed value or raises
``argparse.ArgumentTypeError`` with a message naming the valid range, which
argparse prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

__all__ = ["positive_int", "non_negative_int", "positive_float", "non_negative_float", "output_file", "video_file",
           "VIDEO_SUFFIXES"]

VIDEO_SUFFIXES = (".mp4", ".gif")


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _at_least(parse, low, strict: bool):
    """An argparse type: ``parse`` then require the value > low (strict) or >= low."""
    def check(text: str):
        value = parse(text)
        if value < low or (strict and value == low):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {low}, got {value}")
        return value
    return check


positive_int = _at_least(_int, 1, strict=False)
non_negative_int = _at_least(_int, 0, strict=False)
positive_float = _at_least(_float, 0.0, strict=True)
non_negative_float = _at_least(_float, 0.0, strict=False)


def output_file(text: str) -> str:
    """A path a file can be written to: its folder exists (or can be made) and is writable, and it is not a folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; give a file path")
    folder = path.parent
    existing = next((p for p in (folder, *folder.parents) if p.exists()), Path("."))
    if not existing.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {text}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text}: {existing} is not writable")
    return text


def video_file(text: str) -> str:
    """A .mp4 / .gif path that can be written; the empty string means no video."""
    if text == "":
        return text
    if Path(text).suffix.lower() not in VIDEO_SUFFIXES:
        raise argparse.ArgumentTypeError(f"a video path ends in {' or '.join(VIDEO_SUFFIXES)}, got {text!r}")
    return output_file(text)
