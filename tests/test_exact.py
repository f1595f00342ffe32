"""The exact MILP: optimal against brute force on tiny instances, seeded, limited, and used by the planner."""

from __future__ import annotations

import math

import numpy as np
import pytest

from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.exact import EXACT_MAX_BINARIES, ExactPlanner
from perseus_lightning.core.options import clock_options
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.planner import plan_frontier
from perseus_lightning.core.simulator import earliest_schedule, simulate
from perseus_lightning.core.slack import option_durations
from test_planner import P2P_POWER, TINY, TINY_INSTANCES, brute_force, dag_of, smooth_profile


@pytest.mark.parametrize("name", TINY)
def test_milp_matches_brute_force_at_every_deadline(name: str) -> None:
    profile, dag = TINY_INSTANCES[name]
    stage_profile = profile.for_stages(dag.schedule.stage_ranks)
    options = clock_options(dag, stage_profile, P2P_POWER)
    exact, truth = ExactPlanner(dag, options, P2P_POWER), brute_force(profile, dag)
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    t_min = float(earliest_schedule(dag, option_durations(options, fastest))[1].max())
    for deadline in np.linspace(t_min, 1.3 * t_min, 7):
        solution = exact.solve(float(deadline), fastest)
        plan = FrequencyPlan(tuple(int(opt.frequencies[k]) for opt, k in zip(options, solution.choice.tolist())))
        result = simulate(dag, stage_profile, P2P_POWER, plan)
        assert solution.optimal
        assert result.iteration_time <= deadline * (1 + 1e-9)
        assert result.energy == pytest.approx(truth.optimum(float(deadline)), rel=1e-9)


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
        assert frontier.fastest.energy == pytest.approx(brute_force(profile, dag).optimum(frontier.baseline_time), rel=1e-9)


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
