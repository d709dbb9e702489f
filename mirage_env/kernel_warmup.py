"""The compiled kernels are made ready in the background, so no step waits for numba.

numba compiles a kernel the first time it is called and caches the machine code
(``cache=True``): later processes on the machine load every kernel in well under a
second, but the machine's very first process spends 20-50 s of CPU compiling, and before
this module that time fell on the first reset and step. Now the first call that would use
a kernel starts one daemon thread that compiles (or loads) them by stepping a tiny private
world through every kernel the default env calls. Until it is done, :func:`ready` is
False and steps take the torch path; as the two paths give the same bits
(``tests/test_compiled.py``), when the switch happens changes the speed, never a frame.

``wait()`` blocks until the kernels are ready (benchmarks and tests that must time the
compiled path call it); ``MIRAGE_ENV_KERNELS=1`` skips the warm-up (each kernel compiles
at its first call, as before) and ``0`` turns the kernels off. A fork waits for a warm-up
in flight first: the child would otherwise inherit numba's compiler lock held by a thread
it does not have.
"""

from __future__ import annotations

import os
import threading

__all__ = ["ready", "start", "wait", "warming_here"]

_lock = threading.Lock()
_done = threading.Event()
_thread: threading.Thread | None = None
_local = threading.local()  # .active: this thread is the warm-up, which always takes the compiled path


def ready() -> bool:
    """True once every kernel the default env uses is compiled or loaded in this process."""
    return _done.is_set()


def warming_here() -> bool:
    """True in the warm-up thread itself (it runs the kernels before they are ready, to make them so)."""
    return getattr(_local, "active", False)


def start() -> None:
    """Start the warm-up thread, once per process (later calls return at once)."""
    global _thread
    if _done.is_set() or _thread is not None:
        return
    with _lock:
        if _thread is None and not _done.is_set():
            _thread = threading.Thread(target=_run, name="mirage-env-kernel-warmup", daemon=True)
            _thread.start()


def wait(timeout: float | None = None) -> bool:
    """Block until the kernels are ready (starting the warm-up if needed). True when the compiled path
    now runs; False if ``timeout`` passed first or the kernels are off or unavailable (the torch path
    runs then: see :mod:`mirage_env.compiled`)."""
    from .compiled import kernels_enabled

    if not kernels_enabled("cpu") and _thread is None:  # off or unavailable: nothing to wait for
        return False
    start()
    return _done.wait(timeout) and kernels_enabled("cpu")


def _run() -> None:
    _local.active = True
    try:
        _exercise()
    except Exception as error:  # a kernel that cannot compile: the torch path for good, one warning
        from .compiled import disable_kernels

        disable_kernels(f"warming up the kernels failed: {type(error).__name__}: {error}")
    finally:
        _local.active = False
        _done.set()


def _exercise() -> None:
    """Step tiny private worlds through every kernel a default env calls: the procedural model's cast,
    shade and codec, the memory's lift, write, read and keys, the filters, the collision check and the
    camera motion (continuous moves too); one world for the serial kernels and, when torch runs on
    several threads, two for the parallel ones."""
    import numpy as np

    from .compiled import parallel_kernels
    from .env import MirageEnv
    from .geometry import Move, apply_velocities
    from .vector import MirageVectorEnv

    # The envs draw from their own generators only: the user's global RNG streams do not move.
    moves = [int(m) for m in (Move.FORWARD, Move.TURN_LEFT, Move.FORWARD, Move.TURN_RIGHT, Move.BACKWARD)]
    env = MirageEnv(image_size=32, max_episode_steps=None)
    env.reset(seed=0)
    for move in moves:
        env.step(move)
    env.close()
    # Continuous actions move cameras by their own compiled function (mirage_env.rig_motion).
    apply_velocities(np.zeros((1, 6)), np.zeros((1, 6)))
    if parallel_kernels():  # the envs' own rule for the parallel variants
        vector = MirageVectorEnv(2, image_size=32, max_episode_steps=None)
        vector.reset(seed=0)
        for move in moves:
            vector.step([move, move])
        vector.close()


def _before_fork() -> None:
    thread = _thread
    if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
        _done.wait()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork)
