"""Relax-and-fix rounding: it keeps the deadline, mixes hull vertices, and its one-window MILP is optimal."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.options import ClockOptions, clock_options
from perseus_lightning.core.profile import BACKWARD, FORWARD
from perseus_lightning.core import relax_and_fix as relax_and_fix_module
from perseus_lightning.core.relax_and_fix import ON_VERTEX, relax_and_fix
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.slack import option_durations
from planning_instances import dag_of, iteration_time, noisy_profile, total_cost

P2P_POWER = A100_LIKE.blocking_power


def brackets(options: list[ClockOptions], durations: np.ndarray) -> list[tuple[int, ...]]:
    """Per node: its hull vertex if the LP put it on one, else the two hull vertices around it."""
    result = []
    for opt, duration in zip(options, durations.tolist()):
        times = opt.time[opt.hull]
        on = np.flatnonzero(np.abs(times - duration) <= ON_VERTEX * duration)
        if len(on):
            result.append((opt.hull[int(on[0])],))
        else:
            above = int(np.searchsorted(times, duration))
            result.append((opt.hull[above - 1], opt.hull[above]))
    return result


def test_two_half_stretched_instructions_become_one_slow_and_one_fast() -> None:
    # Forward then backward on one GPU, each 1 s (cost 10) or 2 s (cost 0); the LP's durations
    # stretch both halfway. Rounded alone each must take 1 s; mixed, one takes 2 s.
    dag = dag_of("1f1b", 1, 1)
    option = ClockOptions(np.array([1410, 900]), np.array([1.0, 2.0]), np.array([10.0, 0.0]))
    options = [option, option]
    for window in (1, 2):
        choice = relax_and_fix(dag, options, np.array([1.5, 1.5]), 3.0, window=window)
        assert sorted(choice.tolist()) == [0, 1]
        assert iteration_time(dag, options, choice) <= 3.0


@pytest.fixture(
    scope="module",
    params=[(0, 4, 8, "1f1b"), (2, 3, 8, "1f1b"), (7, 4, 6, "gpipe")],  # each with 6 to 14 fractional instructions
    ids=["1f1b-4x8", "1f1b-3x8", "gpipe-4x6"],
)
def instance(request: pytest.FixtureRequest) -> tuple[InstructionDAG, list[ClockOptions], HullRelaxation, float]:
    seed, ranks, microbatches, schedule = request.param
    dag = dag_of(schedule, ranks, microbatches)
    profile = noisy_profile(seed, ranks, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]})
    options = clock_options(dag, profile, P2P_POWER)
    relaxation = HullRelaxation(dag, options, P2P_POWER)
    t_min = iteration_time(dag, options, np.zeros(dag.num_nodes, dtype=np.int64))
    return dag, options, relaxation, t_min


@pytest.mark.parametrize("stretch", [1.0, 1.01, 1.03, 1.08])
@pytest.mark.parametrize("window", [1, 3, 20])
def test_keeps_the_deadline_and_picks_only_the_lp_vertices_or_their_neighbours(instance, stretch: float, window: int) -> None:
    dag, options, relaxation, t_min = instance
    deadline = t_min * stretch
    relaxed = relaxation.solve(deadline)
    choice = relax_and_fix(dag, options, relaxed.durations, deadline, window=window)
    assert iteration_time(dag, options, choice) <= deadline * (1 + 1e-9)
    allowed = brackets(options, relaxed.durations)
    assert all(k in allowed_k for k, allowed_k in zip(choice.tolist(), allowed))
    faster = np.array([b[0] for b in allowed])
    assert total_cost(options, choice) <= total_cost(options, faster) + 1e-9  # never worse than rounding each alone


@pytest.mark.parametrize("stretch", [1.0, 1.01, 1.03, 1.08])
def test_one_window_is_the_optimal_mix_of_the_bracketing_vertices(instance, stretch: float) -> None:
    dag, options, relaxation, t_min = instance
    deadline = t_min * stretch
    relaxed = relaxation.solve(deadline)
    allowed = brackets(options, relaxed.durations)
    fractional = [node for node, b in enumerate(allowed) if len(b) == 2]
    assert 0 < len(fractional) <= 14, "the brute force below enumerates 2^fractional mixes"
    best = np.inf
    for slow in itertools.product((0, 1), repeat=len(fractional)):
        mix = np.array([b[0] for b in allowed])
        mix[fractional] = [allowed[node][pick] for node, pick in zip(fractional, slow)]
        if iteration_time(dag, options, mix) <= deadline * (1 + 1e-9):
            best = min(best, total_cost(options, mix))
    choice = relax_and_fix(dag, options, relaxed.durations, deadline, window=dag.num_nodes)
    assert total_cost(options, choice) == pytest.approx(best, rel=1e-6, abs=1e-6)


def test_windows_where_no_member_fits_alone_skip_the_milp_and_pick_the_same(instance, monkeypatch: pytest.MonkeyPatch) -> None:
    dag, options, relaxation, t_min = instance
    answers: list[bool] = []
    fits_alone = relax_and_fix_module._Windows._any_fits_alone

    def recorded(*args: object) -> bool:
        answers.append(fits_alone(*args))
        return answers[-1]

    deadlines = [t_min * stretch for stretch in (1.0, 1.01, 1.03, 1.08)]
    relaxed = [relaxation.solve(deadline).durations for deadline in deadlines]

    def rounded(window: int) -> list[np.ndarray]:
        return [relax_and_fix(dag, options, durations, deadline, window=window) for durations, deadline in zip(relaxed, deadlines)]

    for window in (1, 3, 20):
        monkeypatch.setattr(relax_and_fix_module._Windows, "_any_fits_alone", recorded)
        choices = rounded(window)
        monkeypatch.setattr(relax_and_fix_module._Windows, "_any_fits_alone", lambda *args: True)  # every window's MILP
        assert all(np.array_equal(a, b) for a, b in zip(choices, rounded(window)))
    assert not all(answers), "no window here was decided without its MILP"


def test_durations_on_hull_vertices_come_back_unchanged(instance) -> None:
    dag, options, _, _ = instance
    rng = np.random.default_rng(7)
    vertices = np.array([opt.hull[rng.integers(len(opt.hull))] for opt in options])
    deadline = iteration_time(dag, options, vertices)
    choice = relax_and_fix(dag, options, option_durations(options, vertices), deadline)
    assert np.array_equal(choice, vertices)
