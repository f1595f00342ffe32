"""Extrinsic bloat: data-parallel pipelines waiting for a straggler at gradient synchronisation.

With ``N`` pipelines of which one is ``s`` times slower (every instruction takes ``s`` times the
time and energy, as under thermal throttling), the straggler sets the synchronised iteration time
``T'``. Everyone else finishes early and idles at the blocking power until ``T'``.

- **Baseline**: every pipeline runs every instruction at max clock.
- **Perseus**: the straggler runs the frontier's fastest plan (intrinsic savings, no slowdown of its
  own); the others run the frontier's plan for ``min(T', T*)``: there is no point in being faster
  than the straggler, nor slower than ``T*``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from perseus_lightning.core.planner import Frontier, FrontierPlan
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.simulator import DataParallelResult, simulate_data_parallel


@dataclass(frozen=True)
class StragglerEvaluation:
    """Baseline and Perseus energy of ``pipelines`` pipelines, one ``slowdown`` times slower."""

    baseline: DataParallelResult
    perseus: DataParallelResult
    others_plan: FrontierPlan

    @property
    def saving(self) -> float:
        """Fraction of the baseline energy that Perseus saves."""
        return 1.0 - self.perseus.energy / self.baseline.energy

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipelines": self.baseline.pipelines,
            "straggler_slowdown": self.baseline.straggler_slowdown,
            "straggler_time": self.perseus.straggler.iteration_time,
            "others_plan_time": self.others_plan.iteration_time,
            "baseline_energy": self.baseline.energy,
            "perseus_energy": self.perseus.energy,
            "saving": self.saving,
            "baseline": self.baseline.to_dict(),
            "perseus": self.perseus.to_dict(),
        }


def evaluate_straggler(frontier: Frontier, profile: Profile, pipelines: int, slowdown: float) -> StragglerEvaluation:
    """Compare max-clock data parallelism with Perseus when one of ``pipelines`` is ``slowdown``x slower."""
    dag, power = frontier.dag, frontier.p2p_power
    baseline = simulate_data_parallel(dag, profile, power, pipelines, slowdown)
    straggler_plan = frontier.fastest.plan
    straggler_time = slowdown * frontier.fastest.iteration_time
    others = frontier.for_straggler(straggler_time)
    perseus = simulate_data_parallel(dag, profile, power, pipelines, slowdown, others.plan, straggler_plan)
    return StragglerEvaluation(baseline, perseus, others)
