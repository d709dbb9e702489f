"""Several cameras in one generated world: a PettingZoo ParallelEnv over a shared World.

The agents are views of ONE world held in ONE latent spatial memory. What one
agent saw was written to that memory, so another agent that later stands where
it stood is shown the same place. Every step is one generator call that
renders all agents' views together.
"""

from __future__ import annotations

import copy
import os
import warnings
from typing import Any

import numpy as np
from gymnasium.utils import seeding
from pettingzoo import ParallelEnv

from .config import EnvConfig
from .batch import Snapshot
from .env import (RESET_OPTIONS, ExclusiveUse, checked_env_fields, exclusive, fork_env, optional_generator,
                  read_snapshot, save_snapshot, snapshot_check)
from .memory.fileformat import StateCheck
from .geometry import Move

__all__ = ["MirageParallelEnv"]


class MirageParallelEnv(ParallelEnv):
    """``n_agents`` cameras exploring one world generated with a shared latent spatial memory.

    ## Description
    One ``World`` (one scene, one memory), one ``AgentBatch`` with all agents in
    it. Each step moves every camera, then the world model generates the next
    segment for all of them at once (one call), conditioned on the memory
    projected onto each camera; what any of them saw is written back to the one
    memory. With ``shared_memory=False`` (the ablation) each agent explores its
    own copy of the world (same scene, same seed) with a memory of its own, so a
    place one agent saw is new to the others.

    ## Agents
    ``possible_agents = ["camera_0", ..., "camera_{n-1}"]``. They start side by
    side ``start_spread`` metres apart across the origin, all facing +z. An agent
    whose episode ended (terminated or truncated) leaves ``agents``; its camera
    stays in the world, standing still, until every agent is done.

    ## Action Space (per agent)
    As ``MirageEnv``: ``Discrete(9)`` moves (0 stay, 1 forward, 2 backward, 3/4
    strafe left/right, 5/6 turn left/right, 7/8 look up/down; see
    ``mirage_env.geometry.Move``) or ``Box(-1, 1, (6,), float32)`` velocities.
    ``step`` needs one action for every live agent and nothing for others; a bad
    or missing action raises ``ValueError`` naming the agent.

    ## Observation Space (per agent)
    As ``MirageEnv``: ``Dict`` with ``rgb`` (H, W, 3) uint8, ``pose`` (6,) float32
    in the shared world frame (so agents can relate their poses), optionally
    ``depth`` and ``latent``, plus the task's entries.

    ## Rewards
    From the task. The default, ``coverage``, pays every agent the team's joint
    gain in memory (see ``mirage_env.tasks.CoverageTask``); ``explore`` splits it.

    ## Episode End
    - Termination: per agent, the task's terminal condition (``coverage`` with a
      target: every agent at once, when the team's memory reaches it).
    - Truncation: every agent after ``max_episode_steps``.

    ## Arguments
    ``n_agents``, ``task`` (name or Task instance), ``shared_memory`` (False: the
    separate-memories ablation), ``config``, and any :class:`mirage_env.config.EnvConfig`
    option as a keyword, as ``MirageEnv`` takes them (``start_spread``: metres between
    the agents' starting places; ``memory_horizon`` K: read only what the last K
    segments of the world wrote or saw; ``render_mode="rgb_array"``: the agents'
    frames side by side).
    The world model must not compress time (the procedural one does not): a
    video VAE would mix the frames of different agents.

    Reset options: ``image`` / ``prompt`` start the world from a picture
    (backends that support it). Other keys are ignored with a warning, as
    PettingZoo's API test passes an arbitrary option.

    ## Example
    >>> from mirage_env.multi_agent import MirageParallelEnv
    >>> env = MirageParallelEnv(n_agents=2)
    >>> observations, infos = env.reset(seed=0)
    >>> observations["camera_1"]["rgb"].shape
    (64, 64, 3)
    >>> actions = {agent: env.action_space(agent).sample() for agent in env.agents}
    >>> observations, rewards, terminations, truncations, infos = env.step(actions)
    >>> rewards["camera_0"] == rewards["camera_1"]  # one team, one coverage reward
    True
    """

    metadata = {"name": "mirage_shared_world_v0", "render_modes": ["rgb_array"], "render_fps": 15,
                "is_parallelizable": True}

    def __init__(self, n_agents: int = 2, task=None, *, shared_memory: bool = True,
                 config: EnvConfig | None = None, **options):
        if isinstance(n_agents, bool) or not isinstance(n_agents, (int, np.integer)) or n_agents < 1:
            raise ValueError(f"n_agents must be a positive integer, got {n_agents!r}")
        n_agents = int(n_agents)
        # The team task is this env's default; a task given here or in ``config`` wins.
        base = config or EnvConfig(task="coverage")
        self.config = EnvConfig.from_options({"task": task, **options} if task is not None else options, base=base)
        self.render_mode = self.config.render_mode
        self.shared_memory = bool(shared_memory)
        num_worlds = 1 if self.shared_memory else n_agents
        self.world, self.task, self.batch = self.config.build(
            num_worlds=num_worlds, agents_per_world=n_agents // num_worlds,
            # Copies of the world keep the team's layout: agent i starts where it would in the shared world.
            team_slots=None if self.shared_memory else np.arange(n_agents),
        )
        self.possible_agents = [f"camera_{i}" for i in range(n_agents)]
        self.agents: list[str] = []
        self._index = {agent: i for i, agent in enumerate(self.possible_agents)}
        # One space object per agent: seeding one agent's space must not reseed another's.
        self.observation_spaces = {a: copy.deepcopy(self.batch.observation_space) for a in self.possible_agents}
        self.action_spaces = {a: copy.deepcopy(self.batch.action_space) for a in self.possible_agents}
        self._live = np.zeros(n_agents, dtype=bool)
        self._np_random: np.random.Generator | None = None
        self._exclusive = ExclusiveUse("MirageParallelEnv")

    def observation_space(self, agent: str):
        return self.observation_spaces[self._check_agent(agent)]

    def action_space(self, agent: str):
        return self.action_spaces[self._check_agent(agent)]

    @property
    def np_random(self) -> np.random.Generator:
        if self._np_random is None:
            self._np_random, _ = seeding.np_random()
        return self._np_random

    # ------------------------------------------------------------------ reset / step

    @exclusive
    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None):
        if seed is not None:
            self._np_random, _ = seeding.np_random(seed)
        if options is not None and not isinstance(options, dict):
            raise ValueError(f"reset options must be a dict (keys: {sorted(RESET_OPTIONS)}), got {type(options).__name__}")
        options = dict(options or {})
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            warnings.warn(f"ignoring unknown reset option(s) {unknown}; known: {sorted(RESET_OPTIONS)}", stacklevel=2)
        options = {k: v for k, v in options.items() if k in RESET_OPTIONS}
        world_seed = int(self.np_random.integers(2**62))
        worlds = list(range(self.world.num_worlds))
        # Without shared memory every agent gets a copy of the same world: same seed, same scene.
        self.batch.reset_worlds(worlds, [world_seed] * len(worlds),
                                conditioning=[options] * len(worlds) if options else None)
        self.agents = list(self.possible_agents)
        self._live[:] = True
        everyone = np.arange(len(self.possible_agents))
        infos = self.batch.reset_infos(everyone)
        return self._per_agent(self.batch.observe(everyone), everyone), dict(zip(self.agents, infos))

    @exclusive
    def step(self, actions: dict[str, Any]):
        if not self.agents:
            raise RuntimeError("no live agents: call reset() before step() (and again after every agent is done)")
        observations, rewards, terminated, truncated, infos = self.batch.step(self._batch_actions(actions),
                                                                              labels=self.possible_agents)
        live = np.flatnonzero(self._live)
        names = [self.possible_agents[i] for i in live]
        result = (
            self._per_agent(observations, live),
            {a: float(rewards[i]) for a, i in zip(names, live)},
            {a: bool(terminated[i]) for a, i in zip(names, live)},
            {a: bool(truncated[i]) for a, i in zip(names, live)},
            {a: infos[i] for a, i in zip(names, live)},
        )
        self._live &= ~(terminated | truncated)
        self.agents = [a for a in self.agents if self._live[self._index[a]]]
        return result

    def render(self) -> np.ndarray | None:
        """All agents' last frames side by side, (H, n_agents * W, 3) uint8 (``render_mode="rgb_array"``)."""
        if self.render_mode == "rgb_array":
            return np.concatenate(list(self.batch.last_frames), axis=1)
        return None

    def close(self) -> None:
        pass

    # ------------------------------------------------------------------ persistence and snapshots

    @exclusive
    def save_world(self, path: str | os.PathLike) -> None:
        """Save the world(s) and every agent's episode (memory, RNGs, cameras, task) to one safetensors file, atomically."""
        save_snapshot(path, self.batch.snapshot(self._env_state(), copy=False))

    @exclusive
    def load_world(self, path: str | os.PathLike) -> None:
        """Resume a world saved by ``save_world`` of an env made alike; every agent continues bit-for-bit.
        A file that fails its checks (MemoryFileError naming the field) leaves the env as it was."""
        self._restore(*read_snapshot(path))

    @exclusive
    def snapshot(self) -> Snapshot:
        """The env's whole state in memory, as ``save_world`` would write it (for planning)."""
        return self.batch.snapshot(self._env_state())

    @exclusive
    def restore(self, snapshot: Snapshot) -> None:
        """Go back to ``snapshot``: the same actions then give the same observations, bit for bit.
        Checked as a file is; a refused snapshot changes nothing."""
        self._restore(snapshot, snapshot_check())

    @exclusive
    def fork(self) -> MirageParallelEnv:
        """An independent copy of this env mid-episode that diverges without touching this one
        (it shares the world model's weights, not its per-world state)."""
        return fork_env(self)

    def _env_state(self) -> dict:
        return {
            "env": "MirageParallelEnv",
            "live": self._live.tolist(),
            "np_random": None if self._np_random is None else self._np_random.bit_generator.state,
        }

    def _restore(self, snapshot: Snapshot, check: StateCheck) -> None:
        extra = checked_env_fields(snapshot, "MirageParallelEnv", ("live", "np_random"), check)
        live = extra["live"]
        if not isinstance(live, list) or len(live) != len(self.possible_agents) \
                or not all(isinstance(flag, bool) for flag in live):
            check.fail("extra.live", f"must list one true/false per agent ({len(self.possible_agents)})")
        np_random = optional_generator(extra["np_random"], "extra.np_random", check)
        self.world = self.batch.prepare_restore(snapshot, check).commit()
        self._live = np.array(live, dtype=bool)
        self.agents = [agent for agent, alive in zip(self.possible_agents, live) if alive]
        self._np_random = np_random

    # ------------------------------------------------------------------ helpers

    def _check_agent(self, agent: str) -> str:
        if agent not in self._index:
            raise ValueError(f"unknown agent {agent!r}; this env has {self.possible_agents}")
        return agent

    def _per_agent(self, observations: dict[str, np.ndarray], indices: np.ndarray) -> dict[str, dict]:
        return {self.possible_agents[i]: {key: value[j] for key, value in observations.items()}
                for j, i in enumerate(indices)}

    def _batch_actions(self, actions: dict[str, Any]) -> list:
        if not isinstance(actions, dict):
            raise ValueError(f"actions must be a dict from agent name to action, got {type(actions).__name__}")
        extra = sorted(set(actions) - set(self.agents))
        missing = sorted(set(self.agents) - set(actions))
        if extra or missing:
            raise ValueError(f"step needs one action for each live agent {self.agents}; "
                             f"missing {missing}, not live or unknown {extra}")
        # Agents whose episode ended stand still: STAY, or zero velocity.
        stay = Move.STAY if self.batch.action_type == "discrete" else np.zeros(6)
        return [actions[agent] if agent in actions else stay for agent in self.possible_agents]
