"""Hull jumps: instructions leave clocks above their hull, the deadline holds, and a plan never costs more."""

from __future__ import annotations

import numpy as np
import pytest

from perseus_lightning.core import hull_jumps
from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.hull_jumps import jump_to_hull
from perseus_lightning.core.options import ClockOptions, clock_options
from perseus_lightning.core.profile import BACKWARD, FORWARD
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.simulator import earliest_schedule, latest_starts
from perseus_lightning.core.slack import option_durations
from planning_instances import dag_of, iteration_time, noisy_profile, total_cost

P2P_POWER = A100_LIKE.blocking_power
MIDDLE = ClockOptions(np.array([1410, 1200, 900]), np.array([1.0, 1.5, 2.0]), np.array([10.0, 6.0, 0.0]))
"""1.5 s costs 6, 1 above the hull's chord from (1 s, 10) to (2 s, 0)."""


def windows_of(dag: InstructionDAG, durations: np.ndarray, deadline: float) -> hull_jumps._Windows:
    return hull_jumps._Windows(dag, durations, deadline, dag.topological_rank.tolist())


def energy(dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray, idle_power: float) -> float:
    return total_cost(options, choice) + idle_power * iteration_time(dag, options, choice)


def test_a_jump_to_the_slower_vertex_is_repaired_by_speeding_up_another_instruction() -> None:
    # Forward then backward on one GPU, both on the middle clock, above the hull, and no slack: the
    # forward jumps to 2 s, and the backward gives the time back at 1 s. Cost 12 becomes 10.
    dag = dag_of("1f1b", 1, 1)
    options = [MIDDLE, MIDDLE]
    plan = np.array([1, 1])
    jumped = jump_to_hull(dag, options, plan, 3.0, idle_power=0.0)
    assert sorted(jumped.tolist()) == [0, 2]
    assert iteration_time(dag, options, jumped) <= 3.0


def test_a_plan_on_its_hull_or_without_a_cheaper_mix_is_kept() -> None:
    dag = dag_of("1f1b", 1, 1)
    on_hull = np.array([0, 2])
    assert np.array_equal(jump_to_hull(dag, [MIDDLE, MIDDLE], on_hull, 3.0, idle_power=0.0), on_hull)
    # Speeding the backward up costs 7 here, more than the forward's jump saves (6); the forward's
    # jump to its faster vertex costs 4 and lets the backward save only 2.
    costly = ClockOptions(np.array([1410, 1200, 900]), np.array([1.0, 1.5, 2.0]), np.array([13.0, 6.0, 4.0]))
    plan = np.array([1, 1])
    assert np.array_equal(jump_to_hull(dag, [MIDDLE, costly], plan, 3.0, idle_power=0.0), plan)


@pytest.fixture(
    scope="module",
    params=[(0, 4, 8, "1f1b"), (7, 4, 6, "gpipe"), (3, 2, 4, "interleaved-1f1b")],
    ids=["1f1b-4x8", "gpipe-4x6", "interleaved-2x4"],
)
def instance(request: pytest.FixtureRequest) -> tuple[InstructionDAG, list[ClockOptions], HullRelaxation, float]:
    seed, ranks, microbatches, schedule = request.param
    dag = dag_of(schedule, ranks, microbatches, virtual_stages=2 if schedule.startswith("interleaved") else 1)
    profile = noisy_profile(seed, dag.schedule.num_stages, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]})
    options = clock_options(dag, profile, P2P_POWER)
    t_min = iteration_time(dag, options, np.zeros(dag.num_nodes, dtype=np.int64))
    return dag, options, HullRelaxation(dag, options, P2P_POWER), t_min


@pytest.mark.parametrize("window", [12, hull_jumps.WINDOW])
def test_jumps_keep_the_deadline_never_cost_more_and_gain_on_rounded_plans(
    instance, window: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    dag, options, relaxation, t_min = instance
    monkeypatch.setattr(hull_jumps, "WINDOW", window)
    idle_power = P2P_POWER * dag.num_ranks
    gains = []
    for stretch in (1.0, 1.02, 1.05, 1.08):
        deadline = t_min * stretch
        durations = relaxation.solve(deadline).durations * (1 + 1e-9)
        rounded = np.array([opt.cheapest_within(d) for opt, d in zip(options, durations.tolist())])  # above the hull
        jumped = jump_to_hull(dag, options, rounded, deadline, idle_power)
        assert iteration_time(dag, options, jumped) <= deadline * (1 + 1e-9)
        before, after = energy(dag, options, rounded, idle_power), energy(dag, options, jumped, idle_power)
        assert after <= before * (1 + 1e-12)
        gains.append(1 - after / before)
    assert max(gains) > 1e-4, gains  # each LP duration rounded up alone leaves excess to trade


def test_window_schedules_stay_exact_as_durations_change_and_undo_restores_them(instance) -> None:
    # Inside a focused window, the earliest and latest starts kept up to date move by move are those
    # recomputed from scratch: the nodes before it do not depend on it, nor do the latest starts of
    # those after it. Undo returns every value to the mark's.
    dag, options, _, t_min = instance
    rng = np.random.default_rng(11)
    durations = option_durations(options, rng.integers(0, 3, dag.num_nodes))
    deadline = t_min * 1.5
    windows = windows_of(dag, durations, deadline)
    order = dag.by_start(np.array(windows.start)).tolist()
    for first in range(0, dag.num_nodes, 7):
        members = order[first : first + 7]
        windows.focus(members)
        start_before, latest_before = list(windows.start), list(windows.reversed_start)
        mark = windows.mark()
        for _ in range(3):  # one to three members at a time
            changes = rng.choice(members, size=min(int(rng.integers(1, 4)), len(members)), replace=False).tolist()
            for node in changes:
                durations[node] = options[node].time[rng.integers(len(options[node].time))]
            windows.set_durations({node: float(durations[node]) for node in changes})
            start, _ = earliest_schedule(dag, durations)
            latest = latest_starts(dag, durations, deadline)
            assert np.allclose([windows.start[m] for m in members], start[members], rtol=0, atol=1e-12)
            kept_latest = [-windows.reversed_start[m] - windows.duration[m] for m in members]
            assert np.allclose(kept_latest, latest[members], rtol=0, atol=1e-12)
        windows.undo(mark)
        assert (windows.start, windows.reversed_start) == (start_before, latest_before)
        durations = np.array(windows.duration)  # the next window goes on from this one's state


def test_instructions_on_every_longest_path_are_told_apart_from_those_on_one() -> None:
    # GPipe, two GPUs, one microbatch, unit times: a chain, every node on the one path. With two
    # microbatches, the paths into GPU 0's last backward run F0 on GPU 0, then F0 on GPU 1 or F1 on
    # GPU 0 (both end at 2), F1 and B0 on GPU 1, then B1 on GPU 1 or B0 on GPU 0, then that backward.
    dag = dag_of("gpipe", 2, 1)
    windows = windows_of(dag, np.ones(dag.num_nodes), 4.0)
    windows.focus(dag.topological_order.tolist())
    last = int(dag.topological_order[-1])
    every, some = windows.longest_paths_through(last, 1e-12)
    assert sorted(every) == sorted(some) == sorted(set(range(dag.num_nodes)) - {last})
    dag = dag_of("gpipe", 2, 2)
    windows = windows_of(dag, np.ones(dag.num_nodes), 6.0)
    windows.focus(dag.topological_order.tolist())
    index = {(ins.stage, ins.kind, ins.microbatch): node for node, ins in enumerate(dag.instructions)}
    last = index[0, BACKWARD, 1]
    every, some = windows.longest_paths_through(last, 1e-12)
    assert set(every) == {index[0, FORWARD, 0], index[1, FORWARD, 1], index[1, BACKWARD, 0]}
    assert set(some) == set(range(dag.num_nodes)) - {last}
