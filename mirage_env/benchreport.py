"""What every benchmark records beside its figures, and how it writes them.

The scripts under ``benchmarks/`` and ``mirage-env bench`` start their JSON with
:func:`header` (the command as typed, the machine, the options) and end with
:func:`write_json`, so every results file says how to reproduce it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

__all__ = ["typed_command", "machine", "header", "write_json"]


def typed_command(argv: list[str] | None = None, orig_argv: list[str] | None = None) -> str:
    """The command line as it was typed.

    ``mirage-env bench memory --json f`` for the console script, ``python
    benchmarks/memory.py --json f`` for a script, ``python -m pkg.module ...`` for
    a module. ``argv`` / ``orig_argv`` default to ``sys.argv`` / ``sys.orig_argv``.
    """
    argv = list(sys.argv if argv is None else argv)
    orig_argv = list(getattr(sys, "orig_argv", argv) if orig_argv is None else orig_argv)
    if not argv:
        return ""
    if argv[0].endswith(".py") or argv[0] in ("-c", "-m", ""):
        # Run by the interpreter: orig_argv keeps "-m module" or the script path as typed.
        return shlex.join(["python", *orig_argv[1:]])
    # A console script (mirage-env): sys.argv[0] is its full path.
    return shlex.join([Path(argv[0]).name, *argv[1:]])


def machine() -> dict:
    """Where the figures were measured (call after ``torch.set_num_threads``)."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def header(args: argparse.Namespace) -> dict:
    """The first keys of a benchmark's JSON: ``command``, ``machine`` and ``config`` (the options)."""
    options = {key: value for key, value in vars(args).items() if not callable(value)}  # the CLI's func
    return {"command": typed_command(), "machine": machine(), "config": options}


def write_json(path: str | os.PathLike | None, results: dict, quiet: bool = False) -> None:
    """Write ``results`` to ``path`` (parents created) and say so; nothing when ``path`` is None."""
    if path is None:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=2, default=str) + "\n")
    if not quiet:
        print(f"wrote {path}")
