"""The LP relaxation of frequency planning: a lower bound on energy at any deadline.

Each instruction may take any duration between its fastest and its cheapest option, at the
cost of the lower convex hull of its options. Subject to the DAG's precedence constraints and
a deadline ``D`` on every path, the minimum of the summed cost, plus the idle energy
``R * P_block * D``, is a lower bound on the energy of every plan that finishes by ``D``.

The model is built once and re-solved with HiGHS's dual simplex for each deadline: only the
deadline's bound changes, so every solve after the first starts from the previous optimal basis.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.highs_model import edge_rows, load_model
from perseus_lightning.core.options import ClockOptions

if TYPE_CHECKING:
    from perseus_lightning.core.strengthened_bound import WindowFloor

FACE_SLACK = 1e-9
"""Relative slack on the optimal cost within which :meth:`SegmentLP.other_optima` looks (float noise)."""
FLOOR_TOLERANCE = 1e-7
"""How far (J) an optimum may fall short of a window floor's row before the row is added: HiGHS's
own primal feasibility tolerance."""
FACE_FEASIBILITY = 1e-9
"""HiGHS's primal feasibility tolerance (s) in those solves: with HiGHS's default, 1e-7, a random
objective's vertex could end 1e-8 of the deadline late on short pipelines."""


@dataclass(frozen=True)
class RelaxedSolution:
    """Optimum of the relaxation at one deadline."""

    deadline: float
    lower_bound: float | None
    """Iteration energy (J) that no plan finishing by ``deadline`` can beat; ``None`` from a
    restricted LP (:mod:`perseus_lightning.core.periodic`), which bounds nothing."""
    durations: np.ndarray
    """Per-node durations of the relaxed optimum."""


class SegmentLP:
    """An LP whose node durations are each node's fastest time plus its filled hull segments, with
    an iteration-time column ``D``: solvable at any deadline (subclasses build the model)."""

    bounds = True
    """Whether the optimum is a lower bound on every plan's energy (not for restrictions)."""
    _solver: Any
    _fastest: np.ndarray
    _segment_costs: np.ndarray
    """Each segment column's cost per second (its hull slope, times its node's copies)."""
    _fastest_costs: list[float]
    """Each node's cost at its fastest time (times its copies): the constant part of its cost."""
    _offsets: np.ndarray
    _first_segment_col: int
    _deadline_col: int

    def solve(self, deadline: float) -> RelaxedSolution:
        """The optimum over iteration times up to ``deadline`` (past ``T*`` it stays at ``T*``)."""
        return self._solve(0.0, deadline)

    def solve_afresh(self, deadline: float) -> RelaxedSolution:
        """:meth:`solve`, not warm-started from an earlier solve: the same optimal vertex whatever
        this LP solved before (the LP is degenerate, and warm starts land on different vertices)."""
        self._solver.clearSolver()
        return self._solve(0.0, deadline)

    def min_energy(self, earliest: float = 0.0) -> RelaxedSolution:
        """The minimum-energy point over all deadlines from ``earliest`` on: the LP's ``T*``."""
        import highspy

        return self._solve(earliest, highspy.kHighsInf)

    def other_optima(self, deadline: float, count: int, seed: int) -> list[np.ndarray]:
        """Per-node durations of up to ``count`` vertices of the optimal face at ``deadline``: the
        optimum solved afresh (not warm-started from another deadline), then, with the cost held
        at it, the optima of random objectives over the segment columns. The LP is degenerate and
        roundings of its optimal vertices differ (:mod:`perseus_lightning.core.rounding`). The same
        vertices for the same ``seed``; the model is left as built."""
        import highspy

        solver = self._solver
        optimum = self.solve_afresh(deadline)
        found = [optimum.durations]
        segments = int(self._offsets[-1])
        columns = np.arange(self._first_segment_col, self._first_segment_col + segments, dtype=np.int32)
        cost = float(self._segment_costs @ np.asarray(solver.getSolution().col_value)[columns])
        idle_cost = solver.getLp().col_cost_[self._deadline_col]
        _, tolerance = solver.getOptionValue("primal_feasibility_tolerance")
        solver.changeColBounds(self._deadline_col, optimum.deadline, optimum.deadline)
        solver.changeColCost(self._deadline_col, 0.0)
        solver.addRow(-highspy.kHighsInf, cost + FACE_SLACK * abs(cost), segments, columns, self._segment_costs)
        solver.setOptionValue("primal_feasibility_tolerance", FACE_FEASIBILITY)
        rng = np.random.default_rng(seed)
        for _ in range(count - 1):
            solver.changeColsCost(segments, columns, rng.standard_normal(segments))
            solver.run()
            if solver.getModelStatus() != highspy.HighsModelStatus.kOptimal:
                break
            found.append(self._durations(np.asarray(solver.getSolution().col_value)))
        solver.deleteRows(1, np.array([solver.getNumRow() - 1], dtype=np.int32))
        solver.changeColsCost(segments, columns, self._segment_costs)
        solver.changeColCost(self._deadline_col, idle_cost)
        solver.setOptionValue("primal_feasibility_tolerance", tolerance)
        solver.clearSolver()
        return found

    def admits(self, deadline: float) -> bool:
        """Whether the LP has a solution finishing by ``deadline``."""
        return self._run(0.0, deadline)

    def _unfold(self, durations: np.ndarray) -> np.ndarray:
        """Per-DAG-node durations of the LP's per-column-node ``durations``."""
        return durations

    def _load(
        self,
        hulls: list[tuple[np.ndarray, np.ndarray]],
        copies: np.ndarray,
        sources: np.ndarray,
        targets: np.ndarray,
        sinks: np.ndarray,
        idle_power: float,
        lags: np.ndarray | None = None,
    ) -> None:
        """Build and load the model of nodes with lower ``hulls``, each standing for ``copies`` instructions:
        a start column per node, the segment columns, with ``lags`` (per edge, then per sink) a
        period column ``P`` added ``lag`` times to each path row, and the iteration-time column ``D``."""
        import highspy

        m = len(hulls)
        self._fastest = np.array([t[0] for t, _ in hulls])
        lengths = [np.diff(t) for t, _ in hulls]
        slopes = [k * np.diff(c) / np.diff(t) for k, (t, c) in zip(copies.tolist(), hulls)]
        self._segment_costs = np.concatenate(slopes)
        self._fastest_costs = [k * float(c[0]) for k, (_, c) in zip(copies.tolist(), hulls)]
        self._offsets = np.concatenate([[0], np.cumsum([len(x) for x in lengths])])
        segments = int(self._offsets[-1])
        self._first_segment_col = m
        self._deadline_col = m + segments + (lags is not None)
        rows, cols, vals, tails = edge_rows(sources, targets, sinks, self._offsets, np.ones(segments), m, 0, self._deadline_col)
        period: list[float] = []
        if lags is not None:
            lagged = np.flatnonzero(lags)
            rows.append(lagged)
            cols.append(np.full(len(lagged), m + segments))
            vals.append(lags[lagged].astype(float))
            period = [0.0]
        inf = highspy.kHighsInf
        lp = highspy.HighsLp()
        lp.num_col_, lp.num_row_ = self._deadline_col + 1, len(tails)
        lp.col_cost_ = np.concatenate([np.zeros(m), self._segment_costs, period, [idle_power]])
        lp.col_lower_ = np.zeros(lp.num_col_)
        lp.col_upper_ = np.concatenate([np.full(m, inf), *lengths, [inf] * len(period), [inf]])
        lp.row_lower_ = np.full(lp.num_row_, -inf)
        lp.row_upper_ = -self._fastest[tails]  # the fastest time is the duration's constant part
        lp.offset_ = float(sum(self._fastest_costs))
        self._solver = load_model(lp, rows, cols, vals)

    def _run(self, lower: float, upper: float) -> bool:
        """Solve with the iteration time in ``[lower, upper]``; whether an optimum was found."""
        import highspy

        self._solver.changeColBounds(self._deadline_col, lower, upper)
        self._solver.run()
        return self._solver.getModelStatus() == highspy.HighsModelStatus.kOptimal

    def _solve(self, lower: float, upper: float) -> RelaxedSolution:
        if not self._run(lower, upper):
            status = self._solver.modelStatusToString(self._solver.getModelStatus())
            raise ValueError(f"{type(self).__name__} with deadline in [{lower}, {upper}] s is {status}")
        x = np.asarray(self._solver.getSolution().col_value)
        bound = self._solver.getInfo().objective_function_value if self.bounds else None
        return RelaxedSolution(float(x[self._deadline_col]), bound, self._durations(x))

    def _durations(self, x: np.ndarray) -> np.ndarray:
        """Per-DAG-node durations of the LP's column values ``x``."""
        segments = x[self._first_segment_col : self._first_segment_col + self._offsets[-1]]
        filled = np.concatenate([[0.0], np.cumsum(segments)])
        return self._unfold(self._fastest + filled[self._offsets[1:]] - filled[self._offsets[:-1]])


class HullRelaxation(SegmentLP):
    """The convex-hull LP of one DAG, re-solvable at any deadline.

    Each node's duration is its fastest time plus one variable per hull segment, bounded by the
    segment's length and charged its (negative, rising) slope, so the LP fills a node's cheapest
    segments first and its cost follows the hull exactly. Variables: start ``s`` per node, the
    segment variables, and the deadline ``D``, charged the idle power of every GPU. Rows: one per
    edge ``u -> v`` (``u`` ends before ``v`` starts) and one per sink node (ends by ``D``); with the
    hull in bounded columns rather than rows, the LP has about two rows per node, which keeps the
    simplex fast. Fixing ``D`` gives the bound at that deadline; leaving it free gives ``T*``.
    """

    def __init__(self, dag: InstructionDAG, options: list[ClockOptions], p2p_power: float) -> None:
        hulls = [opt.lower_hull() for opt in options]
        self._load(hulls, np.ones(dag.num_nodes), dag.edge_sources, dag.edge_targets, dag.sinks, p2p_power * dag.num_ranks)
        self._floor_rows: Any = None
        """The window floors' rows (:meth:`add_window_floors`), a sparse matrix over the columns; ``None`` without."""
        self._floor_lowers = np.empty(0)
        self._floors_in_model = np.empty(0, dtype=bool)
        """Which of them the model has: added by solves that violated them."""
        self._floor_row_ids: list[int] = []
        """The model's row index of each added one."""

    def _segments(self, nodes: list[int]) -> np.ndarray:
        """Indices (among the segment columns) of the hull segments of ``nodes``, in turn."""
        return np.concatenate([np.arange(self._offsets[n], self._offsets[n + 1]) for n in nodes])

    def add_cost_floor(self, nodes: list[int], floor: float) -> None:
        """Add a row: the summed hull cost of ``nodes`` is at least ``floor`` (J). A valid cut when
        every plan finishing by the deadlines solved for spends at least ``floor`` on them."""
        import highspy

        segments = self._segments(nodes)
        constant = sum(self._fastest_costs[n] for n in nodes)
        index = (self._first_segment_col + segments).astype(np.int32)
        self._solver.addRow(floor - constant, highspy.kHighsInf, len(index), index, self._segment_costs[segments])

    def add_window_floors(self, floors: Sequence[WindowFloor]) -> None:
        """Require, per floor, that the summed hull cost of its ``pair`` is at least ``intercept +
        slope * w`` (J), ``w`` the time (s) from the end of ``gap[0]`` to the start of ``gap[1]``.
        Valid cuts when every plan satisfies them (:func:`~perseus_lightning.core.strengthened_bound.window_floors`).

        The rows are kept aside and each solve adds those its optimum violates, then solves again
        (warm-started), until it violates none: the optimum of the LP with every row. On noisy
        profiles there are tens of thousands (35,000 at 8 x 96), of which an optimum needs few; with
        all of them in the model a solve took 17 s instead of well under one."""
        from scipy.sparse import csr_matrix

        if not floors:
            return
        indices, values, lowers = [], [], []
        for floor in floors:
            (first, second), (before, after) = floor.pair, floor.gap
            pair_segments, before_segments = self._segments([first, second]), self._segments([before])
            # w = s_after - s_before - (fastest_before + its segments)
            indices.append(np.concatenate([self._first_segment_col + pair_segments, self._first_segment_col + before_segments, [after, before]]))
            values.append(np.concatenate([self._segment_costs[pair_segments], np.full(len(before_segments), floor.slope), [-floor.slope, floor.slope]]))
            lowers.append(floor.intercept - floor.slope * self._fastest[before] - self._fastest_costs[first] - self._fastest_costs[second])
        starts = np.cumsum([0, *(len(index) for index in indices)])
        self._floor_rows = csr_matrix(
            (np.concatenate(values), np.concatenate(indices), starts), shape=(len(lowers), self._deadline_col + 1)
        )
        self._floor_lowers = np.array(lowers)
        self._floors_in_model = np.zeros(len(lowers), dtype=bool)

    def solve_afresh(self, deadline: float) -> RelaxedSolution:
        """:meth:`SegmentLP.solve_afresh`, with the window-floor rows added by earlier solves taken
        out first: the same optimal vertex whatever this LP solved before."""
        if self._floor_row_ids:
            self._solver.deleteRows(len(self._floor_row_ids), np.array(self._floor_row_ids, dtype=np.int32))
            self._floor_row_ids.clear()
            self._floors_in_model[:] = False
        return super().solve_afresh(deadline)

    def _run(self, lower: float, upper: float) -> bool:
        """:meth:`SegmentLP._run`, adding the window-floor rows that each optimum violates until none is."""
        import highspy

        while super()._run(lower, upper):
            if self._floor_rows is None:
                return True
            x = np.asarray(self._solver.getSolution().col_value)
            violated = np.flatnonzero(~self._floors_in_model & (self._floor_rows @ x < self._floor_lowers - FLOOR_TOLERANCE))
            if not len(violated):
                return True
            rows = self._floor_rows[violated]
            self._floor_row_ids.extend(range(self._solver.getNumRow(), self._solver.getNumRow() + len(violated)))
            self._solver.addRows(
                len(violated), self._floor_lowers[violated], np.full(len(violated), highspy.kHighsInf), rows.nnz,
                rows.indptr[:-1].astype(np.int32), rows.indices.astype(np.int32), rows.data,
            )
            self._floors_in_model[violated] = True
        return False
