"""The exact frequency-planning MILP, for pipelines small enough to solve it.

One binary per (instruction, clock option), one start time per instruction and the iteration
time ``T``; each instruction picks one option, every DAG edge and every sink finishes by its
successor's start and by ``T``, and the objective is the iteration's exact energy
``sum(E - P_block * t) + R * P_block * T`` (see :mod:`perseus_lightning.core.options`). HiGHS's
branch and bound solves it, seeded with a plan the heuristic found. The planner uses it only
below ``EXACT_MAX_BINARIES`` options in all, to make the zero-slowdown plan optimal and to fill,
or prove empty, the gaps its heuristic sweep leaves in the frontier.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.highs_model import edge_rows, load_model
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.simulator import earliest_schedule
from perseus_lightning.core.slack import DEADLINE_TOLERANCE, option_durations

EXACT_MAX_BINARIES = 2500
"""Largest number of clock options (summed over instructions) the planner solves exactly."""
EXACT_MAX_NODES = 1000
"""Branch-and-bound nodes one solve may explore (a deterministic limit, unlike time); past it the best
plan found so far is used, and not called optimal."""


@dataclass(frozen=True)
class ExactSolution:
    """A plan of the MILP at one deadline."""

    choice: np.ndarray
    """Option index per node."""
    optimal: bool
    """Whether HiGHS proved that no plan finishing by the deadline is cheaper."""


class ExactPlanner:
    """The MILP of one DAG, re-solvable at any deadline (only the bound on ``T`` changes)."""

    def __init__(self, dag: InstructionDAG, options: list[ClockOptions], p2p_power: float) -> None:
        import highspy

        self._highspy = highspy
        self._dag, self._options = dag, options
        n = dag.num_nodes
        sizes = np.array([len(opt.time) for opt in options])
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        binaries = int(self._offsets[-1])
        self._start_col, self._time_col = binaries, binaries + n
        # Rows 0..n-1: one option per node; then the path rows, where a node's duration is sum(t x).
        option_time = np.concatenate([opt.time for opt in options])
        rows, cols, vals, tails = edge_rows(
            dag.edge_sources, dag.edge_targets, dag.sinks, self._offsets, option_time, 0, binaries, self._time_col
        )
        rows = [np.repeat(np.arange(n), sizes), *(r + n for r in rows)]
        cols, vals = [np.arange(binaries), *cols], [np.ones(binaries), *vals]
        inf = highspy.kHighsInf
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = self._time_col + 1, n + len(tails)
        lp.col_cost_ = np.concatenate([np.concatenate([opt.cost for opt in options]), np.zeros(n), [p2p_power * dag.num_ranks]])
        lp.col_lower_ = np.zeros(lp.num_col_)
        lp.col_upper_ = np.concatenate([np.ones(binaries), np.full(n + 1, inf)])
        lp.row_lower_ = np.concatenate([np.ones(n), np.full(len(tails), -inf)])
        lp.row_upper_ = np.concatenate([np.ones(n), np.zeros(len(tails))])
        lp.integrality_ = [highspy.HighsVarType.kInteger] * binaries + [highspy.HighsVarType.kContinuous] * (n + 1)
        self._solver = load_model(lp, rows, cols, vals)
        for option, value in (
            ("mip_rel_gap", 0.0), ("mip_abs_gap", 1e-9), ("mip_feasibility_tolerance", 1e-9), ("mip_max_nodes", EXACT_MAX_NODES),
        ):
            self._solver.setOptionValue(option, value)

    @staticmethod
    def fits(options: list[ClockOptions]) -> bool:
        """Whether the MILP of these options is small enough to solve (``EXACT_MAX_BINARIES``)."""
        return sum(len(opt.time) for opt in options) <= EXACT_MAX_BINARIES

    def solve(self, deadline: float, seed: np.ndarray, seconds: float = math.inf) -> ExactSolution:
        """The cheapest plan finishing by ``deadline``, starting from ``seed`` (option indices of a
        plan that finishes by it), within ``seconds`` and ``EXACT_MAX_NODES``: the best plan found
        by then, or the seed itself."""
        self._solver.setOptionValue("time_limit", seconds if math.isfinite(seconds) else self._highspy.kHighsInf)
        self._solver.changeColBounds(self._time_col, 0.0, deadline * (1 + DEADLINE_TOLERANCE))
        self._solver.setSolution(self._solution_of(seed))
        self._solver.run()
        status = self._solver.getModelStatus()
        if self._solver.getInfo().primal_solution_status != self._highspy.kSolutionStatusFeasible:
            return ExactSolution(seed, False)
        x = np.asarray(self._solver.getSolution().col_value)
        choice = np.array([int(np.argmax(x[a:b])) for a, b in zip(self._offsets[:-1], self._offsets[1:])])
        return ExactSolution(choice, status == self._highspy.HighsModelStatus.kOptimal)

    def _solution_of(self, choice: np.ndarray) -> object:
        values = np.zeros(self._time_col + 1)
        values[self._offsets[:-1] + choice] = 1.0
        start, end = earliest_schedule(self._dag, option_durations(self._options, choice))
        values[self._start_col : self._time_col] = start
        values[self._time_col] = end.max()
        solution = self._highspy.HighsSolution()
        solution.col_value = values.tolist()
        return solution
