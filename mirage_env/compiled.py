"""Whether the compiled CPU kernels run, and the fallback to torch when they cannot.

The default world's hot path (the procedural model's ray cast and shading, the memory's
projection and z-buffer, the depth lift) is a few hundred tiny tensor operations per
step when written in torch, and on a CPU their dispatch, not their arithmetic, is the
cost. The same maths as a handful of numba kernels (``@njit(cache=True)``) runs in
tens of microseconds. We chose numba over ``torch.compile`` after timing both on the
shading kernel (64x64, one thread): eager torch 450 us a call, ``torch.compile`` 120-130
us after a 19 s first compile (3.8 s per input shape and process with a warm cache) and
not bit-exact with eager, numba 55-60 us and bit-exact, compiled once per machine into
``__pycache__`` (a cold process loads it in well under a second), with no C++ toolchain,
and with per-ray loops and early exits that a traced tensor graph cannot express.

The torch code stays the reference: it runs on other devices (``cuda``), it is the
oracle the kernels are tested against, and it runs whenever numba is missing or a
kernel fails to compile (with one warning, never an error). ``MIRAGE_ENV_KERNELS=0``
forces the torch path. It also runs while the kernels are being compiled in the background
(:mod:`mirage_env.kernel_warmup`), so a machine's first steps never wait for numba.

For developers: numba's cache is keyed on each kernel module's own file, so editing a helper that
another kernel module imports (``keys_kernels._home`` in ``index_kernels`` and ``write_kernels``,
``lift_kernels.kth_smallest`` in ``procedural_kernels``) leaves the importers' cached machine code
with the old helper. The compiled-versus-torch tests then fail; delete the ``*.nbi``/``*.nbc``
files under ``mirage_env/**/__pycache__`` after such an edit. An installed release is not affected
(every file of a new version is new).
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings
from types import ModuleType

import torch

from . import kernel_warmup

__all__ = ["KERNELS_ENV", "kernels_enabled", "kernel_module", "disable_kernels", "parallel_kernels"]

#: Environment variable: "0" turns the compiled kernels off (the torch path runs everywhere); "1" turns
#: them on at once (a kernel compiles at its first call, a stall on a machine's first run: for benchmarks
#: and tests that compare the paths); unset, they are warmed up in the background (kernel_warmup).
KERNELS_ENV = "MIRAGE_ENV_KERNELS"

_broken: str | None = None  # why the kernels were given up, once
_numba_checked = False  # numba imported once already


def kernels_enabled(device: torch.device | str) -> bool:
    """True when the compiled kernels should run for tensors on ``device``.

    Called several times a step, so it does little: the variable is read every call (tests and
    benchmarks switch paths by setting it in-process), numba's import is checked once.
    """
    global _numba_checked
    setting = _setting()
    if _broken is not None or setting == "0":
        return False
    # A str is compared as it is: building a torch.device costs a microsecond, several times a step.
    if (device if isinstance(device, str) else device.type) != "cpu" and torch.device(device).type != "cpu":
        return False
    if not _numba_checked:
        try:
            import numba  # noqa: F401
        except ImportError as error:
            disable_kernels(f"numba is not installed ({error}); `pip install numba` for the fast CPU path")
            return False
        _numba_checked = True
    if setting == "1" or kernel_warmup.ready() or kernel_warmup.warming_here():
        return True  # "1" asked for the kernels now: they compile at their first call, as numba does
    kernel_warmup.start()  # the torch path (the same bits) until the kernels are compiled in the background
    return False


# CPython's dict behind os.environ, keyed and valued in bytes on POSIX: read without encoding the key and
# decoding the value (os.environ.get: 0.3-0.7 us, called several times a step). Both stay in step with
# os.environ (setenv, monkeypatch); elsewhere os.environ.get.
_ENVIRON = getattr(os.environ, "_data", None)
_KEY = os.environ.encodekey(KERNELS_ENV) if hasattr(os.environ, "encodekey") else None
_VALUES = {b"0": "0", b"1": "1"}


def _setting() -> str | None:
    if _ENVIRON is None or not isinstance(_KEY, bytes):
        return os.environ.get(KERNELS_ENV)
    value = _ENVIRON.get(_KEY)
    return None if value is None else _VALUES.get(value, "other")


# Torch thread count that numba's was last matched to, per Python thread (numba's count is thread-local).
_matched_threads: dict[int, int] = {}


def parallel_kernels() -> bool:
    """True when the kernels should run their parallel form: torch is given more than one thread.

    numba's own pool defaults to every core, so a process told ``torch.set_num_threads(2)`` on a
    16-core machine would still run the kernels on 16 threads; its count is matched to torch's here
    (capped at ``NUMBA_NUM_THREADS``), so one setting bounds every thread a step uses.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        return False
    thread = threading.get_ident()
    if _matched_threads.get(thread) != threads:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
        _matched_threads[thread] = threads
    return True


_modules: dict[str, ModuleType] = {}  # kernel modules imported so far, by name


def kernel_module(name: str) -> ModuleType | None:
    """The kernel module ``name`` (absolute: ``"mirage_env.memory.lift_kernels"``), imported once; None, with
    the kernels given up (one warning), where it cannot be imported (numba missing or broken). Hot paths ask
    for their modules every step: after the first import this is one dict lookup, not an import statement."""
    module = _modules.get(name)
    if module is None:
        try:
            module = importlib.import_module(name)
        except Exception as error:
            disable_kernels(f"{type(error).__name__}: {error}")
            return None
        _modules[name] = module
    return module


def disable_kernels(reason: str) -> None:
    """Give up on the kernels for this process (a compile or import failure), warning once."""
    global _broken
    if _broken is None:
        _broken = reason
        warnings.warn(f"mirage-env: compiled CPU kernels disabled, using the torch path: {reason}",
                      RuntimeWarning, stacklevel=3)
