"""Coverage: a team explores one world together and shares the reward for what it has seen."""

from __future__ import annotations

import numpy as np

from .base import Task, TaskStep


class CoverageTask(Task):
    """Cooperative exploration: every agent earns its team's joint coverage gain.

    ## Description
    The memory of a world holds one entry per voxel of surface seen by any of its
    agents (after sky, far and moving content are filtered), so its growth is
    what the team as a whole saw for the first time. Every agent of the world is
    paid that joint gain: there is nothing to win by seeing what a teammate has
    already seen, so agents do best by splitting up. ``explore`` differs in
    splitting the gain evenly between the agents instead.

    Made for ``mirage_env.multi_agent.MirageParallelEnv`` (several cameras, one
    world); with one agent per world it is ``explore`` with an optional goal.

    ## Rewards
    Per step, the same for every agent of a world: ``reward_scale`` x (new memory
    entries of the world this step) / (latent pixels of one frame) -
    ``step_penalty``.

    ## Episode End
    - Termination: when ``target_entries`` is set, every agent of a world once its
      memory holds that many entries (the team covered the target; ``success``).
    - Truncation: the env's ``max_episode_steps``.

    ## Measures (in ``info``)
    ``team_coverage`` (entries in the world's memory), ``team_new_entries`` (this
    step's joint gain) and ``success`` (``team_coverage >= target_entries``;
    always False without a target).

    ## Arguments
    ``reward_scale``, ``step_penalty``, ``target_entries`` (int or None).

    ## Example
    >>> from mirage_env.multi_agent import MirageParallelEnv
    >>> env = MirageParallelEnv(n_agents=3, task="coverage")
    >>> observations, infos = env.reset(seed=0)
    >>> sorted(observations)
    ['camera_0', 'camera_1', 'camera_2']
    """

    name = "coverage"
    measures = ("team_coverage", "team_new_entries", "success")

    def __init__(self, reward_scale: float = 1.0, step_penalty: float = 0.0, target_entries: int | None = None):
        if target_entries is not None and (isinstance(target_entries, bool) or int(target_entries) != target_entries
                                           or target_entries < 1):
            raise ValueError(f"target_entries must be a positive integer or None, got {target_entries!r}")
        self.reward_scale = float(reward_scale)
        self.step_penalty = float(step_penalty)
        self.target_entries = None if target_entries is None else int(target_entries)

    def step(self, view, agents: np.ndarray) -> TaskStep:
        world = view.agent_world[agents]
        gained = view.last_new_entries[world].astype(np.float64)
        reward = self.reward_scale * gained / view.latent_pixels_per_frame - self.step_penalty
        entries = view.memory_entries_per_world()[world]
        success = (entries >= self.target_entries) if self.target_entries is not None else np.zeros(len(agents), bool)
        metrics = [{"team_coverage": int(e), "team_new_entries": int(g), "success": bool(s)}
                   for e, g, s in zip(entries, gained, success)]
        return TaskStep(reward, success, metrics)
