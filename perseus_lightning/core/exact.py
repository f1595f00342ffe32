"""The exact frequency-planning MILP, for pipelines small enough to solve it.

One start time per instruction and the iteration time ``T``; every DAG edge and every sink
finishes by its successor's start and by ``T``, and the objective is the iteration's exact energy
``sum(E - P_block * t) + R * P_block * T`` (see :mod:`perseus_lightning.core.options`). Each
instruction's clock is chosen by binaries in one of two formulations with the same LP relaxation
(the convex hull of each instruction's options, as in :mod:`perseus_lightning.core.relaxation`):

- ``"choice"``: one binary per (instruction, clock option), exactly one set. HiGHS proves
  optimality fastest with it, and the planner uses it.
- ``"incremental"``: binary ``k`` of an instruction says "at least as slow as its ``k``-th option"
  (``y_1 >= y_2 >= ...``); its duration and cost are the first option's plus the chosen increments.
  A branch then splits an instruction's time range rather than ruling one clock out, and HiGHS's
  heuristics find much better plans within a time limit on large, non-convex instances (A40 at
  8 x 12 and ``T_min``: 0.227 % above the LP bound in 120 s, against 0.298 %), for a weaker dual bound.

HiGHS's branch and bound solves it, seeded with a plan the heuristic found. The planner uses it
only below ``EXACT_MAX_BINARIES`` options in all, to improve the zero-slowdown plan (optimal when
the solve finishes within its limits) and to fill, or prove empty, the gaps its heuristic sweep
leaves in the frontier;
``bench/milp_reference.py`` uses both formulations to measure how far the planner is from the best
plan a longer MILP finds, and from what the MILP proves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.highs_model import edge_rows, load_model
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.simulator import earliest_schedule
from perseus_lightning.core.slack import DEADLINE_TOLERANCE, option_durations

EXACT_MAX_BINARIES = 2500
"""Largest number of clock options (summed over instructions) the planner solves exactly."""
HEURISTIC_EFFORT = 0.05
"""HiGHS's default share of branch-and-bound effort spent on primal heuristics."""
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
    lower_bound: float
    """Energy (J) that HiGHS proved no plan finishing by the deadline can beat (its dual bound)."""


class ExactPlanner:
    """The MILP of one DAG in either ``formulation``, re-solvable at any deadline (only the bound on
    ``T`` changes); each solve explores at most ``max_nodes`` branch-and-bound nodes."""

    def __init__(
        self,
        dag: InstructionDAG,
        options: list[ClockOptions],
        p2p_power: float,
        formulation: Literal["choice", "incremental"] = "choice",
        max_nodes: int = EXACT_MAX_NODES,
    ) -> None:
        import highspy

        if formulation not in ("choice", "incremental"):
            raise PlanError(f"formulation is {formulation!r}. Fix: use 'choice' or 'incremental'.")
        self._highspy = highspy
        self._dag, self._options = dag, options
        self._incremental = formulation == "incremental"
        n = dag.num_nodes
        sizes = np.array([len(opt.time) - self._incremental for opt in options])
        self._offsets = np.concatenate([[0], np.cumsum(sizes)])
        binaries = int(self._offsets[-1])
        self._start_col, self._time_col = binaries, binaries + n
        inf = highspy.kHighsInf
        if self._incremental:  # duration = first time + increments; each increment needs the one before
            weights = np.concatenate([np.diff(opt.time) for opt in options])
            costs = np.concatenate([np.diff(opt.cost) for opt in options])
            later = np.flatnonzero(np.concatenate([np.arange(k) > 0 for k in sizes]))
            first_rows = [np.repeat(np.arange(len(later)), 2)]
            first_cols = [np.column_stack([later, later - 1]).ravel()]
            first_vals = [np.tile([1.0, -1.0], len(later))]
            first_lower, first_upper = np.full(len(later), -inf), np.zeros(len(later))
            constant = np.array([opt.time[0] for opt in options])
            offset = float(sum(opt.cost[0] for opt in options))
        else:  # duration = sum(t x), exactly one x set
            weights = np.concatenate([opt.time for opt in options])
            costs = np.concatenate([opt.cost for opt in options])
            first_rows, first_cols, first_vals = [np.repeat(np.arange(n), sizes)], [np.arange(binaries)], [np.ones(binaries)]
            first_lower, first_upper = np.ones(n), np.ones(n)
            constant, offset = np.zeros(n), 0.0
        rows, cols, vals, tails = edge_rows(
            dag.edge_sources, dag.edge_targets, dag.sinks, self._offsets, weights, 0, binaries, self._time_col
        )
        rows = [*first_rows, *(r + len(first_upper) for r in rows)]
        cols, vals = [*first_cols, *cols], [*first_vals, *vals]
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = self._time_col + 1, len(first_upper) + len(tails)
        lp.col_cost_ = np.concatenate([costs, np.zeros(n), [p2p_power * dag.num_ranks]])
        lp.col_lower_ = np.zeros(lp.num_col_)
        lp.col_upper_ = np.concatenate([np.ones(binaries), np.full(n + 1, inf)])
        lp.row_lower_ = np.concatenate([first_lower, np.full(len(tails), -inf)])
        lp.row_upper_ = np.concatenate([first_upper, -constant[tails]])
        lp.offset_ = offset
        lp.integrality_ = [highspy.HighsVarType.kInteger] * binaries + [highspy.HighsVarType.kContinuous] * (n + 1)
        self._solver = load_model(lp, rows, cols, vals)
        for option, value in (
            ("mip_rel_gap", 0.0), ("mip_abs_gap", 1e-9), ("mip_feasibility_tolerance", 1e-9), ("mip_max_nodes", max_nodes),
        ):
            self._solver.setOptionValue(option, value)

    @staticmethod
    def fits(options: list[ClockOptions]) -> bool:
        """Whether the MILP of these options is small enough to solve (``EXACT_MAX_BINARIES``)."""
        return sum(len(opt.time) for opt in options) <= EXACT_MAX_BINARIES

    def add_cost_floor(self, nodes: list[int], floor: float) -> None:
        """Add a row: ``nodes`` cost at least ``floor`` (J) together. A valid cut when every plan
        finishing by the deadlines solved for spends that much on them, e.g. the strengthened
        bound's :func:`~perseus_lightning.core.strengthened_bound.pair_cost_floors`."""
        columns = np.concatenate([np.arange(self._offsets[n], self._offsets[n + 1]) for n in nodes]).astype(np.int32)
        if self._incremental:  # cost = first option's + the chosen increments
            values = np.concatenate([np.diff(self._options[n].cost) for n in nodes])
            floor -= sum(float(self._options[n].cost[0]) for n in nodes)
        else:
            values = np.concatenate([self._options[n].cost for n in nodes])
        self._solver.addRow(floor, self._highspy.kHighsInf, len(columns), columns, values)

    def solve(
        self, deadline: float, seed: np.ndarray, seconds: float = math.inf, cutoff: float = math.inf, heuristics: bool = True
    ) -> ExactSolution:
        """The cheapest plan finishing by ``deadline``, starting from ``seed`` (option indices of a
        plan that finishes by it), within ``seconds`` and the node limit: the best plan found by
        then, or the seed itself. With a finite ``cutoff`` (J), HiGHS searches only for plans
        costing at most that and prunes every branch that cannot, which proves much sooner that
        there is none: then the seed is returned with ``cutoff`` as its ``lower_bound``. Without
        ``heuristics`` HiGHS spends no effort on primal heuristics, which about halves the time
        of such proofs (A100 8 x 12 at ``T_min``, session 23)."""
        inf = self._highspy.kHighsInf
        self._solver.setOptionValue("time_limit", seconds if math.isfinite(seconds) else inf)
        self._solver.setOptionValue("mip_heuristic_effort", HEURISTIC_EFFORT if heuristics else 0.0)
        self._solver.setOptionValue("objective_bound", cutoff if math.isfinite(cutoff) else inf)
        self._solver.changeColBounds(self._time_col, 0.0, deadline * (1 + DEADLINE_TOLERANCE))
        self._solver.setSolution(self._solution_of(seed))
        self._solver.run()
        status = self._solver.getModelStatus()
        info = self._solver.getInfo()
        found = info.primal_solution_status == self._highspy.kSolutionStatusFeasible
        finished = status in (self._highspy.HighsModelStatus.kOptimal, self._highspy.HighsModelStatus.kInfeasible)
        if finished and math.isfinite(cutoff) and (not found or info.objective_function_value > cutoff):
            return ExactSolution(seed, False, cutoff)  # HiGHS may report a plan above the cutoff "optimal"
        if not found:
            return ExactSolution(seed, False, info.mip_dual_bound)
        x = np.asarray(self._solver.getSolution().col_value)
        blocks = zip(self._offsets[:-1], self._offsets[1:])
        if self._incremental:
            choice = np.array([int(round(x[a:b].sum())) for a, b in blocks])
        else:
            choice = np.array([int(np.argmax(x[a:b])) for a, b in blocks])
        return ExactSolution(choice, status == self._highspy.HighsModelStatus.kOptimal, info.mip_dual_bound)

    def _solution_of(self, choice: np.ndarray) -> object:
        values = np.zeros(self._time_col + 1)
        if self._incremental:
            for first, k in zip(self._offsets[:-1].tolist(), choice.tolist()):
                values[first : first + k] = 1.0
        else:
            values[self._offsets[:-1] + choice] = 1.0
        start, end = earliest_schedule(self._dag, option_durations(self._options, choice))
        values[self._start_col : self._time_col] = start
        values[self._time_col] = end.max()
        solution = self._highspy.HighsSolution()
        solution.col_value = values.tolist()
        return solution
