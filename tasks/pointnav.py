"""PointNav: walk to a goal given as a vector in the agent's own frame."""

from __future__ import annotations

import math

import numpy as np
from gymnasium import spaces

from .base import Task, TaskStep

# Bounded like the env's pose entry: the memory cannot address anything farther away.
_FAR = 1e4


def goal_space() -> spaces.Box:
    """(distance, cos, sin) of a goal seen from the agent; see ``goal_vectors``."""
    return spaces.Box(np.array([0.0, -1.0, -1.0], dtype=np.float32), np.array([_FAR, 1.0, 1.0], dtype=np.float32),
                      dtype=np.float32)


def goal_vectors(rigs: np.ndarray, goals: np.ndarray) -> np.ndarray:
    """Goals (n, 2) world (x, z) seen from rigs (n, 6): (n, 3) float32 (distance, cos, sin of the bearing).

    The bearing is the angle from the agent's heading to the goal on the ground
    plane, positive to the right (the sign of a TURN_RIGHT). A goal on top of the
    agent has bearing 0.
    """
    delta = goals - rigs[:, [0, 2]]
    yaw = rigs[:, 3]
    ahead = delta[:, 0] * np.sin(yaw) + delta[:, 1] * np.cos(yaw)
    right = delta[:, 0] * np.cos(yaw) - delta[:, 1] * np.sin(yaw)
    bearing = np.arctan2(right, ahead)
    distance = np.hypot(delta[:, 0], delta[:, 1])
    return np.stack([distance, np.cos(bearing), np.sin(bearing)], -1).astype(np.float32)


def free_depth_by_column(view, agent: int) -> tuple[np.ndarray, np.ndarray]:
    """Bearings (w,) of the latent columns of the last frame and the free z-depth (w,) in each.

    Uses the same middle rows as the batch's collision check (not floor or
    ceiling). Each column takes the minimum of itself and its neighbours, so a
    path to a goal keeps clear of an obstacle seen just beside it. A ray at
    bearing b is free for z-depth / cos(b) metres.
    """
    depth = view.last_depth[agent]
    h, w = depth.shape
    rows = slice(max(0, h // 2 - max(1, h // 8)), min(h, h // 2 + max(1, h // 8)))
    camera = view.latent_camera
    bearings = np.arctan((np.arange(w) + 0.5 - camera.cx) / camera.fx)
    column = depth[rows].min(axis=0).astype(np.float64)
    padded = np.concatenate([column[:1], column, column[-1:]])
    return bearings, np.minimum(np.minimum(padded[:-2], padded[1:-1]), padded[2:])


def sample_goal_in_view(view, agent: int, distances: np.ndarray, bearings: np.ndarray, clearance: float,
                        tries: int = 64) -> np.ndarray:
    """A world (x, z) goal drawn from candidate ``distances`` x ``bearings`` that the first view shows free.

    Goals lie in free space on a straight, unobstructed line from the start (as
    far as the starting view can tell), so the straight-line distance is the
    shortest path. Drawn from ``view.rng(agent)``. When no candidate fits (the
    agent faces a wall) the goal goes along the freest column, as far as it
    allows but at least the smallest candidate distance.
    """
    rng = view.rng(agent)
    column_bearing, free_depth = free_depth_by_column(view, agent)
    half_width = 0.5 * (column_bearing[1] - column_bearing[0]) if len(column_bearing) > 1 else math.pi
    for _ in range(tries):
        distance, bearing = float(rng.choice(distances)), float(rng.choice(bearings))
        column = int(np.argmin(np.abs(column_bearing - bearing)))
        in_view = abs(column_bearing[column] - bearing) <= half_width + 1e-9
        if in_view and distance <= free_depth[column] / math.cos(bearing) - clearance:
            break
    else:
        free = free_depth / np.cos(column_bearing)
        column = int(np.argmax(free))
        bearing = float(column_bearing[column])
        distance = max(float(np.min(distances)), float(min(np.max(distances), free[column] - clearance)))
    rig = view.rigs[agent]
    heading = rig[3] + bearing
    return np.array([rig[0] + distance * math.sin(heading), rig[2] + distance * math.cos(heading)])


class PointNavTask(Task):
    """Walk to a point goal that is given relative to the agent.

    ## Description
    At reset a goal is drawn on the ground plane in front of the agent, in space
    the first generated view shows free (its depth along the goal's bearing
    exceeds the goal distance by ``clearance``), so the straight line to it is
    the shortest path. The agent sees the goal as a vector in its own frame, as
    habitat's ``pointgoal_with_gps_compass``. The episode succeeds as soon as the
    agent is within ``success_distance`` of the goal (no explicit STOP action).

    ## Observation Space (added to the env's)
    | key | shape | dtype | range | meaning |
    |---|---|---|---|---|
    | goal | (3,) | float32 | [0, 1e4] x [-1, 1] x [-1, 1] | distance to the goal (metres, ground plane), cos and sin of its bearing |

    The bearing is measured from the agent's heading, positive to the right: a
    goal straight ahead reads (d, 1, 0), one to the right (d, 0, 1).

    ## Rewards
    Per step: ``distance_reward_scale`` x (distance before - distance after)
    - ``step_penalty``, plus ``success_reward`` on the step that reaches the goal.

    ## Episode End
    - Termination: the agent is within ``success_distance`` of the goal (success).
    - Truncation: the env's ``max_episode_steps``.

    ## Measures (in ``info`` every step; final at the episode's end)
    ``distance_to_goal``, ``success`` (bool), ``spl`` (success weighted by path
    length: success x shortest / max(path, shortest), shortest = straight-line
    start-goal distance), and the env's ``path_length``.

    ## Arguments
    ``min_distance``, ``max_distance``: goal distance range in metres.
    ``max_bearing_degrees``: goals lie within this angle of the starting heading
    (clipped to the camera's field of view, the free-space test needs to see them).
    ``success_distance``, ``clearance`` (metres kept between a goal and the
    nearest surface seen behind it), ``success_reward``, ``step_penalty``,
    ``distance_reward_scale``.

    ## Example
    >>> import gymnasium as gym, mirage_env
    >>> from mirage_env.tasks import PointNavTask
    >>> env = gym.make("Mirage/PointNav-v0", task=PointNavTask(min_distance=0.75, max_distance=1.5))
    >>> observation, info = env.reset(seed=0)
    >>> observation["goal"].shape
    (3,)
    """

    name = "pointnav"
    measures = ("distance_to_goal", "success", "spl")
    state_fields = ("goals", "shortest", "previous_distance")

    def __init__(self, min_distance: float = 1.0, max_distance: float = 3.0, max_bearing_degrees: float = 40.0,
                 success_distance: float = 0.35, clearance: float = 0.5, success_reward: float = 2.5,
                 step_penalty: float = 0.01, distance_reward_scale: float = 1.0):
        if not 0.0 < min_distance <= max_distance:
            raise ValueError(f"need 0 < min_distance <= max_distance, got {min_distance} and {max_distance}")
        if min_distance <= success_distance:
            raise ValueError(f"min_distance ({min_distance}) must exceed success_distance ({success_distance}), "
                             f"or episodes would start already solved")
        if not 0.0 <= max_bearing_degrees < 90.0:
            raise ValueError(f"max_bearing_degrees must be in [0, 90), got {max_bearing_degrees}")
        self.min_distance, self.max_distance = float(min_distance), float(max_distance)
        self.max_bearing = math.radians(max_bearing_degrees)
        self.success_distance, self.clearance = float(success_distance), float(clearance)
        self.success_reward, self.step_penalty = float(success_reward), float(step_penalty)
        self.distance_reward_scale = float(distance_reward_scale)
        self.goals: np.ndarray | None = None
        self.shortest: np.ndarray | None = None
        self.previous_distance: np.ndarray | None = None

    def observation_spaces(self) -> dict:
        return {"goal": goal_space()}

    def _allocate(self, n: int) -> None:
        if self.goals is None or len(self.goals) != n:
            self.goals, self.shortest, self.previous_distance = np.zeros((n, 2)), np.ones(n), np.zeros(n)

    def reset(self, view, agents: np.ndarray) -> None:
        self._allocate(view.num_agents)
        # A continuum of candidates; 64 of each keeps the draw cheap and reproducible.
        distances = np.linspace(self.min_distance, self.max_distance, 64)
        bearings = np.linspace(-self.max_bearing, self.max_bearing, 64)
        for agent in agents:
            self.goals[agent] = sample_goal_in_view(view, agent, distances, bearings, self.clearance)
        distance = goal_vectors(view.rigs[agents], self.goals[agents])[:, 0].astype(np.float64)
        self.shortest[agents] = distance
        self.previous_distance[agents] = distance

    def observe(self, view, agents: np.ndarray) -> dict[str, np.ndarray]:
        return {"goal": goal_vectors(view.rigs[agents], self.goals[agents])}

    def step(self, view, agents: np.ndarray) -> TaskStep:
        distance = np.hypot(*(self.goals[agents] - view.rigs[agents][:, [0, 2]]).T)
        success = distance <= self.success_distance
        reward = (self.distance_reward_scale * (self.previous_distance[agents] - distance) - self.step_penalty
                  + self.success_reward * success)
        self.previous_distance[agents] = distance
        spl = spl_of(success, self.shortest[agents], view.path_length[agents])
        metrics = [{"distance_to_goal": float(d), "success": bool(s), "spl": float(p)}
                   for d, s, p in zip(distance, success, spl)]
        return TaskStep(reward, success, metrics)


def spl_of(success: np.ndarray, shortest: np.ndarray, path_length: np.ndarray) -> np.ndarray:
    """Success weighted by path length (Anderson et al. 2018), per agent."""
    return np.where(success, shortest / np.maximum(np.maximum(path_length, shortest), 1e-9), 0.0)
