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

:func:`strengthened_lower_bound` solves the LP over the fitting options' hulls with one row per
edge, its pair's summed hull cost at least that floor. It is still a lower bound: any plan's durations,
each shortened until its hull cost equals the cost of the option it runs, satisfy every row and
keep every path within the deadline, at the plan's own energy. It proves what no planner can reach;
the planner itself keeps the plain LP, against which the project's targets are set
(``bench/planner.py``, docs/planner.md).
"""

from __future__ import annotations

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.simulator import earliest_schedule, latest_starts

FIT_TOLERANCE = 1e-9
"""Relative slack (of the deadline) on every window: float noise in the schedules."""


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
    that fits their shared window. At least the plain LP bound at ``deadline`` (up to the LP's
    tolerances)."""
    fitting, floors = pair_cost_floors(dag, options, deadline)
    relaxation = HullRelaxation(dag, fitting, p2p_power)
    for first, second, floor in floors:
        relaxation.add_cost_floor([first, second], floor)
    return float(relaxation.solve(deadline).lower_bound)


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
