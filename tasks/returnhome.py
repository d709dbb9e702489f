"""ReturnHome: go out to a waypoint, come back, and find home looking as it did."""

from __future__ import annotations

import math

import numpy as np
from gymnasium import spaces

from mirage_env.metrics import psnr

from .base import Task, TaskStep
from .pointnav import goal_space, goal_vectors, sample_goal_in_view, spl_of

OUTBOUND, HOMEBOUND = 0, 1
# Identical frames have infinite PSNR; cap it so measures stay finite (as `mirage-env eval consistency`).
PSNR_CAP = 100.0


def _wrap(angle: np.ndarray) -> np.ndarray:
    return np.arctan2(np.sin(angle), np.cos(angle))


class ReturnHomeTask(Task):
    """Out to a waypoint and back to the starting pose, where the view must match the first one.

    ## Description
    The closed-loop test of the published system made into a task: a world model
    with a working spatial memory shows home as it was when the agent comes
    back; without memory it shows a newly generated place. Outbound, the goal is
    a waypoint in front of the agent; once within ``waypoint_distance`` of it the
    goal becomes the start. The agent is home when within ``home_distance`` of
    the start and turned back to the starting heading (within
    ``heading_tolerance_degrees``); it succeeds when, home, the PSNR between the
    current frame and the first frame of the episode is at least
    ``revisit_psnr_threshold``.

    The default threshold, 21 dB, separates exact returns with memory from those
    without on the default procedural world; ``python
    benchmarks/returnhome_threshold.py`` measures it (40 held-out episodes of the
    waypoint policy, which returns to the exact start pose: memory on, median
    30.0 dB, min 22.3, 100% pass; memory off, median 18.6 dB, max 22.3, 25% pass;
    ``benchmarks/results/returnhome_threshold.json``). Even a perfect return stays
    below identical frames: the moving crate moved.

    Waypoints lie on the lattice the discrete moves reach (a whole number of
    ``step_metres`` along a whole number of ``turn_degrees``), in space the first
    view shows free, so the start pose can be re-reached exactly.

    ## Observation Space (added to the env's)
    | key | shape | dtype | range | meaning |
    |---|---|---|---|---|
    | goal | (3,) | float32 | [0, 1e4] x [-1, 1] x [-1, 1] | distance, cos and sin of the bearing of the current goal (as PointNav) |
    | home_heading | (2,) | float32 | [-1, 1] | cos and sin of the turn from the current heading to the starting one (positive = right) |
    | phase | () | int64 | {0, 1} | 0 outbound (goal = waypoint), 1 homebound (goal = start) |

    ## Rewards
    Per step: ``distance_reward_scale`` x (distance to the current goal before -
    after) - ``step_penalty``; ``waypoint_reward`` on reaching the waypoint;
    ``success_reward`` on success. The goal switch itself gives nothing: the
    distance reference restarts from the distance to home.

    ## Episode End
    - Termination: success (home, facing the starting way, view matches).
    - Truncation: the env's ``max_episode_steps`` (also when the agent is home
      but the view does not match: it may still move and try again).

    ## Measures (in ``info``)
    Every step: ``phase``, ``distance_to_goal``, ``success``, ``spl`` (shortest =
    twice the start-waypoint distance). ``revisit_psnr`` (dB, capped at 100)
    whenever the agent is home and at the episode's end; the env adds ``path_length``.

    ## Arguments
    ``min_steps``, ``max_steps``: waypoint distance in forward steps;
    ``max_bearing_degrees``; ``waypoint_distance``, ``home_distance``,
    ``heading_tolerance_degrees``, ``revisit_psnr_threshold``, ``clearance``,
    ``waypoint_reward``, ``success_reward``, ``step_penalty``, ``distance_reward_scale``.

    ## Example
    >>> import gymnasium as gym, mirage_env
    >>> env = gym.make("Mirage/ReturnHome-v0", max_episode_steps=100)
    >>> observation, info = env.reset(seed=0)
    >>> int(observation["phase"])
    0
    """

    name = "returnhome"
    # revisit_psnr only on the steps where it is measured (home reached, or the last step).
    measures = ("phase", "distance_to_goal", "success", "spl", "revisit_psnr")
    state_fields = ("waypoints", "homes", "home_yaw", "phase", "shortest", "previous_distance")

    def __init__(self, min_steps: int = 2, max_steps: int = 6, max_bearing_degrees: float = 30.0,
                 waypoint_distance: float = 0.3, home_distance: float = 0.1, heading_tolerance_degrees: float = 5.0,
                 revisit_psnr_threshold: float = 21.0, clearance: float = 0.5, waypoint_reward: float = 1.0,
                 success_reward: float = 2.5, step_penalty: float = 0.01, distance_reward_scale: float = 1.0):
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps} and {max_steps}")
        if not 0.0 <= max_bearing_degrees < 90.0:
            raise ValueError(f"max_bearing_degrees must be in [0, 90), got {max_bearing_degrees}")
        self.min_steps, self.max_steps = int(min_steps), int(max_steps)
        self.max_bearing = math.radians(max_bearing_degrees)
        self.waypoint_distance, self.home_distance = float(waypoint_distance), float(home_distance)
        self.heading_tolerance = math.radians(heading_tolerance_degrees)
        self.revisit_psnr_threshold = float(revisit_psnr_threshold)
        self.clearance = float(clearance)
        self.waypoint_reward, self.success_reward = float(waypoint_reward), float(success_reward)
        self.step_penalty, self.distance_reward_scale = float(step_penalty), float(distance_reward_scale)
        self.waypoints = self.homes = self.home_yaw = self.phase = None
        self.shortest = self.previous_distance = None

    def observation_spaces(self) -> dict:
        return {
            "goal": goal_space(),
            "home_heading": spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32),
            "phase": spaces.Discrete(2),
        }

    def _allocate(self, n: int) -> None:
        if self.waypoints is None or len(self.waypoints) != n:
            self.waypoints, self.homes = np.zeros((n, 2)), np.zeros((n, 2))
            self.home_yaw, self.shortest, self.previous_distance = np.zeros(n), np.ones(n), np.zeros(n)
            self.phase = np.zeros(n, dtype=np.int64)

    def reset(self, view, agents: np.ndarray) -> None:
        self._allocate(view.num_agents)
        motion = view.motion
        distances = motion.step_metres * np.arange(self.min_steps, self.max_steps + 1)
        turn = math.radians(motion.turn_degrees)
        turns = int(self.max_bearing // turn) if turn > 0 else 0
        bearings = turn * np.arange(-turns, turns + 1)
        for agent in agents:
            self.waypoints[agent] = sample_goal_in_view(view, agent, distances, bearings, self.clearance)
        self.homes[agents] = view.rigs[agents][:, [0, 2]]
        self.home_yaw[agents] = view.rigs[agents, 3]
        self.phase[agents] = OUTBOUND
        distance = np.hypot(*(self.waypoints[agents] - self.homes[agents]).T)
        self.shortest[agents] = 2.0 * distance
        self.previous_distance[agents] = distance

    def _goals(self, agents: np.ndarray) -> np.ndarray:
        return np.where((self.phase[agents] == HOMEBOUND)[:, None], self.homes[agents], self.waypoints[agents])

    def observe(self, view, agents: np.ndarray) -> dict[str, np.ndarray]:
        turn = _wrap(self.home_yaw[agents] - view.rigs[agents, 3])
        return {
            "goal": goal_vectors(view.rigs[agents], self._goals(agents)),
            "home_heading": np.stack([np.cos(turn), np.sin(turn)], -1).astype(np.float32),
            "phase": self.phase[agents].copy(),
        }

    def step(self, view, agents: np.ndarray) -> TaskStep:
        position = view.rigs[agents][:, [0, 2]]
        distance = np.hypot(*(self._goals(agents) - position).T)
        reward = self.distance_reward_scale * (self.previous_distance[agents] - distance) - self.step_penalty

        reached = (self.phase[agents] == OUTBOUND) & (distance <= self.waypoint_distance)
        reward += self.waypoint_reward * reached
        self.phase[agents[reached]] = HOMEBOUND
        distance = np.where(reached, np.hypot(*(self.homes[agents] - position).T), distance)
        self.previous_distance[agents] = distance

        turn = np.abs(_wrap(self.home_yaw[agents] - view.rigs[agents, 3]))
        home = (self.phase[agents] == HOMEBOUND) & (distance <= self.home_distance) & (turn <= self.heading_tolerance)
        # Without a limit of its own (a TimeLimit wrapper ends the episode) the last step is unknown.
        limit = view.max_episode_steps
        ending = view.steps[agents] >= limit if limit is not None else np.zeros(len(agents), bool)
        revisit = np.full(len(agents), math.nan)
        for i in np.flatnonzero(home | ending):
            agent = agents[i]
            revisit[i] = min(psnr(view.last_frames[agent], view.first_frames[agent]), PSNR_CAP)
        success = home & (revisit >= self.revisit_psnr_threshold)
        reward += self.success_reward * success
        spl = spl_of(success, self.shortest[agents], view.path_length[agents])
        metrics = []
        for i in range(len(agents)):
            measures = {"phase": int(self.phase[agents[i]]), "distance_to_goal": float(distance[i]),
                        "success": bool(success[i]), "spl": float(spl[i])}
            if not math.isnan(revisit[i]):
                measures["revisit_psnr"] = float(revisit[i])
            metrics.append(measures)
        return TaskStep(reward, success, metrics)
