"""The frequency planner: clock options, the LP bound, slack reclamation and the frontier.

Tiny instances are checked against brute force: every plan over every profiled clock of every
instruction (Pareto-dominated clocks included), each simulated exactly.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import itertools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from perseus_lightning.core import planner, rounding
from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.options import ClockOptions, clock_options
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.planner import MAX_SPACING, Frontier, FrontierPlan, plan_frontier
from perseus_lightning.core.profile import BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, Profile
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.rounding import RoundingJob, RoundingPool
from perseus_lightning.core.simulator import earliest_schedule, latest_starts, simulate
from perseus_lightning.core.slack import option_durations, reclaim_slack, reclaim_slack_by_value
from planning_instances import dag_of, iteration_time, noisy_profile, total_cost

P2P_POWER = 83.64
"""Measured A100 blocking power (W)."""
SELECT_TOLERANCE = 1e-9
"""Relative slack on deadlines, as :meth:`Frontier.select` allows."""
MAX_BRUTE_FORCE_PLANS = 100_000
BRUTE_FORCE_GAP = 0.02
"""The plan selected for any deadline is within this fraction of the brute-force optimum (measured worst: 1.58 %,
at deadlines between two plans of the noisy 2x2 instance)."""
BRUTE_FORCE_GAP_AT_PLAN_TIMES = 0.005
"""Each plan is within this fraction of the brute-force optimum at its own iteration time (measured worst: 0.41 %)."""


# --------------------------------------------------------------------------- profiles
def smooth_profile(frequencies: Sequence[int], stage_times: Sequence[tuple[float, float]]) -> Profile:
    """The noise-free A100-like model at ``frequencies``; below its voltage floor (~1057 MHz) a clock is
    Pareto-dominated by any faster clock under the floor."""
    return dataclasses.replace(A100_LIKE, frequencies=tuple(frequencies)).profile(stage_times)


# --------------------------------------------------------------------------- brute force
@dataclass(frozen=True)
class BruteForce:
    """Exact iteration time and energy of every plan of a tiny instance."""

    times: np.ndarray
    energies: np.ndarray

    def optimum(self, deadline: float) -> float:
        """Least energy of any plan finishing by ``deadline``."""
        return float(self.energies[self.times <= deadline * (1 + SELECT_TOLERANCE)].min())


def brute_force(profile: Profile, dag: InstructionDAG) -> BruteForce:
    stage_profile = profile.for_stages(dag.schedule.stage_ranks)
    clocks = [stage_profile.get(ins.stage, ins.kind).frequencies for ins in dag.instructions]
    assert math.prod(map(len, clocks)) <= MAX_BRUTE_FORCE_PLANS
    runs = [simulate(dag, profile, P2P_POWER, FrequencyPlan(combo)) for combo in itertools.product(*clocks)]
    return BruteForce(np.array([r.iteration_time for r in runs]), np.array([r.energy for r in runs]))


@dataclass(frozen=True)
class TinyInstance:
    profile: Profile
    dag: InstructionDAG
    exact: BruteForce
    relaxation: HullRelaxation
    frontier: Frontier

    @property
    def t_star_lp(self) -> float:
        return self.relaxation.min_energy().deadline


TINY_INSTANCES: dict[str, tuple[Profile, InstructionDAG]] = {
    # 4 clocks each, 900 MHz Pareto-dominated (by 1050 MHz): 4^8 plans.
    "smooth-2x2": (smooth_profile((900, 1050, 1260, 1410), [(0.03, 0.06), (0.04, 0.08)]), dag_of("1f1b", 2, 2)),
    # Non-convex noisy energy, 4 clocks each: 4^8 plans.
    "noisy-2x2": (noisy_profile(0, 2, {FORWARD: (900, 1110, 1260, 1410), BACKWARD: (900, 1110, 1260, 1410)}), dag_of("1f1b", 2, 2)),
    # 3 stages: forwards at 3 clocks, backwards at 2: 3^6 * 2^6 plans.
    "noisy-3x2": (noisy_profile(3, 3, {FORWARD: (1005, 1200, 1410), BACKWARD: (1200, 1410)}), dag_of("1f1b", 3, 2)),
}


TINY = list(TINY_INSTANCES)


@functools.cache
def tiny_brute_force(name: str) -> BruteForce:
    """:func:`brute_force` of ``TINY_INSTANCES[name]``, once per test session (seconds each)."""
    return brute_force(*TINY_INSTANCES[name])


@pytest.fixture(scope="module")
def tiny(request: pytest.FixtureRequest) -> TinyInstance:
    profile, dag = TINY_INSTANCES[request.param]
    relaxation = HullRelaxation(dag, clock_options(dag, profile, P2P_POWER), P2P_POWER)
    frontier = plan_frontier(profile, dag, P2P_POWER, exact_seconds=math.inf)
    return TinyInstance(profile, dag, tiny_brute_force(request.param), relaxation, frontier)


# --------------------------------------------------------------------------- ClockOptions
def options_of(profile: Profile) -> list[ClockOptions]:
    return [ClockOptions.from_profile(prof, P2P_POWER) for _, prof in profile.items()]


OPTION_PROFILES = {
    "smooth": smooth_profile(A100_LIKE.frequencies, [(0.05, 0.1)]),
    "noisy": noisy_profile(11, 3, {FORWARD: A100_LIKE.frequencies, BACKWARD: A100_LIKE.frequencies}),
}


@pytest.mark.parametrize("profile_name", list(OPTION_PROFILES))
def test_clock_options_are_the_pareto_clocks_sorted_fastest_first(profile_name: str) -> None:
    for _, prof in OPTION_PROFILES[profile_name].items():
        opt = ClockOptions.from_profile(prof, P2P_POWER)
        assert set(opt.frequencies.tolist()) == set(prof.pareto_frequencies(P2P_POWER))
        assert np.all(np.diff(opt.time) > 0) and np.all(np.diff(opt.cost) < 0)
        for f, t, c in zip(opt.frequencies.tolist(), opt.time, opt.cost):
            time, energy = prof.at(f)
            assert (t, c) == (time, energy - P2P_POWER * time)
        assert opt.time[0] == prof.time.min()
        assert opt.cost[-1] == (prof.energy - P2P_POWER * prof.time).min()
        assert len(opt.time) < len(prof.frequencies)  # the lowest clocks are dominated


def test_clock_options_of_a_dag_share_one_object_per_stage_and_kind() -> None:
    profile = OPTION_PROFILES["noisy"]
    dag = dag_of("1f1b", 3, 4)
    options = clock_options(dag, profile, P2P_POWER)
    for ins, opt in zip(dag.instructions, options):
        assert set(opt.frequencies.tolist()) == set(profile.get(ins.stage, ins.kind).pareto_frequencies(P2P_POWER))
    assert len({id(opt) for opt in options}) == 6


HAND_OPTIONS = ClockOptions(
    frequencies=np.array([1400, 1300, 1200, 1100]),
    time=np.array([1.0, 2.0, 3.0, 4.0]),
    cost=np.array([10.0, 9.0, 5.0, 4.5]),
)


@pytest.mark.parametrize(
    ("duration", "expected"),
    [(0.5, 0), (1.0, 0), (1.999, 0), (2.0, 1), (2.5, 1), (3.0, 2), (3.99, 2), (4.0, 3), (100.0, 3)],
)
def test_cheapest_within_picks_the_slowest_option_that_fits(duration: float, expected: int) -> None:
    assert HAND_OPTIONS.cheapest_within(duration) == expected


def test_lower_hull_of_a_hand_example_skips_the_point_above_it() -> None:
    # (2, 9) lies above the segment from (1, 10) to (3, 5), whose value at 2 is 7.5.
    times, costs = HAND_OPTIONS.lower_hull()
    assert times.tolist() == [1.0, 3.0, 4.0]
    assert costs.tolist() == [10.0, 5.0, 4.5]


def test_lower_hull_drops_collinear_points() -> None:
    opt = ClockOptions(np.array([3, 2, 1]), np.array([1.0, 2.0, 3.0]), np.array([6.0, 4.0, 2.0]))
    times, _ = opt.lower_hull()
    assert times.tolist() == [1.0, 3.0]


@pytest.mark.parametrize("profile_name", list(OPTION_PROFILES))
def test_lower_hull_is_convex_made_of_options_and_below_every_option(profile_name: str) -> None:
    some_option_above_hull = False
    for opt in options_of(OPTION_PROFILES[profile_name]):
        times, costs = opt.lower_hull()
        options = set(zip(opt.time.tolist(), opt.cost.tolist()))
        assert set(zip(times.tolist(), costs.tolist())) <= options
        assert (times[0], costs[0]) == (opt.time[0], opt.cost[0])
        assert (times[-1], costs[-1]) == (opt.time[-1], opt.cost[-1])
        slopes = np.diff(costs) / np.diff(times)
        assert np.all(np.diff(slopes) > 0)
        on_hull = np.interp(opt.time, times, costs)
        assert np.all(opt.cost >= on_hull - 1e-9 * np.abs(on_hull))
        some_option_above_hull |= bool(np.any(opt.cost > on_hull + 1e-9))
    if profile_name == "noisy":
        assert some_option_above_hull  # noise makes the options non-convex


# --------------------------------------------------------------------------- LP relaxation
@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_relaxation_bounds_the_brute_force_optimum_up_to_t_star(tiny: TinyInstance) -> None:
    t_min = tiny.frontier.baseline_time
    for deadline in np.linspace(t_min, tiny.t_star_lp, 9):
        assert tiny.relaxation.solve(deadline).lower_bound <= tiny.exact.optimum(deadline) * (1 + 1e-9)


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_relaxation_bound_is_non_increasing_up_to_t_star(tiny: TinyInstance) -> None:
    t_star = tiny.t_star_lp
    assert t_star > tiny.frontier.baseline_time
    bounds = [tiny.relaxation.solve(d).lower_bound for d in np.linspace(tiny.frontier.baseline_time, t_star, 15)]
    assert np.all(np.diff(bounds) <= 1e-9 * abs(bounds[0]))
    assert bounds[0] > bounds[-1]
    assert tiny.relaxation.min_energy().lower_bound == pytest.approx(bounds[-1], rel=1e-9)


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_relaxation_bounds_plans_finishing_by_a_deadline_past_t_star(tiny: TinyInstance) -> None:
    deadline = 1.05 * tiny.t_star_lp
    assert tiny.relaxation.solve(deadline).lower_bound <= tiny.exact.optimum(deadline) * (1 + 1e-9)


def test_other_optima_are_optimal_distinct_and_leave_the_lp_as_built() -> None:
    # 4 x 12 1F1B on a noisy profile: stages share their options, so the LP's optimum is a face.
    profile = noisy_profile(3, 4, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]})
    dag = dag_of("1f1b", 4, 12)
    options = clock_options(dag, profile.for_stages(dag.schedule.stage_ranks), P2P_POWER)
    relaxation = HullRelaxation(dag, options, P2P_POWER)
    deadline = 1.004 * simulate(dag, profile, P2P_POWER).iteration_time
    warm = relaxation.solve(deadline * 0.999)  # the model now holds a basis from another deadline
    optima = relaxation.other_optima(deadline, 6, seed=7)
    fresh = HullRelaxation(dag, options, P2P_POWER).solve(deadline)
    assert len(optima) == 6 and np.array_equal(optima[0], fresh.durations)  # solved afresh, not warm-started
    assert len({durations.tobytes() for durations in optima}) >= 4
    idle = P2P_POWER * dag.num_ranks * deadline
    for durations in optima:
        hull_cost = sum(float(np.interp(d, *opt.lower_hull())) for opt, d in zip(options, durations.tolist()))
        assert hull_cost + idle == pytest.approx(fresh.lower_bound, rel=1e-8)
        assert earliest_schedule(dag, durations)[1].max() <= deadline * (1 + 1e-9)
        assert all(opt.time[0] * (1 - 1e-9) <= d <= opt.time[-1] * (1 + 1e-9) for opt, d in zip(options, durations.tolist()))
    again = relaxation.other_optima(deadline, 6, seed=7)
    assert all(np.array_equal(a, b) for a, b in zip(optima, again))
    assert relaxation.solve(deadline * 0.999).lower_bound == pytest.approx(warm.lower_bound, rel=1e-12)
    assert relaxation.solve(deadline).lower_bound == pytest.approx(fresh.lower_bound, rel=1e-12)


# --------------------------------------------------------------------------- frontier vs brute force
@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_frontier_plans_are_near_the_brute_force_optimum(tiny: TinyInstance) -> None:
    frontier = tiny.frontier
    for point in frontier.plans:  # at its own iteration time
        assert point.energy <= tiny.exact.optimum(point.iteration_time) * (1 + BRUTE_FORCE_GAP_AT_PLAN_TIMES)
    for deadline in np.linspace(frontier.baseline_time, frontier.t_star, 200):
        chosen = frontier.select(deadline)
        best = tiny.exact.optimum(deadline)
        assert chosen.iteration_time <= deadline * (1 + SELECT_TOLERANCE)
        assert chosen.energy >= best * (1 - 1e-9), "a plan beat brute force: the simulator or the enumeration is wrong"
        assert chosen.energy <= best * (1 + BRUTE_FORCE_GAP), f"deadline {deadline}: {chosen.energy} J vs optimum {best} J"


@pytest.mark.parametrize("tiny", TINY, indirect=True)
def test_gaps_wider_than_max_spacing_hold_no_cheaper_plan(tiny: TinyInstance) -> None:
    """Where neighbouring plans are further apart than ``MAX_SPACING``, no plan cheaper than the faster
    one finishes in between (otherwise the frontier missed it)."""
    plans = tiny.frontier.plans
    for faster, slower in zip(plans, plans[1:]):
        if slower.iteration_time - faster.iteration_time <= MAX_SPACING * tiny.frontier.baseline_time:
            continue
        # Strictly inside, beyond float noise: other orders of the same sums give the ends' times too.
        inside = (tiny.exact.times > faster.iteration_time * (1 + 1e-9)) & (tiny.exact.times < slower.iteration_time * (1 - 1e-9))
        assert not np.any(tiny.exact.energies[inside] < faster.energy * (1 - 1e-9)), (faster, slower)


@pytest.mark.parametrize(
    "tiny", TINY, indirect=True
)
def test_stored_lower_bounds_are_below_the_brute_force_optimum(tiny: TinyInstance) -> None:
    for point in tiny.frontier.plans:
        assert point.lower_bound <= tiny.exact.optimum(point.iteration_time) * (1 + 1e-9), point


# --------------------------------------------------------------------------- slack reclamation
@pytest.fixture(scope="module")
def slack_instance() -> tuple[InstructionDAG, list[ClockOptions]]:
    profile = noisy_profile(5, 3, {FORWARD: A100_LIKE.frequencies[::4], BACKWARD: A100_LIKE.frequencies[::4]})
    dag = dag_of("1f1b", 3, 4)
    return dag, clock_options(dag, profile, P2P_POWER)


def random_start(dag: InstructionDAG, options: list[ClockOptions], seed: int, headroom: float) -> tuple[np.ndarray, float]:
    """A random option per node, and a deadline ``headroom`` times its iteration time."""
    rng = np.random.default_rng(seed)
    choice = np.array([rng.integers(len(opt.time)) for opt in options])
    return choice, iteration_time(dag, options, choice) * headroom


@pytest.mark.parametrize("reclaim", [reclaim_slack, reclaim_slack_by_value])
@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("headroom", [1.0, 1.02, 1.15])
def test_reclaim_slack_keeps_the_deadline_never_costs_more_and_is_idempotent(
    slack_instance: tuple[InstructionDAG, list[ClockOptions]], seed: int, headroom: float, reclaim: Callable[..., np.ndarray | None]
) -> None:
    dag, options = slack_instance
    choice, deadline = random_start(dag, options, seed, headroom)
    reclaimed = reclaim(dag, options, choice, deadline)
    assert reclaimed is not None
    assert iteration_time(dag, options, reclaimed) <= deadline * (1 + 1e-9)
    for opt, before, after in zip(options, choice.tolist(), reclaimed.tolist()):
        assert opt.cost[after] <= opt.cost[before]
    assert np.array_equal(reclaim(dag, options, reclaimed, deadline), reclaimed)
    if headroom > 1.1:
        assert total_cost(options, reclaimed) < total_cost(options, choice)
    assert reclaim(dag, options, choice, deadline / headroom * 0.99) is None  # the choice itself misses it


def by_value_by_definition(dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray, deadline: float) -> np.ndarray:
    """Reclamation by value with the whole schedule recomputed after every move."""
    choice = choice.copy()
    while True:
        durations = option_durations(options, choice)
        start, _ = earliest_schedule(dag, durations)
        latest_finish = latest_starts(dag, durations, deadline) + durations
        moves = []
        for node, opt in enumerate(options):
            current = int(choice[node])
            target = opt.cheapest_within((latest_finish[node] - start[node]) * (1 + 1e-12))
            if target > current:
                moves.append(((opt.cost[current] - opt.cost[target]) / (opt.time[target] - opt.time[current]), -node, target))
        if not moves:
            return choice
        _, node, target = max(moves)
        choice[-node] = target


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("headroom", [1.0, 1.02, 1.15])
def test_reclaim_slack_by_value_updates_its_windows_as_recomputing_them_would(
    slack_instance: tuple[InstructionDAG, list[ClockOptions]], seed: int, headroom: float
) -> None:
    dag, options = slack_instance
    choice, deadline = random_start(dag, options, seed, headroom)
    expected = by_value_by_definition(dag, options, choice, deadline)
    assert np.array_equal(reclaim_slack_by_value(dag, options, choice, deadline), expected)


@pytest.mark.parametrize("forward_saving, by_value", [(1.0, [1, 0]), (0.2, [0, 1])])
def test_backward_reclamation_slows_the_last_instruction_by_value_the_one_that_saves_more_per_second(
    forward_saving: float, by_value: list[int]
) -> None:
    # One rank, forward then backward, two clocks each, both 10 ms slower at the slower clock (which
    # saves forward_saving J, or 0.5 J on the backward); the slack fits one slower clock, not both.
    dag = dag_of("1f1b", 1, 1)
    forward = ClockOptions(np.array([1410, 1200]), np.array([0.10, 0.11]), np.array([10.0, 10.0 - forward_saving]))
    backward = ClockOptions(np.array([1410, 1200]), np.array([0.20, 0.21]), np.array([20.0, 19.5]))
    options = [forward, backward]
    fastest = np.zeros(2, dtype=np.int64)
    deadline = iteration_time(dag, options, fastest) + 0.015
    assert reclaim_slack(dag, options, fastest, deadline).tolist() == [0, 1]
    assert reclaim_slack_by_value(dag, options, fastest, deadline).tolist() == by_value


def test_reclaim_slack_slows_non_critical_instructions_at_zero_slowdown(
    slack_instance: tuple[InstructionDAG, list[ClockOptions]],
) -> None:
    dag, options = slack_instance
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    t_min = iteration_time(dag, options, fastest)
    reclaimed = reclaim_slack(dag, options, fastest, t_min)
    assert iteration_time(dag, options, reclaimed) == pytest.approx(t_min, rel=1e-12)
    assert np.count_nonzero(reclaimed) > 0
    assert total_cost(options, reclaimed) < total_cost(options, fastest)


def test_hull_jumps_never_cost_more_and_find_cheaper_plans_where_the_plan_is_far_from_the_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # JUMP_ABOVE(_AT_T_MIN) = 0: every deadline gets hull jumps; inf: none does.
    profile = noisy_profile(3, 4, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]})
    dag = dag_of("1f1b", 4, 16)
    plans = {}
    for jump_above in (math.inf, 0.0):
        monkeypatch.setattr(rounding, "JUMP_ABOVE", jump_above)
        monkeypatch.setattr(rounding, "JUMP_ABOVE_AT_T_MIN", jump_above)
        sweep = planner._Sweep(profile, dag, P2P_POWER, 0)
        t_min = sweep.baseline.iteration_time
        stretches = (1.0, 1.01, 1.03, 1.08)
        for stretch, plan in zip(stretches, sweep.plan_each(RoundingPool(sweep.rounder), [(t_min * s, None) for s in stretches])):
            assert plan.iteration_time <= t_min * stretch * (1 + 1e-9)
        plans[jump_above] = np.array([p.energy for p in sweep.found])
    assert np.all(plans[0.0] <= plans[math.inf] * (1 + 1e-12))
    assert np.any(plans[0.0] < plans[math.inf] * (1 - 1e-6))


def test_the_sweep_rounds_only_the_t_min_deadline_as_zero_slowdown_and_restarts_only_near_it() -> None:
    profile = noisy_profile(3, 4, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]})
    sweep = planner._Sweep(profile, dag_of("1f1b", 4, 8), P2P_POWER, 3)
    t_min = sweep.baseline.iteration_time
    seen: list[RoundingJob] = []

    class Recording(RoundingPool):
        def map(self, jobs):
            jobs = list(jobs)
            seen.extend(jobs)
            return super().map(jobs)

    stretches = (1.0, 1.004, 1 + planner.RESTART_WITHIN, 1 + 1.5 * planner.RESTART_WITHIN)
    list(sweep.plan_each(Recording(sweep.rounder), [(t_min * s, None) for s in stretches]))
    assert [job.zero_slowdown for job in seen] == [True, False, False, False]
    assert [job.restarts for job in seen] == [3, 3, 3, 0]


# --------------------------------------------------------------------------- frontier invariants
@dataclass(frozen=True)
class Planned:
    profile: Profile
    dag: InstructionDAG
    frontier: Frontier


REAL_A100 = "a100-8x12"
IMBALANCED = [(0.05, 0.1), (0.03, 0.07), (0.06, 0.11), (0.04, 0.09)]
SYNTHETIC_SHAPES: dict[str, tuple[Profile, InstructionDAG]] = {
    "smooth-balanced-4x8": (A100_LIKE.profile([(0.05, 0.1)] * 4), dag_of("1f1b", 4, 8)),
    "smooth-imbalanced-4x8": (A100_LIKE.profile(IMBALANCED), dag_of("1f1b", 4, 8)),
    "noisy-4x8": (noisy_profile(1, 4, {FORWARD: A100_LIKE.frequencies, BACKWARD: A100_LIKE.frequencies}), dag_of("1f1b", 4, 8)),
    "noisy-gpipe-3x6": (
        noisy_profile(2, 3, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]}), dag_of("gpipe", 3, 6)
    ),
    "smooth-interleaved-4x8": (A100_LIKE.profile(IMBALANCED), dag_of("interleaved-1f1b", 4, 8, virtual_stages=2)),
    "noisy-zero-bubble-4x8": (
        noisy_profile(4, 4, {kind: A100_LIKE.frequencies[::3] for kind in (FORWARD, BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT)}),
        dag_of("zero-bubble", 4, 8, split=True),
    ),
}
SHAPES = [*SYNTHETIC_SHAPES, REAL_A100]


@pytest.fixture(scope="module")
def planned(request: pytest.FixtureRequest) -> Planned:
    if request.param == REAL_A100:
        profile, dag = Profile.load(request.getfixturevalue("shared_profile_path")), dag_of("1f1b", 8, 12)
    else:
        profile, dag = SYNTHETIC_SHAPES[request.param]
    # No time limit on the exact solves (only node limits), so the result does not depend on the machine's speed.
    return Planned(profile, dag, plan_frontier(profile, dag, P2P_POWER, exact_seconds=math.inf))


@pytest.mark.parametrize("planned", SHAPES, indirect=True)
def test_baseline_is_max_clock(planned: Planned) -> None:
    baseline = simulate(planned.dag, planned.profile, P2P_POWER)
    assert (planned.frontier.baseline_time, planned.frontier.baseline_energy) == (baseline.iteration_time, baseline.energy)


@pytest.mark.parametrize("planned", SHAPES, indirect=True)
def test_every_plan_saves_energy(planned: Planned) -> None:
    frontier = planned.frontier
    assert len(frontier.plans) >= 2
    assert all(p.energy <= frontier.baseline_energy for p in frontier.plans)
    assert frontier.fastest.energy < frontier.baseline_energy


@pytest.mark.parametrize("planned", SHAPES, indirect=True)
def test_frontier_energy_falls_strictly_as_time_rises(planned: Planned) -> None:
    times = np.array([p.iteration_time for p in planned.frontier.plans])
    energies = np.array([p.energy for p in planned.frontier.plans])
    assert np.all(np.diff(times) > 0)
    assert np.all(np.diff(energies) < 0)


@pytest.mark.parametrize("planned", SHAPES, indirect=True)
def test_fastest_plan_has_no_slowdown(planned: Planned) -> None:
    assert planned.frontier.fastest.iteration_time <= planned.frontier.baseline_time * (1 + 1e-6)


@pytest.mark.parametrize("planned", SHAPES, indirect=True)
def test_neighbouring_plans_are_close(planned: Planned) -> None:
    times = np.array([p.iteration_time for p in planned.frontier.plans])
    assert np.diff(times).max() <= MAX_SPACING * planned.frontier.baseline_time * (1 + 1e-9)


@pytest.mark.parametrize("planned", SHAPES, indirect=True)
def test_no_plan_uses_a_dominated_clock(planned: Planned) -> None:
    stage_profile = planned.profile.for_stages(planned.dag.schedule.stage_ranks)
    allowed = {key: set(prof.pareto_frequencies(P2P_POWER)) for key, prof in stage_profile.items()}
    for point in planned.frontier.plans:
        for ins, f in zip(planned.dag.instructions, point.plan.frequencies):
            assert f in allowed[(ins.stage, ins.kind)], f"{ins} at {f} MHz"


@pytest.mark.parametrize("planned", SHAPES, indirect=True)
def test_stored_time_and_energy_are_the_simulated_ones(planned: Planned) -> None:
    for point in planned.frontier.plans:
        result = simulate(planned.dag, planned.profile, P2P_POWER, point.plan)
        assert point.iteration_time == pytest.approx(result.iteration_time, rel=1e-12)
        assert point.energy == pytest.approx(result.energy, rel=1e-12)


@pytest.mark.parametrize("planned", SHAPES, indirect=True)
def test_no_plan_beats_its_lower_bound(planned: Planned) -> None:
    for point in planned.frontier.plans:
        assert point.lower_bound is not None
        assert point.energy >= point.lower_bound * (1 - 1e-9)


@pytest.mark.parametrize("planned", [REAL_A100], indirect=True)
def test_zero_slowdown_saving_on_the_measured_a100_profile(planned: Planned) -> None:
    frontier = planned.frontier
    assert frontier.baseline_time == pytest.approx(2.8365, rel=1e-4)
    assert frontier.fastest.iteration_time <= frontier.baseline_time * (1 + 1e-6)
    assert 1 - frontier.fastest.energy / frontier.baseline_energy >= 0.155
    assert frontier.plans[-1].energy < frontier.fastest.energy


def test_restarts_lower_the_largest_gaps_on_the_measured_a40_profile(shared_a40_profile_path: Path) -> None:
    # A40, 8 x 12: at 1.004 T_min the warm-started LP vertex rounds to 0.43 % above the bound, others to 0.35 %.
    profile, dag = Profile.load(shared_a40_profile_path), dag_of("1f1b", 8, 12)
    without = plan_frontier(profile, dag, 70.38, exact_seconds=0, restarts=0)
    default = plan_frontier(profile, dag, 70.38, exact_seconds=0)
    assert default.baseline_time == without.baseline_time

    def largest_gap(frontier: Frontier) -> float:
        relaxation = HullRelaxation(dag, clock_options(dag, profile.for_stages(dag.schedule.stage_ranks), 70.38), 70.38)
        return max(p.energy / relaxation.solve(p.iteration_time).lower_bound - 1 for p in frontier.plans)

    assert default.fastest.energy < without.fastest.energy * (1 - 1e-4)
    assert largest_gap(default) < largest_gap(without) - 5e-4


# --------------------------------------------------------------------------- select / for_straggler
def hand_frontier(points: Sequence[tuple[float, float]]) -> Frontier:
    """A frontier of made-up (time, energy) plans on a 2x2 1F1B DAG."""
    dag = dag_of("1f1b", 2, 2)
    plans = [FrontierPlan(t, e, FrequencyPlan((1000 + k,) * dag.num_nodes)) for k, (t, e) in enumerate(points)]
    return Frontier(dag, P2P_POWER, (1.0, 12.0), plans)


def test_select_returns_the_cheapest_plan_that_finishes_in_time() -> None:
    frontier = hand_frontier([(1.2, 9.0), (1.0, 10.0), (1.1, 8.0)])  # unsorted, not Pareto
    assert [p.iteration_time for p in frontier.plans] == [1.0, 1.1, 1.2]
    assert frontier.select(1.05).energy == 10.0
    assert frontier.select(1.1).energy == 8.0  # a plan finishing exactly at the deadline fits
    assert frontier.select(1.3).energy == 8.0  # the cheapest, not the slowest
    assert frontier.select(0.9) is frontier.fastest  # nothing fits: the fastest


def test_for_straggler_plans_for_min_of_straggler_time_and_t_star() -> None:
    frontier = hand_frontier([(1.0, 10.0), (1.1, 9.0), (1.2, 8.0)])
    assert frontier.t_star == 1.2
    assert frontier.for_straggler(1.15).energy == 9.0
    assert frontier.for_straggler(5.0).energy == 8.0
    assert frontier.for_straggler(0.5) is frontier.fastest


@pytest.mark.parametrize("planned", ["smooth-imbalanced-4x8"], indirect=True)
def test_select_on_a_planned_frontier(planned: Planned) -> None:
    frontier = planned.frontier
    for factor in (1.0, 1.013, 1.05, 1.1, 2.0):
        deadline = factor * frontier.baseline_time
        chosen = frontier.select(deadline)
        fitting = [p.energy for p in frontier.plans if p.iteration_time <= deadline]
        assert chosen.energy == min(fitting)
        assert frontier.for_straggler(deadline) is frontier.select(min(deadline, frontier.t_star))


# --------------------------------------------------------------------------- persistence and Zeus
SCHEDULE_VARIANTS = {
    "1f1b": (A100_LIKE.profile(IMBALANCED[:3]), dag_of("1f1b", 3, 6)),
    "interleaved-1f1b-V2": (A100_LIKE.profile(IMBALANCED), dag_of("interleaved-1f1b", 4, 8, virtual_stages=2)),
    "zero-bubble-split": (SYNTHETIC_SHAPES["noisy-zero-bubble-4x8"][0], dag_of("zero-bubble", 4, 8, split=True)),
}


@pytest.mark.parametrize("variant", list(SCHEDULE_VARIANTS))
def test_frontier_save_load_round_trip(variant: str, tmp_path: Path) -> None:
    profile, dag = SCHEDULE_VARIANTS[variant]
    frontier = plan_frontier(profile, dag, P2P_POWER)
    assert len(frontier.plans) >= 2
    assert frontier.fastest.energy < frontier.baseline_energy
    path = tmp_path / "frontier.json"
    frontier.save(path)
    loaded = Frontier.load(path)
    assert loaded.dag.schedule.name == dag.schedule.name
    assert loaded.dag.schedule.actions() == dag.schedule.actions()
    assert loaded.dag.schedule.stage_ranks == dag.schedule.stage_ranks
    assert (loaded.p2p_power, loaded.baseline_time, loaded.baseline_energy) == (
        P2P_POWER, frontier.baseline_time, frontier.baseline_energy
    )
    assert [(p.iteration_time, p.energy, p.lower_bound, p.plan) for p in loaded.plans] == [
        (p.iteration_time, p.energy, p.lower_bound, p.plan) for p in frontier.plans
    ]
    for point in loaded.plans:  # the loaded DAG simulates the loaded plans to the stored numbers
        assert simulate(loaded.dag, profile, P2P_POWER, point.plan).energy == pytest.approx(point.energy, rel=1e-12)


@pytest.fixture(scope="module")
def zeus_frontier() -> Frontier:
    profile, dag = SCHEDULE_VARIANTS["1f1b"]
    return plan_frontier(profile, dag, P2P_POWER)


def one_f_one_b_kinds(stage: int, num_stages: int, num_microbatches: int) -> list[str]:
    warmup = min(num_stages - stage - 1, num_microbatches)
    return [FORWARD] * warmup + [FORWARD, BACKWARD] * (num_microbatches - warmup) + [BACKWARD] * warmup


def test_write_zeus_files_list_each_stage_in_1f1b_order_slowest_plan_first(zeus_frontier: Frontier, tmp_path: Path) -> None:
    written = zeus_frontier.write_zeus(tmp_path / "zeus")
    names = sorted(p.name for p in (tmp_path / "zeus").iterdir())
    assert names == [f"freqs_pipeline_{i:05d}.py" for i in range(len(zeus_frontier.plans))]
    assert sorted(p.name for p in written) == names
    dag = zeus_frontier.dag
    parsed = [ast.literal_eval((tmp_path / "zeus" / name).read_text()) for name in names]
    for stages, point in zip(parsed, reversed(zeus_frontier.plans)):
        assert isinstance(stages, list) and len(stages) == 3
        for stage, entries in enumerate(stages):
            assert all(isinstance(entry, tuple) and len(entry) == 2 for entry in entries)
            assert [kind for kind, _ in entries] == one_f_one_b_kinds(stage, 3, 6)
            expected = [point.plan.frequencies[node] for node in dag.rank_nodes(stage)]
            assert [freq for _, freq in entries] == expected
    assert parsed[0] != parsed[-1]
    slowest_sum = sum(f for stage in parsed[0] for _, f in stage)
    fastest_sum = sum(f for stage in parsed[-1] for _, f in stage)
    assert slowest_sum < fastest_sum


@pytest.mark.parametrize(("name", "virtual"), [("gpipe", 1), ("interleaved-1f1b", 2)])
def test_write_zeus_refuses_other_schedules(name: str, virtual: int, tmp_path: Path) -> None:
    dag = dag_of(name, 4, 8, virtual_stages=virtual)
    frontier = plan_frontier(A100_LIKE.profile(IMBALANCED), dag, P2P_POWER, points=2)
    with pytest.raises(PlanError, match="synchronous 1F1B only.*Fix:"):
        frontier.write_zeus(tmp_path / "zeus")
    assert not (tmp_path / "zeus").exists()


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("kwargs", "phrase"), [({"points": 0}, "points is 0"), ({"step": 0}, "step is 0"),
                                                ({"step": -0.01}, "step is -0.01"), ({"restarts": -1}, "restarts is -1")])
def test_plan_frontier_rejects_bad_sweep_arguments(kwargs: dict[str, float], phrase: str) -> None:
    profile, dag = SCHEDULE_VARIANTS["1f1b"]
    with pytest.raises(PlanError, match=f"{phrase}.*Fix:"):
        plan_frontier(profile, dag, P2P_POWER, **kwargs)


def test_points_bounds_the_number_of_plans() -> None:
    profile, dag = SCHEDULE_VARIANTS["1f1b"]
    frontier = plan_frontier(profile, dag, P2P_POWER, points=3)
    assert 2 <= len(frontier.plans) <= 3
    assert frontier.fastest.iteration_time <= frontier.baseline_time * (1 + 1e-6)


@pytest.mark.parametrize(
    ("content", "phrase"),
    [
        (None, "no such frontier file"),
        ("{not json", "not valid JSON"),
        (json.dumps({"plans": []}), "not a frontier file"),
        (json.dumps([1, 2]), "not a frontier file"),
    ],
)
def test_frontier_load_errors_say_how_to_fix(content: str | None, phrase: str, tmp_path: Path) -> None:
    path = tmp_path / "frontier.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PlanError, match=f"{phrase}.*Fix:"):
        Frontier.load(path)


def test_frontier_load_rejects_another_version(zeus_frontier: Frontier, tmp_path: Path) -> None:
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps({**zeus_frontier.to_dict(), "version": 99}))
    with pytest.raises(PlanError, match="frontier version 99, this release reads 1. Fix: re-plan"):
        Frontier.load(path)
