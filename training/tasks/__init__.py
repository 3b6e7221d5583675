"""The task registry: names to task classes with their default (published) settings."""

from __future__ import annotations

from typing import Any

from training.tasks.adding import AddingTask
from training.tasks.base import Batch, Evaluation, Task
from training.tasks.co2 import CO2Task
from training.tasks.reber import ReberTask
from training.tasks.temporal_order import TemporalOrderTask
from training.tasks.timer import TimerTask

TASKS: dict[str, type[Task]] = {
    "adding": AddingTask,
    "temporal_order": TemporalOrderTask,
    "timer": TimerTask,
    "reber": ReberTask,
    "co2": CO2Task,
}


def make_task(name: str, **options: Any) -> Task:
    """Build a task by name; ``options`` override its defaults (e.g. ``length=50`` for adding)."""
    try:
        task_class = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None
    return task_class(**options)


__all__ = ["TASKS", "Batch", "Evaluation", "Task", "make_task"]
