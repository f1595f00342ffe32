"""Relax-and-fix rounding of the LP relaxation's durations.

The LP puts most instructions on a vertex of their lower hull and the rest, the *fractional*
ones, between two neighbouring vertices. Rounded one by one, a fractional instruction must take
its faster vertex, which costs energy that the LP never paid; mixing the two vertices across
neighbouring instructions (one slower, the next faster) often fits the deadline just as well.
Relax-and-fix finds such mixes. In the order of the LP's start times it takes windows of
``WINDOW`` fractional instructions and picks one of the two vertices for each with a small MILP in
which every other instruction keeps its duration: earlier windows' chosen vertices, and the LP's
durations for the later ones. Taking every window's faster vertices would fit, so each window keeps
every path within the deadline, and the last one leaves a plan. (Offering the clocks between the
two vertices too was slower and, after slack reclamation, no better.)

A window's MILP needs only its *region*: the instructions on paths between its members. Those
before the region bound its start times by their earliest finishes, which no longer change, and
those after it bound its finishes by their latest starts, which no earlier window changes.
"""

from __future__ import annotations

from bisect import bisect_left

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.highs_model import ConstraintRows, solve_small_milp
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.simulator import earliest_schedule, latest_starts

WINDOW = 20
"""Fractional instructions per MILP."""
MAX_NODES = 200
"""Branch-and-bound nodes per window's MILP (deterministic, unlike a time limit); past it the best
mix found so far is kept, or the window's faster vertices if none was found."""
FLOAT_MARGIN = 1e-7
"""Relative to the horizon: a member whose float falls short of its stretch by less than this still
goes to the MILP, whose feasibility tolerance decides, so skipping the MILP never changes a pick."""
ON_VERTEX = 1e-9
"""Relative distance from a hull vertex within which an LP duration counts as that vertex."""


def relax_and_fix(
    dag: InstructionDAG, options: list[ClockOptions], durations: np.ndarray, deadline: float, window: int = WINDOW
) -> np.ndarray:
    """Option indices of every node, rounded from relaxed per-node ``durations`` that finish by
    ``deadline``; they finish by it too (within the LP's float noise)."""
    choice, brackets, snapped = _vertices(options, durations)
    if not brackets:
        return choice
    return _fix_windows(dag, options, snapped, deadline, choice, brackets, window)


def _vertices(options: list[ClockOptions], durations: np.ndarray) -> tuple[np.ndarray, dict[int, tuple[int, int]], np.ndarray]:
    """``(choice, brackets, snapped)``: per node its hull vertex if ``durations`` put it on one
    (else the faster of the two around it), the two hull vertices around each fractional node, and
    ``durations`` with the nodes on a vertex snapped to it."""
    choice = np.empty(len(options), dtype=np.int64)
    brackets: dict[int, tuple[int, int]] = {}
    snapped = np.asarray(durations, dtype=float).copy()
    for node, (opt, duration) in enumerate(zip(options, snapped.tolist())):
        hull, times = opt.hull, opt.hull_time_list
        above = bisect_left(times, duration)
        nearest = min((k for k in (above - 1, above) if 0 <= k < len(times)), key=lambda k: abs(times[k] - duration))
        if abs(times[nearest] - duration) <= ON_VERTEX * duration:
            choice[node] = hull[nearest]
            snapped[node] = times[nearest]
        else:
            above = min(max(above, 1), len(hull) - 1)
            brackets[node] = (hull[above - 1], hull[above])
            choice[node] = hull[above - 1]
    return choice, brackets, snapped


def _fix_windows(
    dag: InstructionDAG,
    options: list[ClockOptions],
    snapped: np.ndarray,
    deadline: float,
    choice: np.ndarray,
    brackets: dict[int, tuple[int, int]],
    window: int,
) -> np.ndarray:
    """Fix the ``brackets`` nodes window by window, in the order of their start times under the LP's
    ``snapped`` durations; every other node keeps its duration (its fixed vertex's, or the LP's until
    its window comes)."""
    current = snapped.copy()
    start, end = earliest_schedule(dag, snapped)
    horizon = max(deadline, float(end.max()))
    latest = latest_starts(dag, current, horizon).tolist()
    order = dag.by_start(start)  # a topological order, by the LP's start times
    position = np.empty(dag.num_nodes, dtype=np.int64)
    position[order] = np.arange(dag.num_nodes)
    fractional = sorted(brackets, key=lambda node: position[node])
    windows = _Windows(dag, options, order.tolist(), position.tolist(), latest, horizon)
    for first in range(0, len(fractional), window):
        members = fractional[first : first + window]
        picked = windows.solve(members, brackets, current)
        choice[members] = picked
        current[members] = [options[node].time[k] for node, k in zip(members, picked.tolist())]
    return choice


class _Windows:
    """The MILPs of successive windows, with the earliest finishes of the instructions before them."""

    def __init__(
        self,
        dag: InstructionDAG,
        options: list[ClockOptions],
        order: list[int],
        position: list[int],
        latest: list[float],
        horizon: float,
    ) -> None:
        self.dag, self.options, self.order, self.position = dag, options, order, position
        self.latest, self.horizon = latest, horizon
        self.finish = [0.0] * dag.num_nodes
        self.done = 0
        """Positions before this have their final earliest finish in :attr:`finish`."""

    def _finish_of(self, node: int, current: np.ndarray) -> float:
        return max((self.finish[p] for p in self.dag.predecessors[node]), default=0.0) + float(current[node])

    def solve(self, members: list[int], brackets: dict[int, tuple[int, int]], current: np.ndarray) -> np.ndarray:
        """Option indices of ``members`` (consecutive fractional nodes), each between its bracket."""
        first, last = self.position[members[0]], self.position[members[-1]]
        for p in range(self.done, first):
            node = self.order[p]
            self.finish[node] = self._finish_of(node, current)
        self.done = first
        span = self.order[first : last + 1]
        member_set = set(members)
        preds, succs = self.dag.predecessors, self.dag.successors
        after: set[int] = set()  # descendants of the members (members included) in the span
        for node in span:
            if node in member_set or any(p in after for p in preds[node]):
                after.add(node)
            else:  # not downstream of the window: its finish is final
                self.finish[node] = self._finish_of(node, current)
        before: set[int] = set()  # ancestors of the members in the span
        for node in reversed(span):
            if node in member_set or any(s in before for s in succs[node]):
                before.add(node)
        region = [node for node in span if node in after and node in before]
        return self._mix(region, members, brackets, current, after, before)

    def _any_fits_alone(
        self,
        region: list[int],
        column: dict[int, int],
        stretch: dict[int, float],
        earliest_start: list[float],
        fixed: list[float],
        due: list[float],
    ) -> bool:
        """Whether some member (a key of ``stretch``) fits at its slower vertex while every other
        member keeps its faster one: its *float* (its latest finish minus its earliest finish, every
        member faster) covers its stretch, up to ``FLOAT_MARGIN``. If none does, the window's only
        feasible pick is every member faster."""
        preds, succs = self.dag.predecessors, self.dag.successors
        finish = [0.0] * len(region)
        for k, node in enumerate(region):
            finish[k] = max([earliest_start[k], *(finish[column[p]] for p in preds[node] if p in column)]) + fixed[k]
        latest_finish = [0.0] * len(region)
        for k in range(len(region) - 1, -1, -1):
            latest_finish[k] = min([due[k], *(latest_finish[column[s]] - fixed[column[s]] for s in succs[region[k]] if s in column)])
        margin = FLOAT_MARGIN * self.horizon
        return any(latest_finish[column[node]] - finish[column[node]] + margin >= extra for node, extra in stretch.items())

    def _mix(
        self,
        region: list[int],
        members: list[int],
        brackets: dict[int, tuple[int, int]],
        current: np.ndarray,
        after: set[int],
        before: set[int],
    ) -> np.ndarray:
        """The MILP over ``region``: a start column per node, and per member a 0/1 column that picks
        its slower vertex; every other node keeps its ``current`` duration."""
        import highspy

        column = {node: k for k, node in enumerate(region)}
        slower = {node: len(region) + k for k, node in enumerate(members)}
        rows = ConstraintRows()
        inf = highspy.kHighsInf
        earliest_start, fixed, due = [], [], []
        for node in region:
            fixed.append(float(self.options[node].time[brackets[node][0]]) if node in slower else float(current[node]))
            earliest_start.append(max((self.finish[p] for p in self.dag.predecessors[node] if p not in after), default=0.0))
            successors = self.dag.successors[node]
            due.append(min((self.latest[s] for s in successors if s not in before), default=np.inf) if successors else self.horizon)
        stretch = {node: float(self.options[node].time[brackets[node][1]]) - fixed[column[node]] for node in members}
        faster = np.array([brackets[node][0] for node in members])
        if not self._any_fits_alone(region, column, stretch, earliest_start, fixed, due):
            return faster  # the only feasible pick
        for k, node in enumerate(region):
            terms = [(slower[node], stretch[node])] if node in slower else []
            if np.isfinite(due[k]):
                rows.add([(k, 1.0), *terms], -inf, due[k] - fixed[k])
            for succ in self.dag.successors[node]:
                if succ in column:
                    rows.add([(k, 1.0), (column[succ], -1.0), *terms], -inf, -fixed[k])
        saving = [
            float(self.options[node].cost[brackets[node][1]] - self.options[node].cost[brackets[node][0]]) for node in members
        ]
        lp = highspy.HighsLp()
        lp.num_col_ = len(region) + len(members)
        lp.col_cost_ = np.concatenate([np.zeros(len(region)), saving])
        lp.col_lower_ = np.concatenate([earliest_start, np.zeros(len(members))])
        lp.col_upper_ = np.concatenate([np.full(len(region), inf), np.ones(len(members))])
        lp.integrality_ = [highspy.HighsVarType.kContinuous] * len(region) + [highspy.HighsVarType.kInteger] * len(members)
        values = solve_small_milp(lp, rows, MAX_NODES)
        if values is None:
            return faster
        picks = values[len(region) :] > 0.5
        return np.where(picks, [brackets[node][1] for node in members], faster)
