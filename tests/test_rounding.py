"""Rounding deadlines on worker processes: the same plans as in one process, and a safe fallback."""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from perseus_lightning.core import planner, rounding
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.options import clock_options
from perseus_lightning.core.planner import plan_frontier
from perseus_lightning.core.profile import BACKWARD, FORWARD
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.rounding import Rounder, RoundingJob, RoundingPool
from perseus_lightning.core.simulator import simulate
from perseus_lightning.core.strengthened_bound import window_floors
from planning_instances import dag_of, iteration_time, noisy_profile

P2P_POWER = 75.0
PROFILE = noisy_profile(5, 4, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]})
DAG = dag_of("1f1b", 4, 12)


def rounder() -> Rounder:
    options = clock_options(DAG, PROFILE.for_stages(DAG.schedule.stage_ranks), P2P_POWER)
    return Rounder(DAG, options, P2P_POWER * DAG.num_ranks)


def jobs(rounder: Rounder, stretches: tuple[float, ...] = (1.0, 1.01, 1.02, 1.05)) -> list[RoundingJob]:
    relaxation = HullRelaxation(DAG, rounder.options, P2P_POWER)
    t_min = simulate(DAG, PROFILE.for_stages(DAG.schedule.stage_ranks), P2P_POWER).iteration_time
    solved = [(t_min * s, relaxation.solve(t_min * s)) for s in stretches]
    return [RoundingJob(deadline, relaxed.durations, relaxed.lower_bound) for deadline, relaxed in solved]


class PidRounder(Rounder):
    """Answers every job with the id of the process that rounded it."""

    def round(self, job: RoundingJob) -> np.ndarray:
        return np.array([os.getpid()])


class DyingRounder(Rounder):
    """Kills any worker process that rounds with it, as an out-of-memory kill would."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.parent = os.getpid()

    def round(self, job: RoundingJob) -> np.ndarray:
        if os.getpid() != self.parent:
            os._exit(1)
        return super().round(job)


def test_plans_just_above_the_bound_get_neighbourhood_search_and_only_get_cheaper() -> None:
    # Told that the LP bound is 1 % below its plan, a deadline gets hull jumps only; told 0.25 %
    # (within SEARCH_BELOW), neighbourhood search too, which gains on this noisy profile.
    round_with = rounder()
    assert rounding.JUMP_ABOVE < 0.0025 <= rounding.SEARCH_BELOW < 0.01
    for job in jobs(round_with):
        plain = round_with.energy(round_with.round(dataclasses.replace(job, lower_bound=None)))
        far = round_with.round(dataclasses.replace(job, lower_bound=plain / 1.01))
        near = round_with.round(dataclasses.replace(job, lower_bound=round_with.energy(far) / 1.0025))
        assert iteration_time(DAG, round_with.options, near) <= job.deadline * (1 + 1e-9)
        assert round_with.energy(near) < round_with.energy(far) * (1 - 1e-6)


def test_the_zero_slowdown_plan_is_held_to_its_tighter_target() -> None:
    # Told that the LP bound is 0.15 % below its plan, a deadline is within the target for every
    # plan and is left alone; the zero-slowdown plan, whose target is 0.1 %, gets hull jumps.
    round_with = rounder()
    assert rounding.JUMP_ABOVE_AT_T_MIN < 0.0015 < rounding.JUMP_ABOVE
    gains = []
    for job in jobs(round_with):
        plain = round_with.energy(round_with.round(dataclasses.replace(job, lower_bound=None)))
        told = dataclasses.replace(job, lower_bound=plain / 1.0015)
        assert round_with.energy(round_with.round(told)) == plain
        jumped = round_with.round(dataclasses.replace(told, zero_slowdown=True))
        assert iteration_time(DAG, round_with.options, jumped) <= job.deadline * (1 + 1e-9)
        assert round_with.energy(jumped) <= plain
        gains.append(1 - round_with.energy(jumped) / plain)
    assert max(gains) > 1e-5, gains


def test_relax_and_fix_rounds_only_pipelines_up_to_its_size_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = rounding.relax_and_fix
    monkeypatch.setattr(rounding, "relax_and_fix", lambda *args: calls.append(args[0]) or real(*args))
    round_with = rounder()
    job = jobs(round_with, (1.02,))[0]
    monkeypatch.setattr(rounding, "RELAX_AND_FIX_MAX_NODES", DAG.num_nodes)
    round_with.round(job)
    assert calls == [DAG]
    monkeypatch.setattr(rounding, "RELAX_AND_FIX_MAX_NODES", DAG.num_nodes - 1)
    plan = round_with.round(job)
    assert calls == [DAG]
    assert iteration_time(DAG, round_with.options, plan) <= job.deadline * (1 + 1e-9)


def test_without_a_bound_only_the_zero_slowdown_plan_gets_hull_jumps() -> None:
    # The periodic LP of long pipelines bounds nothing (lower_bound None): its plans are rounded and
    # reclaimed only, except the zero-slowdown plan (the one deployed), which gets hull jumps too.
    round_with = rounder()
    gains = []
    for job in jobs(round_with):
        unbounded = dataclasses.replace(job, lower_bound=None)
        plain = round_with.energy(round_with.round(unbounded))
        assert plain == round_with._rounded(job.durations, job.deadline)[1]
        jumped = round_with.round(dataclasses.replace(unbounded, zero_slowdown=True))
        assert iteration_time(DAG, round_with.options, jumped) <= job.deadline * (1 + 1e-9)
        assert round_with.energy(jumped) <= plain
        gains.append(1 - round_with.energy(jumped) / plain)
    assert max(gains) > 1e-5, gains


def test_restarts_round_other_optimal_lp_vertices_and_only_get_cheaper() -> None:
    # On this noisy 4 x 12 pipeline the LP's optimum near T_min is a face whose vertices round apart.
    profile = noisy_profile(3, 4, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]})
    options = clock_options(DAG, profile.for_stages(DAG.schedule.stage_ranks), P2P_POWER)
    round_with = Rounder(DAG, options, P2P_POWER * DAG.num_ranks)
    relaxation = HullRelaxation(DAG, options, P2P_POWER)
    t_min = simulate(DAG, profile.for_stages(DAG.schedule.stage_ranks), P2P_POWER).iteration_time
    gains = []
    for stretch in (1.0, 1.004, 1.008, 1.012):
        relaxed = relaxation.solve(t_min * stretch)
        job = RoundingJob(t_min * stretch, relaxed.durations, relaxed.lower_bound, zero_slowdown=stretch == 1.0)
        plain = round_with.energy(round_with.round(job))
        restarted = round_with.round(dataclasses.replace(job, restarts=8))
        assert iteration_time(DAG, options, restarted) <= job.deadline * (1 + 1e-9)
        assert round_with.energy(restarted) <= plain
        gains.append(1 - round_with.energy(restarted) / plain)
    assert max(gains) > 1e-3, gains
    revived = pickle.loads(pickle.dumps(round_with))  # as a worker receives it: without this process's LP
    assert revived._relaxation is None and np.array_equal(revived.round(job), round_with.round(job))


def test_restarts_round_the_optimum_of_the_lp_with_window_floors() -> None:
    # On this noisy 4 x 12 pipeline the LP with window floors puts time where a plan can use it:
    # its optimum rounds to a plan 1.16 % above the bound at T_min, the LP's own to 1.45 %.
    profile = noisy_profile(4, 4, {FORWARD: A100_LIKE.frequencies[::3], BACKWARD: A100_LIKE.frequencies[::3]})
    options = clock_options(DAG, profile.for_stages(DAG.schedule.stage_ranks), P2P_POWER)
    round_with = Rounder(DAG, options, P2P_POWER * DAG.num_ranks)
    t_min = simulate(DAG, profile.for_stages(DAG.schedule.stage_ranks), P2P_POWER).iteration_time
    relaxed = HullRelaxation(DAG, options, P2P_POWER).solve(t_min)
    floored = HullRelaxation(DAG, options, P2P_POWER)
    floored.add_window_floors(window_floors(DAG, options))
    job = RoundingJob(t_min, relaxed.durations, relaxed.lower_bound, zero_slowdown=True)
    plain = round_with.energy(round_with.round(job))
    of_floored = round_with.energy(round_with.round(dataclasses.replace(job, durations=floored.solve(t_min).durations)))
    restarted = round_with.round(dataclasses.replace(job, restarts=1))
    assert iteration_time(DAG, options, restarted) <= t_min * (1 + 1e-9)
    assert round_with.energy(restarted) <= min(plain, of_floored)
    assert round_with.energy(restarted) < plain * (1 - 1e-3)


def test_workers_round_in_other_processes_and_keep_the_jobs_order() -> None:
    base = rounder()
    pid_rounder = PidRounder(base.dag, base.options, base.idle_power)
    planned = jobs(base)
    with RoundingPool(pid_rounder, workers=2) as pool:
        answered = list(pool.map(iter(planned)))
    assert [job for job, _ in answered] == planned
    pids = {int(result[0]) for _, result in answered}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


@pytest.mark.parametrize("periodic", [False, True], ids=["full-lp", "periodic-lp"])
def test_workers_plan_the_same_frontier_as_one_process(monkeypatch: pytest.MonkeyPatch, periodic: bool) -> None:
    monkeypatch.setattr(planner, "PARALLEL_MIN_NODES", 0)  # a small pipeline, planned on workers all the same
    if periodic:  # as long pipelines are
        monkeypatch.setattr(planner, "PERIODIC_MIN_NODES", 0)
    here = plan_frontier(PROFILE, DAG, P2P_POWER, exact_seconds=0)
    spread = plan_frontier(PROFILE, DAG, P2P_POWER, exact_seconds=0, workers=2)
    assert len(here.plans) >= 5
    assert all((p.lower_bound is None) == periodic for p in here.plans)
    assert [(p.iteration_time, p.energy, p.lower_bound, p.plan) for p in spread.plans] == [
        (p.iteration_time, p.energy, p.lower_bound, p.plan) for p in here.plans
    ]


def test_a_killed_worker_leaves_the_rest_to_this_process_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    base = rounder()
    dying = DyingRounder(base.dag, base.options, base.idle_power)
    planned = jobs(base)
    with caplog.at_level(logging.WARNING, logger=rounding.__name__), RoundingPool(dying, workers=2) as pool:
        plans = [plan for _, plan in pool.map(planned)]
    expected = [base.round(job) for job in planned]
    assert all(np.array_equal(a, b) for a, b in zip(plans, expected))
    assert all(iteration_time(DAG, base.options, plan) <= job.deadline * (1 + 1e-9) for plan, job in zip(plans, planned))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "BrokenProcessPool" in warnings[0] and "planning in this process" in warnings[0]


def test_a_pool_that_cannot_start_plans_here_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def no_semaphores(*args: object, **kwargs: object) -> None:
        raise OSError(38, "Function not implemented")  # what sem_open raises without /dev/shm

    monkeypatch.setattr(rounding, "ProcessPoolExecutor", no_semaphores)
    base = rounder()
    planned = jobs(base, stretches=(1.0, 1.03))
    with caplog.at_level(logging.WARNING, logger=rounding.__name__), RoundingPool(base, workers=4) as pool:
        plans = [plan for _, plan in pool.map(planned)]
    assert all(np.array_equal(a, base.round(job)) for a, job in zip(plans, planned))
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "planner worker processes failed (OSError: [Errno 38] Function not implemented); planning in this process instead"
    ]


def test_workers_must_be_positive() -> None:
    with pytest.raises(PlanError, match=r"workers is 0\. Fix: give 1"):
        plan_frontier(PROFILE, DAG, P2P_POWER, workers=0)


KILLED_PLANNER = """
import os, sys, time
import numpy as np
sys.path.insert(0, {tests!r})
from perseus_lightning.core.rounding import Rounder, RoundingJob, RoundingPool
from test_rounding import rounder


class SleepyRounder(Rounder):
    def round(self, job):
        open(os.path.join({folder!r}, str(os.getpid())), "w").close()
        time.sleep(3)
        return np.zeros(1)


if __name__ == "__main__":
    base = rounder()
    job = RoundingJob(1.0, np.zeros(base.dag.num_nodes), None)
    with RoundingPool(SleepyRounder(base.dag, base.options, base.idle_power), workers=2) as pool:
        list(pool.map([job, job]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_workers_exit_with_the_planner_however_it_ends(tmp_path: Path, sig: signal.Signals) -> None:
    script = tmp_path / "planner.py"
    folder = tmp_path / "workers"
    folder.mkdir()
    script.write_text(KILLED_PLANNER.format(tests=str(Path(__file__).parent), folder=str(folder)))
    planner_process = subprocess.Popen(
        [sys.executable, str(script)], stderr=subprocess.PIPE, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job would ignore Ctrl-C
    )
    try:
        deadline = time.monotonic() + 60
        while len(list(folder.iterdir())) < 2 and time.monotonic() < deadline and planner_process.poll() is None:
            time.sleep(0.1)
        workers = [int(p.name) for p in folder.iterdir()]
        assert len(workers) == 2, planner_process.stderr.read() if planner_process.poll() is not None else "workers never started"
        planner_process.send_signal(sig)
        assert planner_process.wait(timeout=10) != 0  # after Ctrl-C, once the workers' current (3-s) jobs end
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    finally:
        planner_process.kill()
        planner_process.wait()
