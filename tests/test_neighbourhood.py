"""Neighbourhood search: windows of instructions re-pick neighbouring clocks together, never costing more."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.neighbourhood import search_neighbourhood
from perseus_lightning.core.options import ClockOptions, clock_options
from perseus_lightning.core.profile import BACKWARD, FORWARD
from perseus_lightning.core.relax_and_fix import relax_and_fix
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.simulator import earliest_schedule
from perseus_lightning.core.slack import option_durations, reclaim_slack_by_value
from planning_instances import dag_of, iteration_time, noisy_profile, total_cost

P2P_POWER = A100_LIKE.blocking_power


def energy(dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray, idle_power: float) -> float:
    return total_cost(options, choice) + idle_power * iteration_time(dag, options, choice)


def test_a_window_speeds_one_instruction_up_to_slow_two_others_down() -> None:
    # Four instructions in a chain, each 1, 1.5 or 2 s at cost 10, 4 or 0; the deadline is 6 s. The
    # plan 2 + 1.5 + 1.5 + 1 s (cost 18) has no slack, so no single move helps; moving the first to
    # 1.5 s and the last to 1.5 s together costs 16.
    dag = dag_of("1f1b", 1, 2)
    chain = dag.topological_order.tolist()
    option = ClockOptions(np.array([1410, 1200, 900]), np.array([1.0, 1.5, 2.0]), np.array([10.0, 4.0, 0.0]))
    options = [option] * 4
    plan = np.empty(4, dtype=np.int64)
    plan[chain] = [2, 1, 1, 0]
    assert np.array_equal(reclaim_slack_by_value(dag, options, plan, 6.0), plan)  # no slack to reclaim
    assert np.array_equal(search_neighbourhood(dag, options, plan, 6.0, idle_power=0.0, window=1), plan)
    improved = search_neighbourhood(dag, options, plan, 6.0, idle_power=0.0, window=4)
    assert improved[chain].tolist() == [1, 1, 1, 1]
    assert iteration_time(dag, options, improved) <= 6.0


@pytest.fixture(
    scope="module",
    params=[(0, 4, 8, "1f1b"), (7, 4, 6, "gpipe")],
    ids=["1f1b-4x8", "gpipe-4x6"],
)
def instance(request: pytest.FixtureRequest) -> tuple[InstructionDAG, list[ClockOptions], HullRelaxation, float]:
    seed, ranks, microbatches, schedule = request.param
    dag = dag_of(schedule, ranks, microbatches)
    profile = noisy_profile(seed, ranks, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]})
    options = clock_options(dag, profile, P2P_POWER)
    t_min = iteration_time(dag, options, np.zeros(dag.num_nodes, dtype=np.int64))
    return dag, options, HullRelaxation(dag, options, P2P_POWER), t_min


@pytest.mark.parametrize("stretch", [1.0, 1.02, 1.08])
@pytest.mark.parametrize("window, offset, reach", [(3, 0, 1), (16, 8, 1), (16, 0, 2)])
def test_a_pass_keeps_the_deadline_stays_within_reach_and_never_costs_more(
    instance, stretch: float, window: int, offset: int, reach: int
) -> None:
    dag, options, relaxation, t_min = instance
    deadline = t_min * stretch
    idle_power = P2P_POWER * dag.num_ranks
    rounding = relax_and_fix(dag, options, relaxation.solve(deadline).durations, deadline)
    plan = reclaim_slack_by_value(dag, options, rounding, deadline)
    searched = search_neighbourhood(dag, options, plan, deadline, idle_power, window=window, reach=reach, offset=offset)
    assert iteration_time(dag, options, searched) <= deadline * (1 + 1e-9)
    assert np.max(np.abs(searched - plan)) <= reach
    assert energy(dag, options, searched, idle_power) <= energy(dag, options, plan, idle_power) * (1 + 1e-12)


def test_one_window_over_every_instruction_with_full_reach_is_the_cheapest_plan() -> None:
    dag = dag_of("1f1b", 2, 2)
    profile = noisy_profile(0, 2, {FORWARD: (900, 1110, 1260, 1410), BACKWARD: (900, 1110, 1260, 1410)})
    options = clock_options(dag, profile, P2P_POWER)
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)
    t_min = iteration_time(dag, options, fastest)
    everything = max(len(opt.time) for opt in options)
    choices = [np.array(combo) for combo in itertools.product(*(range(len(opt.time)) for opt in options))]
    ends = [float(earliest_schedule(dag, option_durations(options, c))[1].max()) for c in choices]
    for deadline in (t_min, 1.05 * t_min, 1.2 * t_min):
        cheapest = min(total_cost(options, c) for c, end in zip(choices, ends) if end <= deadline * (1 + 1e-9))
        searched = search_neighbourhood(dag, options, fastest, deadline, idle_power=0.0, window=dag.num_nodes, reach=everything)
        assert iteration_time(dag, options, searched) <= deadline * (1 + 1e-9)
        assert total_cost(options, searched) == pytest.approx(cheapest, rel=1e-9)
