"""Explore: reward for newly seen space."""

from __future__ import annotations

import numpy as np

from .base import Task, TaskStep


class ExploreTask(Task):
    """Reward = new memory entries this step, as a fraction of one latent frame.

    The memory stores one entry per voxel of seen surface (after sky, far and
    moving content are filtered), so its growth is the surface newly seen. Agents
    sharing one world share its memory: the reward is the world's joint gain,
    split evenly between them (cooperative coverage).

    Episode measure ``coverage``: memory entries of the agent's world at the end.
    """

    name = "explore"
    measures = ("coverage", "new_entries")

    def __init__(self, reward_scale: float = 1.0):
        self.reward_scale = float(reward_scale)

    def step(self, view, agents: np.ndarray) -> TaskStep:
        world = view.agent_world[agents]
        gained = view.last_new_entries[world]
        reward = self.reward_scale * gained.astype(np.float64) / (view.latent_pixels_per_frame * view.agents_per_world)
        entries = view.memory_entries_per_world()[world]
        # tolist: Python ints in one call, not two numpy scalar conversions per agent
        metrics = [{"coverage": e, "new_entries": g} for e, g in zip(entries.tolist(), gained.tolist())]
        return TaskStep(reward, np.zeros(len(agents), dtype=bool), metrics)
