"""Torch CPU threads in env worker processes: no fork deadlock, no oversubscription.

Two problems, one module:

- **Fork.** Torch's CPU backend here is OpenMP (GNU libgomp). Once a process has
  run a parallel torch op, its OpenMP thread pool exists; ``fork`` copies the
  process but not those threads, and the child's first parallel op waits forever
  for them (``gym.make_vec(..., vectorization_mode="async")`` under the default
  fork context hung this way). PyTorch's multiprocessing notes say to use spawn
  or forkserver, or to keep the child single-threaded; we do the latter for every
  forked child, in an ``os.register_at_fork`` hook: with one thread a parallel op
  runs inline and never touches the dead pool.
- **Oversubscription.** Every torch process defaults to one thread per core; N env
  workers on N cores then run N*N threads and crawl (one env at 8 steps/s instead
  of ~280 measured on 2 cores). PyTorch's advice is ``floor(cores / processes)``
  threads each; an env worker uses :data:`WORKER_THREADS_ENV` threads (default 1).

A process that sets ``OMP_NUM_THREADS`` itself keeps its choice for spawned workers
(a forked child is always single-threaded: more threads there would hang).
"""

from __future__ import annotations

import multiprocessing
import os
import sys

__all__ = ["WORKER_THREADS_ENV", "worker_threads", "limit_worker_threads", "install_fork_handler"]

#: Environment variable: torch threads per env worker process (default 1).
WORKER_THREADS_ENV = "MIRAGE_ENV_WORKER_THREADS"

_installed = False


def worker_threads() -> int:
    """Torch threads an env worker process should use: ``$MIRAGE_ENV_WORKER_THREADS``, else 1."""
    value = os.environ.get(WORKER_THREADS_ENV, "1")
    try:
        threads = int(value)
    except ValueError:
        threads = 0
    if threads < 1:
        raise ValueError(f"{WORKER_THREADS_ENV}={value!r}: must be a positive integer (torch threads per env worker)")
    return threads


def _in_worker_process() -> bool:
    return multiprocessing.parent_process() is not None


def limit_worker_threads() -> None:
    """In a multiprocessing child (an env worker of an async vector env, SuperSuit, ...), set torch to
    :func:`worker_threads` threads, unless ``OMP_NUM_THREADS`` was set by the user. The main process
    is left alone. Called whenever an env is built."""
    if not _in_worker_process() or "OMP_NUM_THREADS" in os.environ:
        return
    import torch

    threads = worker_threads()
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _after_fork_in_child() -> None:
    torch = sys.modules.get("torch")
    if torch is not None:  # torch not yet imported: no pool to inherit, nothing to do
        torch.set_num_threads(1)


def install_fork_handler() -> None:
    """Make every forked child of this process single-threaded in torch (idempotent).
    Installed when ``mirage_env`` is imported."""
    global _installed
    if not _installed and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _installed = True
