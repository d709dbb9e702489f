"""Tasks on top of a World: goals, reward, termination and episode measures.

Installed as ``mirage_env.tasks``. ``TASKS`` maps a task's name to its class.
"""

from .base import Task, TaskStep
from .explore import ExploreTask

TASKS: dict[str, type[Task]] = {ExploreTask.name: ExploreTask}

__all__ = ["Task", "TaskStep", "ExploreTask", "TASKS"]
