"""Several cameras in one generated world: a PettingZoo ParallelEnv over a shared World.

The agents are views of ONE world held in ONE latent spatial memory. What one
agent saw was written to that memory, so another agent that later stands where
it stood is shown the same place. Every step is one generator call that
renders all agents' views together.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from typing import Any

import numpy as np
from gymnasium import spaces
from gymnasium.utils import seeding
from pettingzoo import ParallelEnv

from .batch import Snapshot
from .config import EnvConfig
from .env import RESET_OPTIONS, check_render_map
from .geometry import Move
from .memory.fileformat import StateCheck
from .persistence import ExclusiveUse, Persistent, checked_env_fields, exclusive, optional_generator

__all__ = ["MirageParallelEnv", "parallel_env", "env", "raw_env"]


class MirageParallelEnv(Persistent, ParallelEnv):
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
    separate-memories ablation), ``config``, ``max_cycles`` (PettingZoo's name for
    ``max_episode_steps``; give one or the other), ``render_map`` (``render()`` adds the
    top-down map of memory beside the frames), and any :class:`mirage_env.config.EnvConfig`
    option as a keyword, as ``MirageEnv`` takes them (``start_spread``: metres between
    the agents' starting places; ``memory_horizon`` K: read only what the last K
    segments of the world wrote or saw; ``render_mode="rgb_array"``: the agents'
    frames side by side; ``render_mode="human"``: those frames in a matplotlib window,
    where a display exists; without one, a warning says so and nothing is shown).
    The world model must not compress time (the procedural one does not): a
    video VAE would mix the frames of different agents.

    Reset options: ``image`` / ``prompt`` start the world from a picture
    (backends that support it). Other keys are passed over silently (PettingZoo's
    API test passes an arbitrary option; wrappers may add their own).

    ## State
    ``state()``: a global view of the shared world for centralised critics, the
    top-down map of the memory (:mod:`mirage_env.topdown`: what the team has seen,
    coloured by the decoded latents, every agent's position and heading, the task's
    goals), (H, W, 3) uint8 at the frames' size; with ``shared_memory=False`` the
    maps of every agent's own world side by side, (H, n_agents * W, 3).
    ``state_space`` is the matching ``Box``.

    ## PettingZoo layout
    As PettingZoo's own envs: ``mirage_env.multi_agent.parallel_env(**kwargs)``,
    ``env(**kwargs)`` (the AEC form, through ``pettingzoo.utils.parallel_to_aec``) and
    ``raw_env(**kwargs)`` (AEC without the order-enforcing wrapper).

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

    metadata = {"name": "mirage_shared_world_v0", "render_modes": ["rgb_array", "human"], "render_fps": 15,
                "is_parallelizable": True}

    def __init__(self, n_agents: int = 2, task=None, *, shared_memory: bool = True,
                 config: EnvConfig | None = None, render_mode: str | None = None, render_map: bool = False,
                 max_cycles: int | None = None, **options):
        if isinstance(n_agents, bool) or not isinstance(n_agents, (int, np.integer)) or n_agents < 1:
            raise ValueError(f"n_agents must be a positive integer, got {n_agents!r}")
        n_agents = int(n_agents)
        if max_cycles is not None:
            if options.get("max_episode_steps", max_cycles) != max_cycles:
                raise ValueError(f"max_cycles={max_cycles!r} and max_episode_steps={options['max_episode_steps']!r} "
                                 f"name the same limit; give one of them")
            options["max_episode_steps"] = max_cycles
        if render_mode not in (None, "rgb_array", "human"):
            raise ValueError(f"render_mode must be one of {self.metadata['render_modes']} or None, got {render_mode!r}")
        self.render_mode = render_mode
        # The world renders frames either way; "human" shows what "rgb_array" would return.
        options["render_mode"] = None if render_mode is None else "rgb_array"
        self.render_map = check_render_map(render_map, render_mode)
        # The team task is this env's default; a task given here or in ``config`` wins.
        base = config or EnvConfig(task="coverage")
        self.config = EnvConfig.from_options({"task": task, **options} if task is not None else options, base=base)
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
        height, width = self.observation_spaces[self.possible_agents[0]]["rgb"].shape[:2]
        self._map_size = (height, width)
        self.state_space = spaces.Box(0, 255, (height, width * num_worlds, 3), np.uint8)
        self._window = None

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
        # Only the world's own options condition it; others (PettingZoo's API test, wrappers) pass by.
        options = {k: v for k, v in (options or {}).items() if k in RESET_OPTIONS}
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

    def render(self, mode: str | None = None) -> np.ndarray | None:
        """All agents' last frames side by side, (H, n_agents * W, 3) uint8 (``render_mode="rgb_array"``),
        followed by the state map when ``render_map=True``. ``render_mode="human"`` shows that image in a
        window and returns None.

        ``mode`` is for wrappers that pass one (RLlib's ``ParallelPettingZooEnv`` passes its own
        ``render_mode``): None or this env's ``render_mode``, which is what decides."""
        if mode is not None and mode != self.render_mode:
            raise ValueError(f"render({mode!r}) asks for another mode than this env's render_mode "
                             f"{self.render_mode!r}; make the env with render_mode={mode!r}")
        if self.render_mode is None:
            return None
        image = np.concatenate(list(self.batch.last_frames), axis=1)
        if self.render_map:
            image = np.concatenate([image, self.state()], axis=1)
        if self.render_mode == "human":
            self._show(image)
            return None
        return image

    def state(self) -> np.ndarray:
        """The top-down map of the shared world's memory with every agent and goal on it, (H, W, 3) uint8;
        without shared memory, every agent's world's map side by side (see ``state_space``)."""
        from .topdown import TopDownMap, batch_map

        settings = TopDownMap(size=self._map_size)
        return np.concatenate([batch_map(self.batch, world, settings) for world in range(self.world.num_worlds)],
                              axis=1)

    def close(self) -> None:
        if self._window is not None:
            self._window.close()
            self._window = None

    def _show(self, image: np.ndarray) -> None:
        if self._window is None:
            self._window = _HumanWindow(self.metadata["name"])
        self._window.show(image)

    # ------------------------------------------------------------------ persistence (Persistent)

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


class _HumanWindow:
    """A matplotlib window for ``render_mode="human"``; without a display, one warning and no window."""

    def __init__(self, title: str):
        self.title, self.figure, self.artist = title, None, None
        self.available = _display_available()
        if not self.available:
            warnings.warn('render_mode="human" found no display (no DISPLAY / WAYLAND_DISPLAY, or matplotlib is not '
                          'installed): nothing is shown; use render_mode="rgb_array" and save the frames instead',
                          stacklevel=4)

    def show(self, image: np.ndarray) -> None:
        if not self.available:
            return
        import matplotlib.pyplot as plt

        if self.figure is None:
            plt.ion()
            self.figure, axes = plt.subplots(num=self.title)
            axes.set_axis_off()
            self.artist = axes.imshow(image)
        else:
            self.artist.set_data(image)
        self.figure.canvas.draw_idle()
        plt.pause(0.001)

    def close(self) -> None:
        if self.figure is not None:
            import matplotlib.pyplot as plt

            plt.close(self.figure)
            self.figure = None


def _display_available() -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    if os.name == "posix" and sys.platform != "darwin" and not (os.environ.get("DISPLAY")
                                                                 or os.environ.get("WAYLAND_DISPLAY")):
        return False
    return matplotlib.get_backend().lower() not in ("agg", "pdf", "ps", "svg", "pgf", "cairo", "template")


# ---------------------------------------------------------------------- PettingZoo's module layout


def parallel_env(**kwargs) -> MirageParallelEnv:
    """The ParallelEnv (PettingZoo's ``module.parallel_env(**kwargs)``); kwargs as ``MirageParallelEnv``,
    ``max_cycles`` included."""
    return MirageParallelEnv(**kwargs)


def raw_env(**kwargs):
    """The AEC form without PettingZoo's order-enforcing wrapper."""
    from pettingzoo.utils.conversions import parallel_to_aec_wrapper

    return parallel_to_aec_wrapper(parallel_env(**kwargs))


def env(**kwargs):
    """The AEC form (PettingZoo's ``module.env(**kwargs)``): ``parallel_to_aec(parallel_env(**kwargs))``."""
    from pettingzoo.utils import parallel_to_aec

    return parallel_to_aec(parallel_env(**kwargs))
