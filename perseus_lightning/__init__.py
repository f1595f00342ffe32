"""perseus-lightning: remove energy bloat from pipeline-parallel training (Perseus, SOSP '24).

The framework-free core (profiles, schedules and DAGs, simulator, planner) lives in
:mod:`perseus_lightning.core` and imports neither torch nor lightning.
"""

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PerseusInputError, PlanError, ProfileError, ScheduleError
from perseus_lightning.core.extrinsic import StragglerEvaluation, evaluate_straggler
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.planner import Frontier, FrontierPlan, plan_frontier
from perseus_lightning.core.profile import InstructionProfile, Profile
from perseus_lightning.core.schedules import Instruction, PipelineSchedule, build_schedule, from_actions
from perseus_lightning.core.simulator import SimulationResult, simulate, simulate_data_parallel

__version__ = "0.1.0"

__all__ = [
    "FrequencyPlan",
    "Frontier",
    "FrontierPlan",
    "Instruction",
    "InstructionDAG",
    "InstructionProfile",
    "PerseusInputError",
    "PipelineSchedule",
    "PlanError",
    "Profile",
    "ProfileError",
    "ScheduleError",
    "SimulationResult",
    "StragglerEvaluation",
    "build_schedule",
    "evaluate_straggler",
    "from_actions",
    "plan_frontier",
    "simulate",
    "simulate_data_parallel",
]
