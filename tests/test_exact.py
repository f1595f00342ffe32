"""The exact MILP: optimal against brute force on tiny instances, seeded, limited, and used by the planner."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.exact import EXACT_MAX_BINARIES, ExactPlanner
from perseus_lightning.core.options import ClockOptions, clock_options, frequency_plan
from perseus_lightning.core.planner import plan_frontier
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.simulator import earliest_schedule, simulate
from perseus_lightning.core.slack import option_durations
from perseus_lightning.core.strengthened_bound import pair_cost_floors
from test_planner import P2P_POWER, TINY, TINY_INSTANCES, dag_of, smooth_profile, tiny_brute_force


def tiny_instance(name: str) -> tuple[InstructionDAG, Profile, list[ClockOptions], float]:
    """``TINY_INSTANCES[name]``'s DAG, stage profile, clock options and T_min (every node on its fastest option)."""
    profile, dag = TINY_INSTANCES[name]
    stage_profile = profile.for_stages(dag.schedule.stage_ranks)
    options = clock_options(dag, stage_profile, P2P_POWER)
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    return dag, stage_profile, options, float(earliest_schedule(dag, option_durations(options, fastest))[1].max())


@pytest.mark.parametrize("name", TINY)
def test_milp_matches_brute_force_at_every_deadline(name: str) -> None:
    dag, stage_profile, options, t_min = tiny_instance(name)
    truth = tiny_brute_force(name)
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    for formulation in ("choice", "incremental"):
        exact = ExactPlanner(dag, options, P2P_POWER, formulation)
        for deadline in np.linspace(t_min, 1.3 * t_min, 7):
            solution = exact.solve(float(deadline), fastest)
            result = simulate(dag, stage_profile, P2P_POWER, frequency_plan(options, solution.choice))
            assert solution.optimal, formulation
            assert result.iteration_time <= deadline * (1 + 1e-9)
            assert result.energy == pytest.approx(truth.optimum(float(deadline)), rel=1e-9), formulation
            assert solution.lower_bound == pytest.approx(result.energy, rel=1e-9)  # proven optimal: the bound meets it


def test_a_node_limited_solve_bounds_the_optimum_from_below() -> None:
    dag, stage_profile, options, t_min = tiny_instance("noisy-3x2")
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    deadline = 1.05 * t_min
    optimum = ExactPlanner(dag, options, P2P_POWER).solve(deadline, fastest).lower_bound  # proven (test above)
    for formulation in ("choice", "incremental"):
        solution = ExactPlanner(dag, options, P2P_POWER, formulation, max_nodes=1).solve(deadline, fastest)
        assert solution.lower_bound <= optimum * (1 + 1e-9), formulation
        assert simulate(dag, stage_profile, P2P_POWER, frequency_plan(options, solution.choice)).energy >= optimum * (1 - 1e-9), formulation


def test_an_unknown_formulation_is_refused_with_a_fix() -> None:
    profile, dag = TINY_INSTANCES["noisy-2x2"]
    with pytest.raises(PlanError, match="formulation is 'sos'.*Fix: use 'choice' or 'incremental'"):
        ExactPlanner(dag, clock_options(dag, profile, P2P_POWER), P2P_POWER, "sos")  # type: ignore[arg-type]


def test_a_limited_solve_keeps_a_feasible_plan() -> None:
    profile, dag = TINY_INSTANCES["noisy-2x2"]
    options = clock_options(dag, profile, P2P_POWER)
    seed = np.zeros(dag.num_nodes, dtype=np.int64)
    t_min = float(earliest_schedule(dag, option_durations(options, seed))[1].max())
    solution = ExactPlanner(dag, options, P2P_POWER).solve(1.1 * t_min, seed, seconds=0.0)
    assert not solution.optimal
    assert earliest_schedule(dag, option_durations(options, solution.choice))[1].max() <= 1.1 * t_min * (1 + 1e-9)


def test_the_planners_zero_slowdown_plan_is_optimal_on_small_pipelines() -> None:
    for name in TINY:
        profile, dag = TINY_INSTANCES[name]
        frontier = plan_frontier(profile, dag, P2P_POWER, exact_seconds=math.inf)
        assert frontier.fastest.energy == pytest.approx(tiny_brute_force(name).optimum(frontier.baseline_time), rel=1e-9)


def test_large_pipelines_skip_the_milp_and_zero_seconds_disables_it() -> None:
    profile = smooth_profile(range(900, 1411, 15), [(0.03, 0.06), (0.04, 0.08)])
    large = dag_of("1f1b", 2, 128)
    assert sum(len(opt.time) for opt in clock_options(large, profile, P2P_POWER)) > EXACT_MAX_BINARIES
    assert not ExactPlanner.fits(clock_options(large, profile, P2P_POWER))
    small = dag_of("1f1b", 2, 2)
    assert ExactPlanner.fits(clock_options(small, profile, P2P_POWER))
    heuristic = plan_frontier(profile, small, P2P_POWER, exact_seconds=0)
    exact = plan_frontier(profile, small, P2P_POWER, exact_seconds=math.inf)
    assert exact.fastest.energy <= heuristic.fastest.energy * (1 + 1e-12)
    with pytest.raises(PlanError, match="exact_seconds is -1.*Fix"):
        plan_frontier(profile, small, P2P_POWER, exact_seconds=-1)


@pytest.mark.parametrize("name", TINY)
def test_a_cutoff_proves_cheaper_plans_out_of_reach_or_finds_the_optimum(name: str) -> None:
    dag, stage_profile, options, t_min = tiny_instance(name)
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    exact = ExactPlanner(dag, options, P2P_POWER)  # one model for every solve: no start or cutoff may linger
    for deadline in (t_min, 1.02 * t_min, 1.1 * t_min):
        optimum = tiny_brute_force(name).optimum(deadline)
        below = exact.solve(deadline, fastest, cutoff=optimum * (1 - 1e-4))
        assert below.lower_bound == optimum * (1 - 1e-4) and not below.optimal
        np.testing.assert_array_equal(below.choice, fastest)
        above = exact.solve(deadline, fastest, cutoff=optimum * (1 + 1e-4))
        energy = simulate(dag, stage_profile, P2P_POWER, frequency_plan(options, above.choice)).energy
        assert above.optimal and energy == pytest.approx(optimum, rel=1e-9)


@pytest.mark.parametrize("name", TINY)
def test_the_strengthened_bounds_pair_rows_keep_the_milps_optimum(name: str) -> None:
    dag, stage_profile, options, t_min = tiny_instance(name)
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    for deadline in (t_min, 1.01 * t_min, 1.05 * t_min):
        fitting, floors = pair_cost_floors(dag, options, deadline)
        assert [(first, second) for first, second, _ in floors] == list(zip(dag.edge_sources.tolist(), dag.edge_targets.tolist()))
        for formulation in ("choice", "incremental"):
            exact = ExactPlanner(dag, fitting, P2P_POWER, formulation)  # the rows hold at this deadline only
            for first, second, floor in floors:
                exact.add_cost_floor([first, second], floor)
            solution = exact.solve(deadline, fastest)
            energy = simulate(dag, stage_profile, P2P_POWER, frequency_plan(options, solution.choice)).energy
            assert solution.optimal, formulation
            assert energy == pytest.approx(tiny_brute_force(name).optimum(deadline), rel=1e-9), formulation
