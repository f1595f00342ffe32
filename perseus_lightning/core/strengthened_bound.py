"""A lower bound on the energy of every plan that finishes by a deadline, tighter than the LP's.

The LP relaxation (:class:`~perseus_lightning.core.relaxation.HullRelaxation`) lets every
instruction take any duration at the cost of its options' lower convex hull. Near ``T_min`` that is
loose in two ways that no plan can exploit, since every instruction runs at least as long as its
fastest option:

1. **Options that cannot fit.** An instruction starts no earlier than in the all-fastest schedule
   and ends no later than that schedule's latest finish at the deadline, so an option slower than
   that window is in no plan (:func:`fitting_options`). The hull of the rest can lie higher.
2. **Pairs that cannot fill their window.** Two instructions joined by an edge of the DAG (one
   after the other on a rank, or a data dependency) share such a window too, from the first's
   earliest start to the second's latest finish. Their summed cost is at least the cheapest pair
   of options that fits it, where the hulls may price a pair of durations between options below
   it. At ``T_min``, a rank beside the critical one has such a window once per steady-state period
   of 1F1B (the pinned rank's backward end to its next forward's start).
3. **Pairs in a window that another path sets** (:func:`window_floors`). Above ``T_min`` those
   windows widen, but a pair ``first -> second`` still runs between the end of a predecessor
   ``before`` of ``first`` and the start of a successor ``after`` of ``second``, a gap ``w`` no
   shorter than the longest other path from ``before`` to ``after`` at max clock (in 1F1B: the next
   rank's forward and backward). The pair costs at least the cheapest pair of options that fits
   ``w``, a falling step function of ``w``; lines below its convex envelope over those ``w`` are
   rows in the LP's start and duration columns, valid at every deadline.

:func:`strengthened_lower_bound` solves the LP over the fitting options' hulls with those rows. It is
still a lower bound: any plan's durations, each shortened until its hull cost equals the cost of the
option it runs, satisfy every row (a shorter ``before`` only widens ``w``) and keep every path within
the deadline, at the plan's own energy. It proves what no planner can reach; the planner itself
keeps the plain LP, against which the project's targets are set (``bench/planner.py``,
docs/planner.md), and rounds the optimum with window floors as one more start near ``T_min``
(:mod:`perseus_lightning.core.rounding`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.options import ClockOptions, lower_hull_indices
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.simulator import earliest_schedule, latest_starts

FIT_TOLERANCE = 1e-9
"""Relative slack (of the deadline) on every window: float noise in the schedules."""
NARROWEST_PIECE = 1e-6
"""Relative width below which :func:`window_floors` leaves a piece of an envelope out (a valid,
weaker bound): a steeper line would be at odds with the LP's feasibility tolerance."""
WINDOW_PATH_NODES = 4
"""Most instructions on the other paths from ``before`` to ``after`` that :func:`window_floors`
follows: the longest path among those is still no longer than the gap in any plan."""


@dataclass(frozen=True)
class WindowFloor:
    """Every plan spends at least ``intercept + slope * w`` (J) on the nodes ``pair``, where ``w`` is
    the time (s) from the end of node ``gap[0]`` to the start of node ``gap[1]``."""

    pair: tuple[int, int]
    gap: tuple[int, int]
    slope: float
    intercept: float


def fitting_options(dag: InstructionDAG, options: list[ClockOptions], deadline: float) -> list[ClockOptions]:
    """Each node's options that fit its window at ``deadline`` (from its earliest start to its latest
    finish with every node at its fastest option): a prefix of its own, so option indices keep
    their meaning. No plan finishing by ``deadline`` uses an option left out."""
    return _fitting(options, *_windows(dag, options, deadline))


def _fitting(options: list[ClockOptions], earliest: np.ndarray, latest_finish: np.ndarray) -> list[ClockOptions]:
    kept: dict[tuple[int, int], ClockOptions] = {}
    result = []
    for opt, window in zip(options, (latest_finish - earliest).tolist()):
        count = max(int(np.searchsorted(opt.time, window, side="right")), 1)
        key = (id(opt), count)
        if key not in kept:
            kept[key] = ClockOptions(opt.frequencies[:count], opt.time[:count], opt.cost[:count])
        result.append(kept[key])
    return result


def strengthened_lower_bound(dag: InstructionDAG, options: list[ClockOptions], p2p_power: float, deadline: float) -> float:
    """Energy (J) that no plan finishing by ``deadline`` can beat: the LP bound over the options
    that fit, with the two instructions of each edge costing at least the cheapest pair of options
    that fits their shared window, and the :func:`window_floors`. At least the plain LP bound at
    ``deadline`` (up to the LP's tolerances)."""
    fitting, floors = pair_cost_floors(dag, options, deadline)
    relaxation = HullRelaxation(dag, fitting, p2p_power)
    for first, second, floor in floors:
        relaxation.add_cost_floor([first, second], floor)
    relaxation.add_window_floors(window_floors(dag, fitting))
    return float(relaxation.solve(deadline).lower_bound)


def window_floors(dag: InstructionDAG, options: list[ClockOptions]) -> list[WindowFloor]:
    """Rows that every plan satisfies at any deadline: per edge ``first -> second``, predecessor
    ``before`` of ``first`` and successor ``after`` of ``second`` whose other paths at max clock
    leave the pair a gap longer than its fastest options need, the lines below the convex envelope
    of the pair's least cost over the gaps it can get."""
    fastest = [opt.time_list[0] for opt in options]
    gaps: dict[int, dict[int, float]] = {}
    lines: dict[tuple[int, int, float], list[tuple[float, float]]] = {}  # nodes of a stage and kind share options
    floors = []
    for first, second in zip(dag.edge_sources.tolist(), dag.edge_targets.tolist()):
        for before in dag.predecessors[first]:
            if before not in gaps:
                gaps[before] = _gaps_after(dag, fastest, before)
            for after in dag.successors[second]:
                shortest = gaps[before].get(after, 0.0)
                if shortest > (fastest[first] + fastest[second]) * (1 + FIT_TOLERANCE):
                    key = (id(options[first]), id(options[second]), shortest)
                    if key not in lines:
                        lines[key] = _floor_lines(options[first], options[second], shortest)
                    floors += [WindowFloor((first, second), (before, after), slope, intercept) for slope, intercept in lines[key]]
    return floors


def _gaps_after(dag: InstructionDAG, fastest: list[float], node: int) -> dict[int, float]:
    """Per node reached from ``node`` through at most :data:`WINDOW_PATH_NODES` others, the longest
    time from ``node``'s end to its start along those paths at max clock: no plan starts it sooner."""
    gaps: dict[int, float] = {}
    reached = dict.fromkeys(dag.successors[node], 0.0)
    for _ in range(WINDOW_PATH_NODES + 1):
        following: dict[int, float] = {}
        for other, gap in reached.items():
            if gap > gaps.get(other, -1.0):
                gaps[other] = gap
                for successor in dag.successors[other]:
                    following[successor] = max(following.get(successor, -1.0), gap + fastest[other])
        reached = following
    return gaps


def _floor_lines(first: ClockOptions, second: ClockOptions, shortest: float) -> list[tuple[float, float]]:
    """``(slope, intercept)`` of the pieces of the lower convex envelope, over gaps ``w >= shortest``,
    of the least summed cost of an option of each that fit ``w`` together (a falling step function):
    each line is at or below it there. Pieces narrower than :data:`NARROWEST_PIECE` are left out."""
    times = (first.time[:, None] + second.time[None, :]).ravel()
    costs = (first.cost[:, None] + second.cost[None, :]).ravel()
    corner_times, corner_costs = [shortest], [_cheapest_pair(first, second, shortest)]
    for k in np.argsort(times, kind="stable").tolist():
        if times[k] > shortest and costs[k] < corner_costs[-1]:
            corner_times.append(float(times[k]))
            corner_costs.append(float(costs[k]))
    hull = lower_hull_indices(np.array(corner_times), np.array(corner_costs))
    lines = []
    for a, b in zip(hull, hull[1:]):
        (t1, c1), (t2, c2) = (corner_times[a], corner_costs[a]), (corner_times[b], corner_costs[b])
        slope = (c2 - c1) / (t2 - t1)
        if t2 - t1 > NARROWEST_PIECE * t2 and not (lines and abs(slope - lines[-1][0]) <= 1e-9 * abs(slope)):
            lines.append((slope, c1 - slope * t1))  # (a piece in line with the last, by float noise, adds nothing)
    return lines


def pair_cost_floors(
    dag: InstructionDAG, options: list[ClockOptions], deadline: float
) -> tuple[list[ClockOptions], list[tuple[int, int, float]]]:
    """The options that fit ``deadline`` (:func:`fitting_options`) and, per DAG edge, ``(first,
    second, floor)``: every plan finishing by ``deadline`` spends at least ``floor`` (J) on the two,
    the cheapest pair of their fitting options that fits their shared window. Valid rows for any
    model of those plans, e.g. :meth:`~perseus_lightning.core.exact.ExactPlanner.add_cost_floor`."""
    earliest, latest_finish = _windows(dag, options, deadline)
    fitting = _fitting(options, earliest, latest_finish)
    floors = [
        (first, second, _cheapest_pair(fitting[first], fitting[second], latest_finish[second] - earliest[first]))
        for first, second in zip(dag.edge_sources.tolist(), dag.edge_targets.tolist())
    ]
    return fitting, floors


def _windows(dag: InstructionDAG, options: list[ClockOptions], deadline: float) -> tuple[np.ndarray, np.ndarray]:
    """Per node, its earliest start and latest finish (plus ``FIT_TOLERANCE``) in every plan that
    finishes by ``deadline``: those of the all-fastest schedule."""
    fastest = np.array([opt.time[0] for opt in options])
    earliest, end = earliest_schedule(dag, fastest)
    t_min = float(end.max())
    if deadline < t_min * (1 - FIT_TOLERANCE):
        raise PlanError(
            f"deadline {deadline:.6g} s is below the iteration time with every instruction at its fastest clock, "
            f"{t_min:.6g} s: no plan finishes by it. Fix: pass a deadline of at least that (T_min)."
        )
    return earliest, latest_starts(dag, fastest, deadline) + fastest + FIT_TOLERANCE * deadline


def _cheapest_pair(first: ClockOptions, second: ClockOptions, window: float) -> float:
    """The least summed cost of an option of each whose times add up to at most ``window``."""
    cost = first.cost[:, None] + second.cost[None, :]
    fits = first.time[:, None] + second.time[None, :] <= window
    return float(cost[fits].min())
