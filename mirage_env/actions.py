"""The one action check, shared by every env and by the camera-motion functions.

Actions arrive as a scalar (``MirageEnv``), an array with one row per
sub-environment (``MirageVectorEnv``) or a dict of per-agent values
(``MirageParallelEnv``); each env lists them in agent order and calls
:func:`check_actions`, which returns the array ``AgentBatch.step`` moves the
cameras with, or raises a ValueError that names the offending agent and the
valid range. Nothing is reshaped or clipped to make a wrong action fit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .geometry import Move

__all__ = ["check_actions", "VELOCITY_SIZE"]

VELOCITY_SIZE = 6
# Velocities a hair outside [-1, 1] are float32 rounding of a clipped policy output, not mistakes.
_VELOCITY_SLACK = 1e-6
_MOVES = len(Move)


def _moves_text() -> str:
    return ", ".join(f"{m.value}={m.name}" for m in Move)


def check_actions(actions: Sequence, action_type: str, count: int, labels: Sequence[str] | str = "agent") -> np.ndarray:
    """Validated actions of N agents.

    Args:
        actions: one action per agent, in agent order: a sequence or an array whose
            first axis is the agent. A discrete action is an integer (or a whole float)
            in ``[0, 9)``; a continuous one is 6 finite numbers in ``[-1, 1]``.
        action_type: "discrete" or "continuous".
        count: how many agents must get an action.
        labels: the agents' names for error messages, or one word for what they are
            ("sub-environment": errors then say "sub-environment(s) [1, 4]").

    Returns:
        int64 (N,) moves, or float64 (N, 6) velocities.
    """
    if action_type == "discrete" and type(actions) is list and len(actions) == count \
            and all(type(move) is int and 0 <= move < _MOVES for move in actions):
        return np.array(actions, dtype=np.int64)  # plain ints in range (an env's own list): nothing to report
    try:
        array = np.asarray(actions)
    except ValueError as error:  # ragged nested sequences
        raise ValueError(f"actions must be one {_expected(action_type)} per agent: {error}") from None
    n = int(count)
    if isinstance(labels, str):
        kind = labels
        who = lambda bad: f"{kind}(s) {np.flatnonzero(bad).tolist()}"  # noqa: E731
    else:
        names = list(labels)
        if len(names) != n:
            raise ValueError(f"{len(names)} labels for {n} agents")
        who = lambda bad: ", ".join(names[i] for i in np.flatnonzero(bad))  # noqa: E731
    if action_type == "discrete":
        return _check_moves(array, n, who)
    if action_type == "continuous":
        return _check_velocities(array, n, who)
    raise ValueError(f"action_type must be 'discrete' or 'continuous', got {action_type!r}")


def _expected(action_type: str) -> str:
    return f"Discrete({len(Move)}) move" if action_type == "discrete" else f"Box(-1, 1, ({VELOCITY_SIZE},)) velocity"


def _check_moves(array: np.ndarray, n: int, who) -> np.ndarray:
    space = lambda: f"outside the action space Discrete({len(Move)}): {_moves_text()}"  # noqa: E731 (errors only)
    if array.shape != (n,):
        raise ValueError(f"actions must have shape ({n},), one Discrete({len(Move)}) move per agent, got shape {array.shape}")
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array) | (array != np.round(array))
        if bad.any():
            raise ValueError(f"{who(bad)} got action(s) {array[bad].tolist()}, {space()} (moves are whole numbers)")
        array = array.astype(np.int64)
    elif array.dtype.kind not in "iu":
        raise ValueError(f"got action(s) {array.tolist()!r} (dtype {array.dtype}), {space()} (moves are integers)")
    bad = (array < 0) | (array >= len(Move))
    if bad.any():
        raise ValueError(f"{who(bad)} got action(s) {array[bad].tolist()}, {space()}")
    return array.astype(np.int64)


def _check_velocities(array: np.ndarray, n: int, who) -> np.ndarray:
    if array.shape != (n, VELOCITY_SIZE):
        raise ValueError(f"actions must have shape ({n}, {VELOCITY_SIZE}), one velocity (forward, right, up, yaw, "
                         f"pitch, roll rates) per agent, got shape {array.shape}")
    if array.dtype.kind not in "iuf":
        raise ValueError(f"continuous actions must be numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    bad = ~np.isfinite(array).all(axis=1)
    if bad.any():
        raise ValueError(f"{who(bad)} got NaN or inf action(s) {array[bad].tolist()}; expected values in [-1, 1]")
    bad = (np.abs(array) > 1.0 + _VELOCITY_SLACK).any(axis=1)
    if bad.any():
        raise ValueError(f"{who(bad)} got action(s) {array[bad].tolist()} outside Box(-1, 1, ({VELOCITY_SIZE},))")
    return array
