"""Tasks on top of a World: goals, reward, termination and episode measures.

Installed as ``mirage_env.tasks``. ``TASKS`` maps a task's name to its class.
"""

from .base import Task, TaskStep
from .coverage import CoverageTask
from .explore import ExploreTask
from .pointnav import PointNavTask
from .returnhome import ReturnHomeTask

TASKS: dict[str, type[Task]] = {task.name: task for task in (ExploreTask, PointNavTask, ReturnHomeTask, CoverageTask)}

__all__ = ["Task", "TaskStep", "CoverageTask", "ExploreTask", "PointNavTask", "ReturnHomeTask", "TASKS"]
