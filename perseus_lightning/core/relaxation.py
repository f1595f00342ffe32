"""The LP relaxation of frequency planning: a lower bound on energy at any deadline.

Each instruction may take any duration between its fastest and its cheapest option, at the
cost of the lower convex hull of its options. Subject to the DAG's precedence constraints and
a deadline ``D`` on every path, the minimum of the summed cost, plus the idle energy
``R * P_block * D``, is a lower bound on the energy of every plan that finishes by ``D``.

The model is built once and re-solved with HiGHS's dual simplex for each deadline: only the
deadline rows change, so every solve after the first starts from the previous optimal basis.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sparse

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.options import ClockOptions


@dataclass(frozen=True)
class RelaxedSolution:
    """Optimum of the relaxation at one deadline."""

    deadline: float
    lower_bound: float
    """Iteration energy (J) that no plan finishing by ``deadline`` can beat."""
    durations: np.ndarray
    """Per-node durations of the relaxed optimum."""


class HullRelaxation:
    """The convex-hull LP of one DAG, re-solvable at any deadline.

    Variables per node: start ``s``, duration ``d`` within the hull's time range, and cost ``c``
    above every hull segment (or above ``max_segments`` of them, evenly chosen: a smaller LP whose
    bound is still valid, only weaker); plus the deadline ``D``, charged the idle power of every GPU. Rows:
    ``s_u + d_u <= s_v`` per edge and ``s + d <= D`` per sink node. Fixing ``D`` gives the bound
    at that deadline; leaving it free gives the minimum-energy iteration time ``T*``.
    """

    def __init__(
        self, dag: InstructionDAG, options: list[ClockOptions], p2p_power: float, max_segments: int | None = None
    ) -> None:
        import highspy

        self._highspy = highspy
        self._idle_power = p2p_power * dag.num_ranks
        n = dag.num_nodes
        inf = highspy.kHighsInf
        hulls = [opt.lower_hull() for opt in options]
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        row = 0
        # Precedence: s_u + d_u - s_v <= 0.
        src, dst = dag.edge_sources, dag.edge_targets
        m = len(src)
        edge_rows = np.arange(m)
        rows += [edge_rows, edge_rows, edge_rows]
        cols += [src, n + src, dst]
        vals += [np.ones(m), np.ones(m), -np.ones(m)]
        row += m
        # Deadline: s + d - D <= 0 on nodes without successors.
        sinks = np.array([i for i in range(n) if not dag.successors[i]], dtype=np.int64)
        sink_rows = np.arange(row, row + len(sinks))
        rows += [sink_rows, sink_rows, sink_rows]
        cols += [sinks, n + sinks, np.full(len(sinks), 3 * n)]
        vals += [np.ones(len(sinks)), np.ones(len(sinks)), -np.ones(len(sinks))]
        row += len(sinks)
        # Cost epigraph: slope * d - c <= -intercept for every hull segment.
        upper = [np.zeros(m), np.zeros(len(sinks))]
        for i, (t, c) in enumerate(hulls):
            if len(t) < 2:
                continue
            slope = np.diff(c) / np.diff(t)
            intercept = c[:-1] - slope * t[:-1]
            if max_segments is not None and len(slope) > max_segments:
                keep = np.unique(np.linspace(0, len(slope) - 1, max_segments).round().astype(int))
                slope, intercept = slope[keep], intercept[keep]
            k = len(slope)
            seg_rows = np.arange(row, row + k)
            rows += [seg_rows, seg_rows]
            cols += [np.full(k, n + i), np.full(k, 2 * n + i)]
            vals += [slope, -np.ones(k)]
            upper.append(-intercept)
            row += k
        num_cols = 3 * n + 1
        matrix = sparse.csc_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(row, num_cols)
        )
        single = np.array([len(t) == 1 for t, _ in hulls])
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = num_cols, row
        lp.col_cost_ = np.concatenate([np.zeros(2 * n), np.ones(n), [self._idle_power]])
        lp.col_lower_ = np.concatenate(
            [np.zeros(n), [t[0] for t, _ in hulls], np.where(single, [c[0] for _, c in hulls], -inf), [0.0]]
        )
        lp.col_upper_ = np.concatenate([np.full(n, inf), [t[-1] for t, _ in hulls], np.full(n, inf), [inf]])
        lp.row_lower_ = np.full(row, -inf)
        lp.row_upper_ = np.concatenate(upper)
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = num_cols, row
        lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = matrix.indptr, matrix.indices, matrix.data
        with quiet_stdout():  # HiGHS prints a banner on construction
            self._solver = highspy.Highs()
        self._solver.setOptionValue("output_flag", False)
        self._solver.passModel(lp)
        self._n = n

    def solve(self, deadline: float) -> RelaxedSolution:
        """The relaxation's optimum over iteration times up to ``deadline``: a lower bound for every
        plan that finishes by ``deadline`` (past ``T*`` the optimum stays at ``T*``)."""
        return self._solve(0.0, deadline)

    def min_energy(self, earliest: float = 0.0) -> RelaxedSolution:
        """The relaxation's minimum-energy point over all deadlines from ``earliest`` on: its ``T*``."""
        return self._solve(earliest, self._highspy.kHighsInf)

    def _solve(self, lower: float, upper: float) -> RelaxedSolution:
        self._solver.changeColBounds(3 * self._n, lower, upper)
        self._solver.run()
        status = self._solver.getModelStatus()
        if status != self._highspy.HighsModelStatus.kOptimal:
            raise ValueError(f"the relaxation with deadline in [{lower}, {upper}] s is {self._solver.modelStatusToString(status)}")
        x = np.asarray(self._solver.getSolution().col_value)
        bound = self._solver.getInfo().objective_function_value
        return RelaxedSolution(float(x[3 * self._n]), bound, x[self._n : 2 * self._n].copy())


@contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silence the C-level standard output (file descriptor 1) for the duration."""
    import sys

    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
