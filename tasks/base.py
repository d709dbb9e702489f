"""The task protocol: goals, reward, termination and measures on top of a World.

The World knows nothing of rewards (habitat's split). A Task sees an
``AgentBatch`` (cameras, the World, what the last step produced) and answers for
a set of agents at once, so one task serves the single env, the vector env and
the multi-agent env. A new task is one short file: subclass ``Task``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the batch imports tasks, never the other way at run time
    from mirage_env.batch import AgentBatch


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
    """Base class: no goal, no reward, never terminates."""

    name = "none"

    def observation_spaces(self) -> dict[str, Any]:
        """Extra observation entries (gymnasium spaces) this task adds, e.g. a goal vector."""
        return {}

    def reset(self, batch: "AgentBatch", agents: np.ndarray) -> None:
        """Start an episode for ``agents`` (indices into the batch); sample goals from ``batch.rng(a)``."""

    def observe(self, batch: "AgentBatch", agents: np.ndarray) -> dict[str, np.ndarray]:
        """The task's observation entries for ``agents``, each (n, ...)."""
        return {}

    def step(self, batch: "AgentBatch", agents: np.ndarray) -> TaskStep:
        """Reward and termination after the batch moved and the World generated."""
        n = len(agents)
        return TaskStep(np.zeros(n, dtype=np.float64), np.zeros(n, dtype=bool), [{} for _ in range(n)])
