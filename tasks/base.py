"""The task protocol: goals, reward, termination and measures on top of a World.

The World knows nothing of rewards (habitat's split). A Task sees a read-only
:class:`TaskView` of the agents (cameras, step counts, what the last step
produced, its world's memory size) and answers for a set of agents at once, so
one task serves the single env, the vector env and the multi-agent env. A new
task is one short file: subclass ``Task``, declare its ``measures`` and the
arrays of its ``state_fields``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the batch imports tasks, never the other way at run time
    from mirage_env.batch import AgentBatch


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


class TaskView:
    """What a task may read of N agents and their worlds; it cannot change them.

    Arrays are read-only views of the batch's current arrays (indexed by agent,
    or by world for ``last_new_entries``); a task that needs to keep one copies it.
    """

    _ARRAYS = ("rigs", "start_rigs", "steps", "path_length", "last_frames", "first_frames", "last_depth",
               "last_new_entries", "agent_world")

    def __init__(self, batch: "AgentBatch"):
        self._batch = batch

    def __getattr__(self, name: str):  # only names the class does not define come here
        raise AttributeError(f"a task's view has no {name!r}; it offers {', '.join(sorted(self.names()))}")

    @classmethod
    def names(cls) -> list[str]:
        return [*cls._ARRAYS, "num_agents", "num_worlds", "agents_per_world", "motion", "max_episode_steps",
                "latent_pixels_per_frame", "latent_camera", "rng", "memory_entries_per_world"]

    num_agents = property(lambda self: self._batch.num_agents)
    num_worlds = property(lambda self: self._batch.num_worlds)
    agents_per_world = property(lambda self: self._batch.agents_per_world, doc="agents in each world (all the same)")
    motion = property(lambda self: self._batch.motion, doc="MotionConfig (frozen)")
    max_episode_steps = property(lambda self: self._batch.max_episode_steps)
    latent_pixels_per_frame = property(lambda self: self._batch.latent_pixels_per_frame)
    latent_camera = property(lambda self: self._batch.world.latent_camera, doc="the Camera of depth / latent pixels")

    def rng(self, agent: int) -> np.random.Generator:
        """The agent's generator: goals drawn from it repeat with the env's seed."""
        return self._batch.rng(agent)

    def memory_entries_per_world(self) -> np.ndarray:
        """(num_worlds,) int64 entries in each world's memory (read-only)."""
        entries = self._batch.world.memory.entries_per_world(copy=False)
        return _read_only(entries.numpy() if entries.is_cpu else entries.cpu().numpy())


# The arrays as a property each, not a lookup in __getattr__ (which runs only after a failed one): tasks read
# several every step.
for _name in TaskView._ARRAYS:
    setattr(TaskView, _name, property(lambda self, name=_name: _read_only(getattr(self._batch, name))))


@dataclass
class TaskStep:
    """A task's answer for n agents.

    Attributes:
        reward: (n,) float.
        terminated: (n,) bool, the episode reached a terminal state (success or failure).
        metrics: one dict per agent, merged into ``info`` (episode measures at the end).
    """

    reward: np.ndarray
    terminated: np.ndarray
    metrics: list[dict[str, Any]] = field(default_factory=list)


class Task:
    """Base class: no goal, no reward, never terminates.

    Class attributes a subclass sets:
        name: its key in ``mirage_env.tasks.TASKS``.
        measures: the keys it may put in ``info`` (declared, so training can log them
            without stepping an env first).
        state_fields: names of its per-agent array attributes; together they are the
            task's state, saved with a world (``state`` / ``load_state`` use them).
    """

    name = "none"
    measures: tuple[str, ...] = ()
    state_fields: tuple[str, ...] = ()

    def observation_spaces(self) -> dict[str, Any]:
        """Extra observation entries (gymnasium spaces) this task adds, e.g. a goal vector."""
        return {}

    def reset(self, view: TaskView, agents: np.ndarray) -> None:
        """Start an episode for ``agents`` (indices); sample goals from ``view.rng(a)``."""

    def observe(self, view: TaskView, agents: np.ndarray) -> dict[str, np.ndarray]:
        """The task's observation entries for ``agents``, each (n, ...)."""
        return {}

    def step(self, view: TaskView, agents: np.ndarray) -> TaskStep:
        """Reward and termination after the agents moved and the World generated."""
        n = len(agents)
        return TaskStep(np.zeros(n, dtype=np.float64), np.zeros(n, dtype=bool), [{} for _ in range(n)])

    # ------------------------------------------------------------------ ownership and state

    def bind(self, owner: object) -> None:
        """Claim this task for one env; a second env gets a clear error instead of sharing it.

        A task holds per-episode state (goals, phases), so two envs stepping one
        instance would overwrite each other's episodes.
        """
        current = getattr(self, "_owner", None)
        if current is not None and current is not owner:
            raise ValueError(f"this {type(self).__name__} instance already serves another env; give each env its "
                             f"own task (pass the name {self.name!r}, or a new instance)")
        self._owner = owner

    def state(self) -> dict[str, np.ndarray]:
        """The arrays of ``state_fields`` (empty before the first reset)."""
        values = {name: getattr(self, name, None) for name in self.state_fields}
        if any(value is None for value in values.values()):
            return {}
        return {name: np.asarray(value) for name, value in values.items()}

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore ``state()``; an empty dict (a world saved before any reset) leaves the task as it is."""
        if not state:
            return
        missing = sorted(set(self.state_fields) - set(state))
        if missing:
            raise ValueError(f"saved state of task {self.name!r} lacks {missing}; it was saved by another version")
        for name in self.state_fields:
            setattr(self, name, np.array(state[name], copy=True))
