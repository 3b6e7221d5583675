"""Demo runs of ``rnnserve stream``: for each bundled task, inputs drawn as training/ draws them,
the task's own measure on the served outputs, and the model's documented test-set figure beside it.

numpy only: this runs on the serving side, where torch is not installed. The generators follow the
task definitions in training/tasks (docs/TRAINING.md) and read the task's settings from the
model's ``model.json`` (``task_config``, ``metrics``), so the demo streams what the model was
trained and tested on. The CO2 series ships inside the package (``service/data``), so the CO2
demo needs no download and no statsmodels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from service.demo.adding import adding_plan
from service.demo.base import DemoPlan, DemoScore, Measure
from service.demo.co2 import co2_plan, co2_weeks
from service.demo.temporal_order import temporal_order_plan
from service.demo.timer import timer_plan
from service.errors import UsageError

__all__ = ["DemoPlan", "DemoScore", "Measure", "co2_weeks", "plan_for"]

PlanMaker = Callable[[Mapping[str, Any], int | None, int | None, np.random.Generator], DemoPlan]
PLANS: dict[str, PlanMaker] = {
    "timer": timer_plan,
    "adding": adding_plan,
    "temporal_order": temporal_order_plan,
    "co2": co2_plan,
}


def plan_for(
    task: str,
    metadata: Mapping[str, Any],
    *,
    steps: int | None = None,
    sequences: int | None = None,
    seed: int = 0,
) -> DemoPlan:
    """The demo of ``task`` for a model with ``metadata`` (its model.json). ``steps``: the length
    of every sequence (default: the lengths the model was trained on); ``sequences``: how many
    (per-sequence tasks; default 20). Raises ValueError for a task without a demo or a setting
    that does not apply."""
    try:
        make = PLANS[task]
    except KeyError:
        raise UsageError(f"no demo for task {task!r}; demos exist for {', '.join(PLANS)}") from None
    return make(metadata, steps, sequences, np.random.default_rng(seed))
