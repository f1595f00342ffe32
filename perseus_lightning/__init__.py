"""perseus-lightning: remove energy bloat from pipeline-parallel training (Perseus, SOSP '24).

The framework-free core (profiles, schedules and DAGs, simulator, planner) lives in
:mod:`perseus_lightning.core` and imports neither torch nor lightning; GPU control lives in
:mod:`perseus_lightning.gpu`. Names below are imported on first use, so ``import
perseus_lightning`` stays cheap (the clock watchdog and the CLI start fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS: dict[str, str] = {
    "FrequencyPlan": "perseus_lightning.core.plan",
    "Frontier": "perseus_lightning.core.planner",
    "FrontierPlan": "perseus_lightning.core.planner",
    "Instruction": "perseus_lightning.core.schedules",
    "InstructionDAG": "perseus_lightning.core.dag",
    "InstructionProfile": "perseus_lightning.core.profile",
    "PerseusInputError": "perseus_lightning.core.errors",
    "PipelineSchedule": "perseus_lightning.core.schedules",
    "PlanError": "perseus_lightning.core.errors",
    "Profile": "perseus_lightning.core.profile",
    "ProfileError": "perseus_lightning.core.errors",
    "ScheduleError": "perseus_lightning.core.errors",
    "SimulationResult": "perseus_lightning.core.simulator",
    "StragglerEvaluation": "perseus_lightning.core.extrinsic",
    "build_schedule": "perseus_lightning.core.schedules",
    "evaluate_straggler": "perseus_lightning.core.extrinsic",
    "from_actions": "perseus_lightning.core.schedules",
    "plan_frontier": "perseus_lightning.core.planner",
    "simulate": "perseus_lightning.core.simulator",
    "simulate_data_parallel": "perseus_lightning.core.simulator",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'perseus_lightning' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


if TYPE_CHECKING:
    from perseus_lightning.core.dag import InstructionDAG
    from perseus_lightning.core.errors import PerseusInputError, PlanError, ProfileError, ScheduleError
    from perseus_lightning.core.extrinsic import StragglerEvaluation, evaluate_straggler
    from perseus_lightning.core.plan import FrequencyPlan
    from perseus_lightning.core.planner import Frontier, FrontierPlan, plan_frontier
    from perseus_lightning.core.profile import InstructionProfile, Profile
    from perseus_lightning.core.schedules import Instruction, PipelineSchedule, build_schedule, from_actions
    from perseus_lightning.core.simulator import SimulationResult, simulate, simulate_data_parallel
