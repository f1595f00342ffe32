"""The planner's HiGHS solvers: one thread where the process allows it, never in another highspy user's way;
window MILPs that start from a given incumbent.

HiGHS starts one thread scheduler per process, so each case about threads runs in a fresh interpreter.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PLAN_AND_REPORT = """
import highspy, numpy as np
from perseus_lightning.core.highs_model import quiet_solver
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.planner import plan_frontier
from planning_instances import dag_of, noisy_profile

def users_run(threads):
    solver = highspy.Highs()
    solver.setOptionValue("output_flag", False)
    solver.setOptionValue("threads", threads)
    lp = highspy.HighsLp()
    lp.num_col_, lp.col_cost_, lp.col_lower_, lp.col_upper_ = 1, np.array([1.0]), np.array([0.0]), np.array([1.0])
    solver.passModel(lp)
    return solver.run() == highspy.HighsStatus.kOk

{before}
frontier = plan_frontier(noisy_profile(0, 2, {{"forward": [1410, 1200, 1000], "backward": [1410, 1200, 1000]}}),
                         dag_of("1f1b", 2, 4), A100_LIKE.blocking_power, exact_seconds=0)
print(quiet_solver().getOptionValue("threads")[1], len(frontier.plans) > 1, {after})
"""


def run_script(before: str, after: str) -> list[str]:
    script = textwrap.dedent(PLAN_AND_REPORT).format(before=before, after=after)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.splitlines()[-1].split()  # after the banner of the user's Highs()


def test_a_fresh_process_plans_on_one_thread_and_leaves_highspys_default_usable() -> None:
    threads, planned, users_default_runs = run_script(before="", after="users_run(0)")
    assert (threads, planned, users_default_runs) == ("1", "True", "True")


@pytest.mark.parametrize("users_threads", [2, 0])
def test_after_another_highspy_user_started_the_scheduler_the_planner_still_plans(users_threads: int) -> None:
    threads, planned, users_later_run = run_script(before=f"assert users_run({users_threads})", after=f"users_run({users_threads})")
    assert (threads, planned, users_later_run) == ("0", "True", "True")


def test_a_small_milp_keeps_its_start_as_the_incumbent() -> None:
    # A knapsack that HiGHS cannot solve at its root: with no node to search, it has no point
    # without a start, and returns the start with one; with nodes, the same optimum either way.
    highspy = pytest.importorskip("highspy")
    import numpy as np

    from perseus_lightning.core.highs_model import ConstraintRows, solve_small_milp

    rng = np.random.default_rng(0)
    weight = rng.integers(10, 60, 40).astype(float)
    value = weight + rng.integers(0, 10, 40)
    rows = ConstraintRows()
    rows.add(enumerate(weight.tolist()), -highspy.kHighsInf, weight.sum() / 2 + 0.5)

    def knapsack() -> object:
        lp = highspy.HighsLp()
        lp.num_col_, lp.col_cost_, lp.col_lower_, lp.col_upper_ = 40, -value, np.zeros(40), np.ones(40)
        lp.integrality_ = [highspy.HighsVarType.kInteger] * 40
        return lp

    start = np.zeros(40)
    start[:5] = 1.0
    assert solve_small_milp(knapsack(), rows, max_nodes=0) is None
    np.testing.assert_array_equal(solve_small_milp(knapsack(), rows, max_nodes=0, start=start), start)
    best = solve_small_milp(knapsack(), rows, max_nodes=200)
    seeded = solve_small_milp(knapsack(), rows, max_nodes=200, start=start)
    assert value @ seeded == value @ best > value @ start and weight @ seeded <= weight.sum() / 2 + 0.5
