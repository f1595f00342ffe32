"""HiGHS models of a DAG's path constraints, shared by the LP relaxation and the exact MILP.

Both models give every node a start column ``s`` and a set of *duration columns* whose weighted
sum is (the variable part of) its duration, plus one iteration-time column ``T``; both need one
row per edge ``u -> v`` (``u`` ends before ``v`` starts) and one per sink (it ends by ``T``).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import scipy.sparse as sparse


def edge_rows(
    sources: np.ndarray,
    targets: np.ndarray,
    sinks: np.ndarray,
    offsets: np.ndarray,
    weights: np.ndarray,
    first_duration_col: int,
    first_start_col: int,
    time_col: int,
) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Coordinates of the path rows, numbered from 0: per edge ``u -> v`` (``sources[k] -> targets[k]``),
    ``weights . durations(u) + s_u - s_v``; then per sink ``i``, ``weights . durations(i) + s_i - T``.

    Node ``i``'s duration columns are ``first_duration_col + offsets[i]`` up to ``first_duration_col
    + offsets[i + 1]``, weighted by ``weights[offsets[i]:offsets[i + 1]]``; its start column is
    ``first_start_col + i``. Returns ``(rows, cols, vals, tails)``: lists of arrays for a COO matrix,
    and each row's tail node, whose constant duration part the caller puts in the row's bound.
    """
    tails = np.concatenate([sources, sinks])
    counts = np.diff(offsets)[tails]
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    members = np.repeat(offsets[tails], counts) + within
    row_of_tail = np.arange(len(tails))
    rows = [np.repeat(row_of_tail, counts), row_of_tail, np.arange(len(sources)), len(sources) + np.arange(len(sinks))]
    cols = [first_duration_col + members, first_start_col + tails, first_start_col + targets, np.full(len(sinks), time_col)]
    vals = [weights[members], np.ones(len(tails)), -np.ones(len(sources)), -np.ones(len(sinks))]
    return rows, cols, vals, tails


def load_model(lp: Any, rows: list[np.ndarray], cols: list[np.ndarray], vals: list[np.ndarray]) -> Any:
    """A quiet ``highspy.Highs`` holding ``lp`` (columns, bounds and costs set) with the constraint
    matrix given by COO coordinates."""
    import highspy

    matrix = sparse.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(lp.num_row_, lp.num_col_)
    )
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = lp.num_col_, lp.num_row_
    lp.a_matrix_.start_, lp.a_matrix_.index_, lp.a_matrix_.value_ = matrix.indptr, matrix.indices, matrix.data
    solver = quiet_solver()
    solver.passModel(lp)
    return solver


class ConstraintRows:
    """Rows ``lower <= sum(value * column) <= upper``, collected one by one, for :func:`solve_small_milp`."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.cols: list[int] = []
        self.vals: list[float] = []
        self.lower: list[float] = []
        self.upper: list[float] = []

    def add(self, terms: Iterable[tuple[int, float]], lower: float, upper: float) -> None:
        """One row over ``terms``, ``(column, value)`` pairs."""
        for col, value in terms:
            self.rows.append(len(self.upper))
            self.cols.append(col)
            self.vals.append(value)
        self.lower.append(lower)
        self.upper.append(upper)


def solve_small_milp(lp: Any, rows: ConstraintRows, max_nodes: int, start: np.ndarray | None = None) -> np.ndarray | None:
    """Column values of the MILP ``lp`` (columns, bounds, costs and integrality set) under ``rows``,
    solved to a relative gap of 1e-6 within ``max_nodes`` branch-and-bound nodes (deterministic,
    unlike a time limit), with tight feasibility tolerances; ``None`` if HiGHS found no feasible point.
    ``start``, a feasible point if given, is HiGHS's first incumbent. The planner's window MILPs
    (relax-and-fix, neighbourhood search) are of this kind."""
    import highspy

    lp.num_row_ = len(rows.upper)
    lp.row_lower_, lp.row_upper_ = np.array(rows.lower), np.array(rows.upper)
    solver = load_model(lp, [np.array(rows.rows)], [np.array(rows.cols)], [np.array(rows.vals)])
    for option, value in (
        ("mip_rel_gap", 1e-6), ("mip_max_nodes", max_nodes),
        ("mip_feasibility_tolerance", 1e-10), ("primal_feasibility_tolerance", 1e-10),
        ("mip_heuristic_run_feasibility_jump", False),  # 40 % of the time of these small MILPs, for nothing
    ):
        solver.setOptionValue(option, value)
    if start is not None:
        incumbent = highspy.HighsSolution()
        incumbent.col_value, incumbent.value_valid = start.tolist(), True
        solver.setSolution(incumbent)
    solver.run()
    if solver.getInfo().primal_solution_status != highspy.kSolutionStatusFeasible:
        return None
    return np.asarray(solver.getSolution().col_value)


def quiet_solver() -> Any:
    """A ``highspy.Highs`` that prints nothing and runs on one thread where it can (see :func:`_threads`)."""
    solver = _silent_highs()
    solver.setOptionValue("threads", _threads())
    return solver


def _silent_highs() -> Any:
    """A ``highspy.Highs`` with HiGHS's own settings, except that it prints nothing."""
    import highspy

    with _quiet_stdout():  # HiGHS prints a banner on construction
        solver = highspy.Highs()
    solver.setOptionValue("output_flag", False)
    return solver


@functools.cache
def _threads() -> int:
    """1 if this process's HiGHS may run on one thread, else 0 (HiGHS's choice).

    The planner's models are small MILPs and LPs, thousands per frontier. With HiGHS's default
    thread count, its scheduler's second thread busy-waits between them: a fifth more CPU time
    for the same plans' work (session 11, 2 cores). HiGHS starts one scheduler per process, on
    the first run, and refuses a later run that asks for another thread count; 0 accepts any. So
    if another highspy user in this process started it first with more threads, 0 it is.
    """
    import highspy

    probe = _silent_highs()
    probe.setOptionValue("threads", 1)
    lp = highspy.HighsLp()
    lp.num_col_, lp.col_cost_, lp.col_lower_, lp.col_upper_ = 1, np.array([1.0]), np.array([0.0]), np.array([1.0])
    probe.passModel(lp)
    return 1 if probe.run() == highspy.HighsStatus.kOk else 0


@contextmanager
def _quiet_stdout() -> Iterator[None]:
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
