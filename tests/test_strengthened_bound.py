"""The strengthened lower bound: never above any plan's energy, never below the LP bound, and tight
where a rank's pairs of instructions cannot fill the window that a pinned rank leaves them, or that a
slower rank's next forward and backward leave them above T_min (the window floors)."""

from __future__ import annotations

from pathlib import Path

import itertools

import numpy as np
import pytest

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.exact import ExactPlanner
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.options import ClockOptions, clock_options
from perseus_lightning.core.planner import plan_frontier
from perseus_lightning.core.profile import BACKWARD, FORWARD, Profile
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.simulator import earliest_schedule
from perseus_lightning.core.slack import option_durations
from perseus_lightning.core.strengthened_bound import fitting_options, strengthened_lower_bound, window_floors
from planning_instances import iteration_time, noisy_profile
from test_planner import P2P_POWER, SYNTHETIC_SHAPES, TINY_INSTANCES, dag_of, smooth_profile, tiny_brute_force

NOISY = ["noisy-2x2", "noisy-3x2"]
"""The tiny instances with non-convex profiles (on the smooth one the bound is the LP's at most deadlines)."""
DEADLINES = (1.0, 1.005, 1.01, 1.02, 1.05, 1.1, 1.2)
"""Multiples of T_min."""


def t_min(dag: InstructionDAG, options: list[ClockOptions]) -> float:
    """Iteration time with every instruction at its fastest option."""
    return iteration_time(dag, options, np.zeros(dag.num_nodes, dtype=np.int64))


@pytest.mark.parametrize("name", NOISY)
def test_no_plan_beats_the_bound_and_the_bound_beats_the_lp(name: str) -> None:
    profile, dag = TINY_INSTANCES[name]
    options = clock_options(dag, profile.for_stages(dag.schedule.stage_ranks), P2P_POWER)
    relaxation = HullRelaxation(dag, options, P2P_POWER)
    for multiple in DEADLINES:
        deadline = multiple * t_min(dag, options)
        bound = strengthened_lower_bound(dag, options, P2P_POWER, deadline)
        assert relaxation.solve(deadline).lower_bound <= bound * (1 + 1e-9)
        assert bound <= tiny_brute_force(name).optimum(deadline) * (1 + 1e-9)


def test_pairs_that_cannot_fill_their_window_raise_the_bound_to_the_optimum() -> None:
    # Rank 1 is the slower: at T_min it is critical, and every steady-state backward of rank 0 and
    # its next forward share the window of one rank-1 forward-backward pair, which no pair of
    # rank 0's three clocks fills. Removing clocks that cannot fit changes nothing here.
    profile = smooth_profile((1110, 1260, 1410), [(0.037, 0.075), (0.04, 0.08)])
    dag = dag_of("1f1b", 2, 6)
    options = clock_options(dag, profile, P2P_POWER)
    deadline = t_min(dag, options)
    lp = HullRelaxation(dag, options, P2P_POWER).solve(deadline).lower_bound
    fitting = HullRelaxation(dag, fitting_options(dag, options, deadline), P2P_POWER).solve(deadline).lower_bound
    optimum = ExactPlanner(dag, options, P2P_POWER).solve(deadline, np.zeros(dag.num_nodes, dtype=np.int64))
    assert optimum.optimal
    bound = strengthened_lower_bound(dag, options, P2P_POWER, deadline)
    assert fitting == pytest.approx(lp, rel=1e-9)
    assert bound > lp * (1 + 1e-3)
    assert bound == pytest.approx(optimum.lower_bound, rel=1e-9)


def test_every_plan_satisfies_every_window_floor() -> None:
    # Rank 1 is the slower: rank 0's backward and next forward sit in the gap that rank 1's forward
    # and backward between them leave. Two clocks each: all 4,096 plans.
    profile = smooth_profile((1110, 1410), [(0.037, 0.075), (0.04, 0.08)])
    dag = dag_of("1f1b", 2, 3)
    options = clock_options(dag, profile, P2P_POWER)
    floors = window_floors(dag, options)
    assert floors
    tightest = np.inf
    for combination in itertools.product(*(range(len(opt.time)) for opt in options)):
        choice = np.array(combination)
        start, end = earliest_schedule(dag, option_durations(options, choice))
        for floor in floors:
            first, second = floor.pair
            before, after = floor.gap
            spent = options[first].cost[choice[first]] + options[second].cost[choice[second]]
            line = floor.intercept + floor.slope * (start[after] - end[before])
            assert spent >= line - 1e-9 * abs(line)
            tightest = min(tightest, spent - line)
    assert tightest < 1e-9  # some plan is on a line: the floors are as high as they may be


def test_window_floors_raise_the_bound_above_t_min_and_stay_below_the_optimum() -> None:
    # The pipeline of the test above with six microbatches and three clocks: above T_min the pinned
    # rank's windows widen, but rank 1's forward and backward still set rank 0's gaps.
    profile = smooth_profile((1110, 1260, 1410), [(0.037, 0.075), (0.04, 0.08)])
    dag = dag_of("1f1b", 2, 6)
    options = clock_options(dag, profile, P2P_POWER)
    for multiple in (1.005, 1.01):
        deadline = multiple * t_min(dag, options)
        lp = HullRelaxation(dag, options, P2P_POWER)
        floored = HullRelaxation(dag, options, P2P_POWER)
        floored.add_window_floors(window_floors(dag, options))
        optimum = ExactPlanner(dag, options, P2P_POWER).solve(deadline, np.zeros(dag.num_nodes, dtype=np.int64))
        assert optimum.optimal
        assert floored.solve(deadline).lower_bound > lp.solve(deadline).lower_bound * (1 + 5e-4)
        assert strengthened_lower_bound(dag, options, P2P_POWER, deadline) <= optimum.lower_bound * (1 + 1e-9)


def test_window_floors_enter_the_lp_as_its_optima_violate_them() -> None:
    # A noisy 4 x 12 pipeline: hundreds of floors, of which each optimum needs a few dozen. The
    # LP's optimum must still satisfy every one, and a fresh solve must not depend on earlier ones.
    profile = noisy_profile(4, 4, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]})
    dag = dag_of("1f1b", 4, 12)
    options = clock_options(dag, profile.for_stages(dag.schedule.stage_ranks), P2P_POWER)
    floors = window_floors(dag, options)
    floored = HullRelaxation(dag, options, P2P_POWER)
    rows_before = floored._solver.getNumRow()
    floored.add_window_floors(floors)
    hull = [opt.lower_hull() for opt in options]
    for multiple in (1.0, 1.005, 1.01, 1.03):
        deadline = multiple * t_min(dag, options)
        solution = floored.solve_afresh(deadline)
        assert solution.lower_bound >= HullRelaxation(dag, options, P2P_POWER).solve(deadline).lower_bound * (1 - 1e-12)
        added = floored._solver.getNumRow() - rows_before
        assert added < len(floors) / 4
        if multiple == 1.0:
            assert added > 0  # the plain LP's optimum there violates some floors
        # The columns: a start per node, then each node's hull segments in turn (its cost is its fastest
        # option's plus each segment's fill times its slope; the LP may pay above the hull).
        columns = np.asarray(floored._solver.getSolution().col_value)
        start, fills = columns[: dag.num_nodes], columns[dag.num_nodes :]
        cost = []
        for time, energy in hull:
            segments, fills = fills[: len(time) - 1], fills[len(time) - 1 :]
            cost.append(energy[0] + float(np.diff(energy) / np.diff(time) @ segments))
        for floor in floors:
            (first, second), (before, after) = floor.pair, floor.gap
            gap = start[after] - start[before] - solution.durations[before]
            assert cost[first] + cost[second] >= floor.intercept + floor.slope * gap - 1e-6
        fresh = HullRelaxation(dag, options, P2P_POWER)
        fresh.add_window_floors(floors)
        assert np.array_equal(fresh.solve_afresh(deadline).durations, solution.durations)


@pytest.mark.parametrize("shape", ["noisy-gpipe-3x6", "smooth-interleaved-4x8", "noisy-zero-bubble-4x8"])
def test_no_frontier_plan_of_any_schedule_beats_the_bound_at_its_own_time(shape: str) -> None:
    profile, dag = SYNTHETIC_SHAPES[shape]
    options = clock_options(dag, profile.for_stages(dag.schedule.stage_ranks), P2P_POWER)
    frontier = plan_frontier(profile, dag, P2P_POWER, exact_seconds=0)
    for plan in frontier.plans:
        assert strengthened_lower_bound(dag, options, P2P_POWER, plan.iteration_time) <= plan.energy * (1 + 1e-9)
    zero_slowdown = frontier.fastest.iteration_time
    lp = HullRelaxation(dag, options, P2P_POWER).solve(zero_slowdown).lower_bound
    assert strengthened_lower_bound(dag, options, P2P_POWER, zero_slowdown) >= lp * (1 - 1e-9)


def test_only_options_that_no_plan_can_use_are_left_out() -> None:
    profile, dag = TINY_INSTANCES["noisy-3x2"]
    options = clock_options(dag, profile, P2P_POWER)
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    for multiple in (1.0, 1.02, 1.1):
        deadline = multiple * t_min(dag, options)
        fitting = fitting_options(dag, options, deadline)
        for kept, opt in zip(fitting, options):  # a prefix: option indices keep their meaning
            assert np.array_equal(kept.time, opt.time[: len(kept.time)])
        if multiple == 1.0:
            assert sum(len(kept.time) for kept in fitting) < sum(len(opt.time) for opt in options)
        solution = ExactPlanner(dag, fitting, P2P_POWER).solve(deadline, fastest)
        assert solution.lower_bound == pytest.approx(tiny_brute_force("noisy-3x2").optimum(deadline), rel=1e-9)


def test_a_deadline_below_t_min_is_refused_with_a_fix() -> None:
    profile, dag = TINY_INSTANCES["noisy-2x2"]
    options = clock_options(dag, profile, P2P_POWER)
    with pytest.raises(PlanError, match=r"below the iteration time with every instruction at its fastest clock.*Fix: pass a deadline of at least that"):
        strengthened_lower_bound(dag, options, P2P_POWER, 0.99 * t_min(dag, options))


def test_on_the_measured_a100_profile_the_zero_slowdown_plan_respects_the_tighter_bound(shared_profile_path: Path) -> None:
    profile, dag = Profile.load(shared_profile_path), dag_of("1f1b", 8, 12)
    options = clock_options(dag, profile.for_stages(dag.schedule.stage_ranks), P2P_POWER)
    frontier = plan_frontier(profile, dag, P2P_POWER)
    deadline = frontier.fastest.iteration_time
    lp = HullRelaxation(dag, options, P2P_POWER).solve(deadline).lower_bound
    bound = strengthened_lower_bound(dag, options, P2P_POWER, deadline)
    assert bound > lp * (1 + 1e-4)  # 0.026 % (docs/planner.md)
    assert frontier.fastest.energy >= bound
