"""The iteration time–energy frontier of frequency plans.

:func:`plan_frontier` sweeps deadlines from ``T_min`` (every instruction at max clock: zero
slowdown) to ``T*`` (the minimum-energy iteration time). At each deadline it

1. solves the convex-hull LP relaxation (:mod:`perseus_lightning.core.relaxation`), warm-started
   from the previous deadline, which also gives the lower bound that no plan can beat;
2. rounds every instruction to its cheapest profiled clock no slower than its relaxed duration,
   which keeps every path within the deadline, and, apart, mixes the hull vertices around the
   fractional durations by relax-and-fix (:mod:`perseus_lightning.core.relax_and_fix`);
3. reclaims the slack that rounding left (:mod:`perseus_lightning.core.slack`) in both (and in the
   faster neighbour's plan, when filling a wide gap), each backward and by value, and keeps the
   cheapest (all-max-clock is the starting point only if none of them finishes by the deadline);
4. where that plan is still more than ``JUMP_ABOVE`` above the LP bound (``JUMP_ABOVE_AT_T_MIN`` at
   ``T_min``, the targets for every plan and for zero slowdown), moves instructions off
   clocks above their convex hull, one at a time, repairing the deadline around each
   (:mod:`perseus_lightning.core.hull_jumps`), and reclaims the slack left; a plan then within
   ``SEARCH_BELOW`` of the bound gets neighbourhood search (:mod:`perseus_lightning.core.neighbourhood`);
5. where the plan is still above that target and the deadline within ``RESTART_WITHIN`` of
   ``T_min``, rounds ``restarts`` more vertices of the LP's optimal face at the deadline in the same
   way (the first solved afresh, the others by random objectives), and the optimum of the LP with
   window floors (:func:`~perseus_lightning.core.strengthened_bound.window_floors`), and keeps the
   cheapest plan (:mod:`perseus_lightning.core.rounding`).

Long synchronous-1F1B pipelines (``PERIODIC_MIN_NODES`` instructions or more) use the periodic LP
(:mod:`perseus_lightning.core.periodic`) instead of the full relaxation: its size does not grow with
the number of microbatches, but it gives no lower bound, so their plans get no search or restarts,
and only the zero-slowdown plan gets hull jumps (steps 4 and 5).

With ``workers``, the LPs stay in this process, in order, and worker processes do the rest of
each deadline's work (:mod:`perseus_lightning.core.rounding`), with the same plans as one process.

Pipelines small enough for the exact MILP (:mod:`perseus_lightning.core.exact`) then get, within a
time budget and a node limit per solve, a better zero-slowdown plan (optimal when the solve
finishes) and every gap wider than ``MAX_SPACING`` filled or, when the solves finish, proven to hold
no plan cheaper than its faster end.

Every plan's iteration time and energy come from the exact simulator on the measured profile.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError, read_json
from perseus_lightning.core.exact import ExactPlanner
from perseus_lightning.core.options import clock_options, frequency_plan
from perseus_lightning.core.periodic import PeriodicRelaxation
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.rounding import ROUNDING_TOLERANCE, Rounder, RoundingJob, RoundingPool
from perseus_lightning.core.schedules import from_actions
from perseus_lightning.core.simulator import SimulationResult, earliest_schedule, simulate
from perseus_lightning.core.slack import CHEAPER, DEADLINE_TOLERANCE, option_durations, reclaim_slack

FRONTIER_VERSION = 1
DEFAULT_STEP = 0.004
"""Deadline spacing of the sweep, as a fraction of ``T_min``."""
MAX_SPACING = 0.005
"""Largest gap between neighbouring plans' iteration times, as a fraction of ``T_min``."""
FLAT_TOLERANCE = 1e-3
"""Plans within this fraction of the minimum energy count as reaching ``T*``."""
EXACT_SECONDS = 5.0
"""Default time budget of the exact MILP solves, per frontier (only small pipelines use them)."""
PERIODIC_MIN_NODES = 4096
"""Instructions from which a synchronous-1F1B pipeline is planned with the periodic LP."""
RESTART_WITHIN = 0.012
"""Deadlines up to this fraction of ``T_min`` past it get restarts: on the measured profiles every
restart that found a cheaper plan was there (docs/planner-research.md, session 27)."""
RESTART_NODES = 1500
"""Default restarts per deadline: ``RESTART_NODES // instructions``, at most ``MAX_RESTARTS``
(7 at 8 x 12, 1 at 8 x 48, none from 8 x 96 on, where the speed target leaves no time for them)."""
MAX_RESTARTS = 8
PARALLEL_MIN_NODES = 300
"""Instructions from which ``workers`` > 1 round deadlines on worker processes (below, starting
them, about 0.6 s, costs more than they save)."""
_MAX_REFINEMENTS = 4
_BEFORE = 1e-6
"""Relative margin before a gap's slower end that its last exact solve must finish by."""


@dataclass(frozen=True)
class FrontierPlan:
    """One plan of the frontier, with its exactly simulated iteration time and energy."""

    iteration_time: float
    energy: float
    plan: FrequencyPlan
    lower_bound: float | None = None
    """The LP bound (J) at the deadline this plan was planned for; the bound at the plan's own,
    possibly shorter, iteration time is at least as high. ``None`` for plans of the periodic LP."""


class Frontier:
    """Frequency plans ordered by iteration time, each cheaper than every faster one."""

    def __init__(
        self, dag: InstructionDAG, p2p_power: float, baseline: tuple[float, float], plans: Sequence[FrontierPlan]
    ) -> None:
        if not plans:
            raise PlanError("a frontier needs at least one plan. Fix: plan with plan_frontier().")
        self.dag = dag
        self.p2p_power = p2p_power
        self.baseline_time, self.baseline_energy = baseline
        self.plans = sorted(plans, key=lambda p: p.iteration_time)

    @property
    def fastest(self) -> FrontierPlan:
        """The zero-slowdown plan."""
        return self.plans[0]

    @property
    def t_star(self) -> float:
        """The minimum-energy iteration time ``T*``: the slowest plan's."""
        return self.plans[-1].iteration_time

    def select(self, deadline: float) -> FrontierPlan:
        """The cheapest plan that finishes by ``deadline`` (the fastest plan if none does)."""
        fitting = [p for p in self.plans if p.iteration_time <= deadline * (1 + ROUNDING_TOLERANCE)]
        return min(fitting, key=lambda p: p.energy) if fitting else self.fastest

    def for_straggler(self, straggler_time: float) -> FrontierPlan:
        """The plan for non-straggler pipelines when the slowest one takes ``straggler_time``:
        the plan for ``min(T', T*)``."""
        return self.select(min(straggler_time, self.t_star))

    # ------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        schedule = self.dag.schedule
        return {
            "version": FRONTIER_VERSION,
            "schedule": schedule.name,
            "stages": schedule.num_ranks,
            "virtual_stages": schedule.num_stages // schedule.num_ranks,
            "microbatches": schedule.num_microbatches,
            "p2p_power": self.p2p_power,
            "baseline": {"iteration_time": self.baseline_time, "energy": self.baseline_energy},
            "actions": schedule.actions(),
            "plans": [
                {"iteration_time": p.iteration_time, "energy": p.energy, "lower_bound": p.lower_bound,
                 "frequencies": p.plan.rank_lists(self.dag)}
                for p in self.plans
            ],
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Frontier:
        path = Path(path)
        doc = read_json(path, "frontier", PlanError, f"create the frontier with `perseus plan ... --output {path}`")
        return cls.from_dict(doc, str(path))

    @classmethod
    def from_dict(cls, doc: object, source: str = "<frontier>") -> Frontier:
        """The frontier of a :meth:`to_dict` document; errors name ``source``."""
        needed = ("version", "schedule", "p2p_power", "baseline", "actions", "plans")
        if not isinstance(doc, dict) or any(key not in doc for key in needed):
            raise PlanError(f"{source}: not a frontier file (needs {', '.join(needed)}). Fix: create it with `perseus plan`.")
        if doc["version"] != FRONTIER_VERSION:
            raise PlanError(f"{source}: frontier version {doc['version']}, this release reads {FRONTIER_VERSION}. Fix: re-plan.")
        dag = InstructionDAG.from_schedule(from_actions(doc["actions"], name=doc["schedule"]))
        plans = [
            FrontierPlan(float(p["iteration_time"]), float(p["energy"]),
                         FrequencyPlan.from_rank_lists(dag, p["frequencies"], f"{source}, plan {i}"), p.get("lower_bound"))
            for i, p in enumerate(doc["plans"])
        ]
        baseline = doc["baseline"]
        return cls(dag, float(doc["p2p_power"]), (float(baseline["iteration_time"]), float(baseline["energy"])), plans)

    def write_zeus(self, directory: str | Path) -> list[Path]:
        """Write Zeus's ``freqs_pipeline_%05d.py`` files, slowest plan first, as Zeus's PFO server reads them."""
        if self.dag.schedule.num_stages != self.dag.num_ranks or self.dag.schedule.name != "1f1b":
            raise PlanError(
                f"Zeus plans describe synchronous 1F1B only, not '{self.dag.schedule.name}'. "
                f"Fix: drop --zeus-dir, or plan with --schedule 1f1b."
            )
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        for index, point in enumerate(reversed(self.plans)):
            stages = [[(kind, freq) for kind, freq in rank] for rank in point.plan.rank_lists(self.dag)]
            path = directory / f"freqs_pipeline_{index:05d}.py"
            path.write_text(repr(stages) + "\n")
            written.append(path)
        return written


def plan_frontier(
    profile: Profile,
    dag: InstructionDAG,
    p2p_power: float,
    step: float = DEFAULT_STEP,
    points: int | None = None,
    exact_seconds: float = EXACT_SECONDS,
    workers: int = 1,
    restarts: int | None = None,
) -> Frontier:
    """Compute the iteration time–energy frontier of ``dag`` from ``T_min`` to ``T*``.

    Deadlines are spaced ``step * T_min`` apart, or ``points`` of them evenly from ``T_min`` to
    the relaxation's ``T*``; where neighbouring plans still end up more than ``MAX_SPACING * T_min``
    apart, deadlines are added between them and the two plans are blended (:meth:`_Sweep.blend`).
    Pipelines small enough for the exact MILP then spend up to ``exact_seconds`` on it (0: never):
    first on the zero-slowdown plan, then on the remaining wide gaps (not with ``points``). The
    returned plans are Pareto-optimal among those found, and end at ``T*``: the first plan within
    ``FLAT_TOLERANCE`` of the minimum energy.

    ``restarts`` more vertices of the LP's optimal face, and the optimum of the LP with window floors,
    are rounded at each deadline within ``RESTART_WITHIN`` of ``T_min`` whose plan stays above its
    target (by default ``RESTART_NODES // instructions``, at most ``MAX_RESTARTS``; none with 0, and
    not on the periodic LP): more time, for plans that are cheaper or the same.

    With ``workers`` > 1, pipelines of ``PARALLEL_MIN_NODES`` instructions or more (on the full LP)
    round deadlines on that many worker processes (:class:`~perseus_lightning.core.rounding.RoundingPool`);
    the plans are the same as with one. A script that passes ``workers`` needs an ``if __name__ ==
    "__main__":`` guard, as for any spawned process.
    """
    if points is not None and points < 1:
        raise PlanError(f"points is {points}. Fix: ask for at least 1 plan.")
    if not step > 0:
        raise PlanError(f"step is {step}. Fix: give a positive fraction of T_min, e.g. {DEFAULT_STEP}.")
    if not exact_seconds >= 0:
        raise PlanError(f"exact_seconds is {exact_seconds}. Fix: give 0 (no exact solves) or more, e.g. {EXACT_SECONDS:g}.")
    if workers < 1:
        raise PlanError(f"workers is {workers}. Fix: give 1 (plan in this process) or more.")
    if restarts is None:
        restarts = min(RESTART_NODES // dag.num_nodes, MAX_RESTARTS)
    if restarts < 0:
        raise PlanError(f"restarts is {restarts}. Fix: give 0 (none) or more.")
    sweep = _Sweep(profile, dag, p2p_power, restarts)
    parallel = workers > 1 and dag.num_nodes >= PARALLEL_MIN_NODES
    with RoundingPool(sweep.rounder, workers if parallel else 1) as pool:
        t_min = sweep.baseline.iteration_time
        t_star = max(sweep.relaxation.min_energy(t_min).deadline, t_min)
        if points is not None:
            deadlines = np.linspace(t_min, t_star, points) if points > 1 else np.array([t_min])
        else:
            count = math.floor((t_star - t_min) / (step * t_min) + 1e-9) + 1
            deadlines = t_min + step * t_min * np.arange(count + 1)  # one past T*: rounding may shift it
        for _ in sweep.plan_each(pool, [(float(deadline), None) for deadline in deadlines]):
            pass
        plans = _frontier_of(sweep.found, t_min)
        for _ in range(_MAX_REFINEMENTS):
            gaps = _wide_gaps(plans, t_min)
            if not gaps or points is not None:
                break
            middles = [(0.5 * (a.iteration_time + b.iteration_time), a) for a, b in gaps]
            for (a, b), _ in zip(gaps, sweep.plan_each(pool, middles)):  # a gap's blends once its middle is planned
                sweep.blend(a, b)
            plans = _frontier_of(sweep.found, t_min)
    if exact_seconds > 0 and ExactPlanner.fits(sweep.options):
        plans = _plan_exactly(sweep, plans, t_min, time.monotonic() + exact_seconds, fill_gaps=points is None)
    return Frontier(dag, p2p_power, (t_min, sweep.baseline.energy), plans)


def _wide_gaps(plans: list[FrontierPlan], t_min: float) -> list[tuple[FrontierPlan, FrontierPlan]]:
    return [(a, b) for a, b in zip(plans, plans[1:]) if b.iteration_time - a.iteration_time > MAX_SPACING * t_min]


def _plan_exactly(sweep: _Sweep, plans: list[FrontierPlan], t_min: float, until: float, fill_gaps: bool) -> list[FrontierPlan]:
    """From the frontier ``plans`` of the sweep: solve the MILP at ``T_min``, then, while time is
    left, split each wide gap ``(a, b)`` with the cheapest plan finishing by its middle, or else by
    just before ``b``; a gap where neither beats ``a`` holds no cheaper plan (proven when both
    solves were optimal) and is left alone."""
    exact = ExactPlanner(sweep.dag, sweep.options, sweep.p2p_power)
    sweep.plan_exactly(exact, t_min, plans[0], until)
    plans = _frontier_of(sweep.found, t_min)
    settled: set[tuple[float, float]] = set()
    while fill_gaps and time.monotonic() < until:
        gap = next(((a, b) for a, b in _wide_gaps(plans, t_min) if (a.iteration_time, b.iteration_time) not in settled), None)
        if gap is None:
            break
        a, b = gap
        for deadline in (0.5 * (a.iteration_time + b.iteration_time), b.iteration_time * (1 - _BEFORE)):
            found = sweep.plan_exactly(exact, deadline, a, until)
            if found.iteration_time < b.iteration_time and found.energy < a.energy * (1 - CHEAPER):
                break
        else:
            settled.add((a.iteration_time, b.iteration_time))
        plans = _frontier_of(sweep.found, t_min)
    return plans


class _Sweep:
    """Plans at successive deadlines."""

    def __init__(self, profile: Profile, dag: InstructionDAG, p2p_power: float, restarts: int) -> None:
        self.dag = dag
        self.p2p_power = p2p_power
        self.stage_profile = profile.for_stages(dag.schedule.stage_ranks)
        self.baseline = simulate(dag, self.stage_profile, p2p_power)
        self.options = clock_options(dag, self.stage_profile, p2p_power)
        periodic = (
            PeriodicRelaxation.fitting(dag, self.options, p2p_power, self.baseline.iteration_time)
            if dag.num_nodes >= PERIODIC_MIN_NODES else None
        )
        self.relaxation = periodic or HullRelaxation(dag, self.options, p2p_power)
        self.rounder = Rounder(dag, self.options, p2p_power * dag.num_ranks)
        self.restarts = restarts
        self.found: list[FrontierPlan] = []
        self._choices: dict[int, np.ndarray] = {}

    def plan_exactly(self, exact: ExactPlanner, deadline: float, seed: FrontierPlan, until: float) -> FrontierPlan:
        """The MILP's plan for ``deadline`` (at most until the clock reads ``until``), from ``seed``."""
        choice = exact.solve(deadline, self._choices[id(seed)], max(until - time.monotonic(), 0.01)).choice
        result = simulate(self.dag, self.stage_profile, self.p2p_power, frequency_plan(self.options, choice))
        if result.iteration_time > deadline * (1 + DEADLINE_TOLERANCE):
            return seed  # the solver's plan ends past the deadline by more than float noise: keep the seed
        return self._record(choice, result, self.relaxation.solve(deadline).lower_bound)

    def plan_each(self, pool: RoundingPool, requests: list[tuple[float, FrontierPlan | None]]) -> Iterator[FrontierPlan]:
        """Plan for each ``(deadline, seed)`` of ``requests`` (``seed``: a plan found earlier, one
        more starting point), recording each plan as it is yielded. The LPs are solved here, all in
        order (each warm-starts the next), before the first plan; ``pool`` rounds them."""
        def job(deadline: float, seed: FrontierPlan | None) -> RoundingJob:
            relaxed = self.relaxation.solve(deadline)
            starts = [] if seed is None else [self._choices[id(seed)]]
            t_min = self.baseline.iteration_time
            zero_slowdown = deadline <= t_min * (1 + DEADLINE_TOLERANCE)
            restarts = self.restarts if deadline <= t_min * (1 + RESTART_WITHIN + DEADLINE_TOLERANCE) else 0
            return RoundingJob(deadline, relaxed.durations, relaxed.lower_bound, tuple(starts), zero_slowdown, restarts)

        for planned, best in pool.map(job(deadline, seed) for deadline, seed in requests):
            yield self._record_plan(best, planned.lower_bound)

    def blend(self, faster: FrontierPlan, slower: FrontierPlan, parts: int = 4) -> None:
        """Plans between two neighbours of the frontier: the instructions that start in the first
        ``k / parts`` of ``faster``'s iteration take ``slower``'s clocks, the rest keep ``faster``'s,
        and slack is reclaimed. Those that end before ``slower`` and cost less than ``faster`` are kept."""
        fast, slow = self._choices[id(faster)], self._choices[id(slower)]
        start, _ = earliest_schedule(self.dag, option_durations(self.options, fast))
        for k in range(1, parts):
            choice = np.where(start < faster.iteration_time * k / parts, slow, fast)
            _, end = earliest_schedule(self.dag, option_durations(self.options, choice))
            choice = reclaim_slack(self.dag, self.options, choice, float(end.max()))
            result = simulate(self.dag, self.stage_profile, self.p2p_power, frequency_plan(self.options, choice))
            if result.iteration_time < slower.iteration_time and result.energy < faster.energy * (1 - CHEAPER):
                self._record(choice, result, self.relaxation.solve(result.iteration_time).lower_bound)

    def _record_plan(self, choice: np.ndarray, lower_bound: float | None) -> FrontierPlan:
        """Simulate the plan of option indices ``choice`` and :meth:`_record` it."""
        result = simulate(self.dag, self.stage_profile, self.p2p_power, frequency_plan(self.options, choice))
        return self._record(choice, result, lower_bound)

    def _record(self, choice: np.ndarray, result: SimulationResult, lower_bound: float | None) -> FrontierPlan:
        """Add the plan of option indices ``choice``, simulated as ``result``, with the relaxation's
        ``lower_bound`` at the deadline it was planned for, to :attr:`found`."""
        found = FrontierPlan(result.iteration_time, result.energy, FrequencyPlan(tuple(result.frequencies.tolist())), lower_bound)
        self.found.append(found)
        self._choices[id(found)] = choice
        return found


def _frontier_of(plans: list[FrontierPlan], t_min: float) -> list[FrontierPlan]:
    """The cheapest plan that finishes by ``T_min`` (on a noisy profile a lower clock may be faster
    than the maximum), then plans each strictly cheaper than every faster plan, up to ``T*``: the
    first plan within ``FLAT_TOLERANCE`` of the cheapest (beyond it the frontier is flat within
    measurement noise)."""
    limit = t_min * (1 + DEADLINE_TOLERANCE)
    kept = [min((p for p in plans if p.iteration_time <= limit), key=lambda p: (p.energy, p.iteration_time))]
    for plan in sorted((p for p in plans if p.iteration_time > limit), key=lambda p: (p.iteration_time, p.energy)):
        if plan.energy < kept[-1].energy:
            kept.append(plan)
    cheapest = min(p.energy for p in kept)
    end = next(i for i, p in enumerate(kept) if p.energy <= cheapest * (1 + FLAT_TOLERANCE))
    return kept[: end + 1]
