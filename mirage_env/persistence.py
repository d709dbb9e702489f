"""What the three envs share to save, resume, snapshot and fork a world, one thread at a time.

``Persistent`` gives ``MirageEnv``, ``MirageVectorEnv`` and ``MirageParallelEnv`` the same
``save_world`` / ``load_world`` / ``snapshot`` / ``restore`` / ``fork``; each env says only
what of its own state goes with the world (``_env_state``) and how it takes it back
(``_restore``). ``ExclusiveUse`` is the guard that refuses a second thread.
"""

from __future__ import annotations

import copy
import functools
import os
import threading

import numpy as np

from .batch import AgentBatch, Snapshot, generator_from_state
from .memory import load_state, save_state
from .memory.fileformat import StateCheck

__all__ = ["ExclusiveUse", "exclusive", "Persistent", "checked_env_fields", "optional_generator", "fork_env",
           "snapshot_check", "save_snapshot", "read_snapshot"]


class ExclusiveUse:
    """One thread at a time in an env's stateful calls (step, reset, save, load, snapshot, restore, fork).

    An env is not thread-safe: two threads stepping one env would interleave memory
    writes and counters silently. So a second thread entering while another is inside
    gets a RuntimeError at once (it never waits: waiting would hide the bug). The thread
    inside may re-enter (a call that makes another). Copies (``fork``) get a guard of their own.
    """

    def __init__(self, owner: str):
        self.owner = owner
        self._lock = threading.RLock()

    def __enter__(self) -> ExclusiveUse:
        if not self._lock.acquire(blocking=False):
            raise RuntimeError(
                f"this {self.owner} is in use by another thread: an env is stepped, reset, saved, loaded and "
                f"snapshotted by one thread at a time; give each thread its own env (env.fork()) or serialise the "
                f"calls with a lock of your own"
            )
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def __deepcopy__(self, memo: dict) -> ExclusiveUse:
        return ExclusiveUse(self.owner)

    def __reduce__(self):
        return ExclusiveUse, (self.owner,)


def exclusive(method):
    """Run an env method under the env's :class:`ExclusiveUse` guard (``self._exclusive``)."""

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        with self._exclusive:
            return method(self, *args, **kwargs)

    return guarded


def snapshot_check() -> StateCheck:
    return StateCheck("snapshot", fix="restore a snapshot taken by snapshot() of an env made alike, unchanged")


def save_snapshot(path: str | os.PathLike, snapshot: Snapshot) -> None:
    """Write ``snapshot`` as a world file (atomically; see :func:`mirage_env.memory.save_state`)."""
    save_state(path, kind="world", config=snapshot.config, tensors=snapshot.tensors, extra={"extra": snapshot.extra})


def read_snapshot(path: str | os.PathLike) -> tuple[Snapshot, StateCheck]:
    """A world file as a Snapshot (its format, version and checksum verified) and the check that names it."""
    meta, tensors = load_state(path, kind="world")
    return Snapshot(config=meta.get("config"), extra=meta.get("extra", {}), tensors=tensors,
                    version=meta["version"]), StateCheck(path)


def checked_env_fields(snapshot: Snapshot, env_name: str, fields: tuple[str, ...], check: StateCheck) -> dict:
    """``snapshot.extra``, checked to be a ``env_name``'s: its own ``fields`` present, nothing unknown."""
    extra = check.mapping(snapshot.extra, "extra")
    saved_by = extra.get("env", env_name)  # files from before "env" was saved come from MirageEnv
    if saved_by != env_name:
        check.fail("extra.env", f"is {saved_by!r}: the state is a {saved_by}'s, not a {env_name}'s",
                   f"load it into a {saved_by} made alike")
    unknown = sorted(set(extra) - {"env", *fields, *AgentBatch.STATE_KEYS})
    if unknown:
        check.fail(f"extra.{unknown[0]}", f"is not state of a {env_name}")
    missing = sorted(set(fields) - set(extra))
    if missing:
        check.fail(f"extra.{missing[0]}", "is missing")
    return extra


def optional_generator(state, field: str, check: StateCheck) -> np.random.Generator | None:
    return None if state is None else generator_from_state(state, field, check)


def fork_env(env):
    """A deep copy of ``env`` that shares its world model's weights but holds its own per-world model state.

    The model is copied shallowly and given a copy of its ``state_dict()`` (what a world file
    holds of it), so the two envs step independently; everything else is deep-copied.
    """
    model = env.world.model
    twin = copy.copy(model)
    twin.load_state_dict({name: value.clone() for name, value in model.state_dict().items()})
    return copy.deepcopy(env, {id(model): twin})


class Persistent:
    """World files, in-memory snapshots and forks for an env with ``batch``, ``_exclusive``,
    ``_env_state()`` and ``_restore(snapshot, check)``."""

    @exclusive
    def save_world(self, path: str | os.PathLike) -> None:
        """Save the world(s) and the episode(s) (memory, RNGs, cameras, task) to one safetensors file.

        Atomic: a temporary file of this writer's own is fsynced and renamed over ``path``, so
        a reader sees the old file or the new one and concurrent savers leave one whole save.
        """
        save_snapshot(path, self.batch.snapshot(self._env_state(), copy=False))

    @exclusive
    def load_world(self, path: str | os.PathLike) -> None:
        """Resume what ``save_world`` of an env made alike saved; episodes continue bit-for-bit.

        Every field of the file is validated before anything changes: a file that fails
        (a :class:`~mirage_env.memory.MemoryFileError` naming the field) leaves the env as it was.
        """
        self._restore(*read_snapshot(path))

    @exclusive
    def snapshot(self) -> Snapshot:
        """The env's whole state in memory, as ``save_world`` would write it: memory, RNGs, cameras,
        task, the generator's tail and per-world state. For planning: snapshot, try actions, restore."""
        return self.batch.snapshot(self._env_state())

    @exclusive
    def restore(self, snapshot: Snapshot) -> None:
        """Go back to ``snapshot`` (of this env, or of one made alike): the same actions then give the
        same observations, bit for bit. Checked as a file is; a refused snapshot changes nothing."""
        self._restore(snapshot, snapshot_check())

    @exclusive
    def fork(self):
        """An independent copy of this env mid-episode that diverges without touching this one.

        It shares the world model's weights (read-only), not its per-world state.
        """
        return fork_env(self)
