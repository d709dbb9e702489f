"""Scripted policies: fixed behaviours for rollouts, evaluation and baselines.

A policy is called as ``policy(observation, info) -> action`` and restarted with
``policy.reset(seed)``. Discrete actions are mirage_env.geometry.Move values.
"""

from __future__ import annotations

import itertools
import math

import numpy as np

from mirage_env.geometry import Move


class RandomPolicy:
    """Uniform over moves, with forward twice as likely so it actually travels."""

    name = "random"
    _choices = np.array([Move.FORWARD, Move.FORWARD, Move.TURN_LEFT, Move.TURN_RIGHT, Move.STRAFE_LEFT,
                         Move.STRAFE_RIGHT, Move.BACKWARD, Move.LOOK_UP, Move.LOOK_DOWN])

    def __init__(self, seed: int | None = None):
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)

    def __call__(self, observation=None, info=None) -> int:
        # rng.choice's draw (the same stream), without its Python-level checks: 5 us a call less
        return int(self._choices[self.rng.integers(0, len(self._choices))])


class ActionSequencePolicy:
    """Plays a fixed sequence of moves, cycling when it runs out."""

    name = "sequence"

    def __init__(self, moves):
        self.moves = [int(m) for m in moves]
        if not self.moves:
            raise ValueError("an action sequence needs at least one move")
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        self._iterator = itertools.cycle(self.moves)

    def __call__(self, observation=None, info=None) -> int:
        return next(self._iterator)


def closed_loop_moves(side_steps: int = 4, turn_degrees: float = 15.0, sides: int = 4) -> list[int]:
    """Out, around a square and back: ends exactly at the starting pose (if nothing blocks).

    Turns are to the left so the path stays in front of where the camera started.
    """
    turns_per_corner = round((360.0 / sides) / turn_degrees)
    if abs(turns_per_corner * turn_degrees - 360.0 / sides) > 1e-6:
        raise ValueError(f"turn_degrees={turn_degrees} does not divide a {360 / sides:g} degree corner")
    side = [Move.FORWARD] * side_steps + [Move.TURN_LEFT] * turns_per_corner
    return [int(m) for m in side * sides]


class LoopPolicy(ActionSequencePolicy):
    """Walks a closed square loop again and again."""

    name = "loop"

    def __init__(self, side_steps: int = 4, turn_degrees: float = 15.0):
        super().__init__(closed_loop_moves(side_steps, turn_degrees))


class OrbitPolicy(ActionSequencePolicy):
    """Circles around a point in front of the camera: strafe right, then turn left to face it."""

    name = "orbit"

    def __init__(self):
        super().__init__([Move.STRAFE_RIGHT, Move.TURN_LEFT])


class LawnmowerPolicy(ActionSequencePolicy):
    """Boustrophedon coverage: long legs joined by U-turns."""

    name = "lawnmower"

    def __init__(self, leg_steps: int = 8, turn_degrees: float = 15.0):
        half = round(180.0 / turn_degrees)
        moves = ([Move.FORWARD] * leg_steps + [Move.TURN_RIGHT] * (half // 2) + [Move.FORWARD] * 2
                 + [Move.TURN_RIGHT] * (half - half // 2) + [Move.FORWARD] * leg_steps
                 + [Move.TURN_LEFT] * (half // 2) + [Move.FORWARD] * 2 + [Move.TURN_LEFT] * (half - half // 2))
        super().__init__(moves)


class WaypointPolicy:
    """Drives to the task's goal: turn towards it, walk, and at home turn back to the starting heading.

    Reads the ``goal`` observation of PointNav / ReturnHome (distance, cos and sin
    of the bearing, positive to the right) and ReturnHome's ``home_heading``.
    Turns while the goal is more than half a turn off the heading, so goals on
    the move lattice are faced exactly. When a forward move was refused
    (``info["collided"]``) it sidesteps: turns away a few times and walks on.
    With no ``goal`` in the observation (explore) it behaves as ``RandomPolicy``.

    Args:
        turn_degrees: the env's ``motion.turn_degrees``.
        arrive_distance: closer than this the goal counts as reached; stop walking
            (half a 0.25 m step by default: nearer than any step could bring it).
    """

    name = "waypoint"

    def __init__(self, turn_degrees: float = 15.0, arrive_distance: float = 0.125, seed: int | None = None):
        self.half_turn = math.radians(turn_degrees) / 2 + 1e-6
        self.arrive_distance = float(arrive_distance)
        self.reset(seed)

    def reset(self, seed: int | None = None) -> None:
        self.rng = np.random.default_rng(seed)
        self.random = RandomPolicy(seed)
        self._escape: list[int] = []

    def __call__(self, observation=None, info=None) -> int:
        goal = observation.get("goal") if isinstance(observation, dict) else None
        if goal is None:
            return self.random(observation, info)
        if info and info.get("collided") and not self._escape:
            side = Move.TURN_LEFT if self.rng.random() < 0.5 else Move.TURN_RIGHT
            self._escape = [side] * 3 + [Move.FORWARD] * 2
        if self._escape:
            return int(self._escape.pop(0))
        distance, cos, sin = (float(v) for v in np.asarray(goal)[:3])
        if distance <= self.arrive_distance:
            heading = observation.get("home_heading")
            return self._turn_towards(math.atan2(heading[1], heading[0])) if heading is not None else int(Move.STAY)
        return self._turn_towards(math.atan2(sin, cos), otherwise=Move.FORWARD)

    def _turn_towards(self, angle: float, otherwise: Move = Move.STAY) -> int:
        if abs(angle) <= self.half_turn:
            return int(otherwise)
        return int(Move.TURN_RIGHT if angle > 0 else Move.TURN_LEFT)


POLICIES = {p.name: p for p in (RandomPolicy, LoopPolicy, OrbitPolicy, LawnmowerPolicy, WaypointPolicy)}


def make_policy(name: str, seed: int | None = None):
    """A scripted policy by name (see POLICIES)."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}; available: {sorted(POLICIES)} or a path to a trained model .zip")
    policy = POLICIES[name]()
    policy.reset(seed)
    return policy
