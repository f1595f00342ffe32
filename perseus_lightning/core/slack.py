"""Slack reclamation: slow instructions down within their slack, never past a deadline.

:func:`reclaim_slack` is one backward pass over the DAG in reverse topological order. Each
instruction gets its cheapest clock option whose time still fits between its earliest start under
the starting choice and the latest start of its successors. Its predecessors are then bounded by
its own latest start, so the iteration never ends after the deadline, and no instruction ever gets
a costlier option. The backward pass hands slack to the latest instructions first;
:func:`reclaim_slack_forward` is its mirror image, which hands it to the earliest first.
"""

from __future__ import annotations

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.simulator import earliest_schedule, latest_starts

_TOLERANCE = 1e-12
DEADLINE_TOLERANCE = 1e-9
"""How far past the deadline (relative) a starting choice may end: floating-point noise of the LP."""


def option_durations(options: list[ClockOptions], choice: np.ndarray) -> np.ndarray:
    """Per-node time of the chosen option indices."""
    return np.array([opt.time[k] for opt, k in zip(options, choice.tolist())])


def reclaim_slack(
    dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray, deadline: float
) -> np.ndarray | None:
    """Option indices at least as slow (and as cheap) as ``choice``, finishing by ``deadline``.

    ``None`` when ``choice`` itself does not finish by ``deadline`` (relative tolerance
    ``DEADLINE_TOLERANCE``).
    """
    start, end = earliest_schedule(dag, option_durations(options, choice))
    if end.max() > deadline * (1 + DEADLINE_TOLERANCE):
        return None
    reclaimed = choice.copy()
    latest_start = np.full(dag.num_nodes, np.inf)
    successors = dag.successors
    for node in dag.topological_order[::-1].tolist():
        latest_finish = min((latest_start[s] for s in successors[node]), default=deadline)
        opt = options[node]
        slowest = opt.cheapest_within((latest_finish - start[node]) * (1 + _TOLERANCE))
        if slowest > reclaimed[node]:
            reclaimed[node] = slowest
        latest_start[node] = latest_finish - opt.time[reclaimed[node]]
    return reclaimed


def reclaim_slack_forward(
    dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray, deadline: float
) -> np.ndarray | None:
    """Like :func:`reclaim_slack`, in topological order: each instruction gets its cheapest option
    that fits between its predecessors' finish (as already reclaimed) and its successors' latest start
    under ``choice``. ``None`` when ``choice`` does not finish by ``deadline``."""
    latest_start = latest_starts(dag, option_durations(options, choice), deadline)
    successors, predecessors = dag.successors, dag.predecessors
    if latest_start.min() < -deadline * DEADLINE_TOLERANCE:
        return None
    reclaimed = choice.copy()
    finish = np.zeros(dag.num_nodes)
    for node in dag.topological_order.tolist():
        earliest = max((finish[p] for p in predecessors[node]), default=0.0)
        latest_finish = min((latest_start[s] for s in successors[node]), default=deadline)
        opt = options[node]
        slowest = opt.cheapest_within((latest_finish - earliest) * (1 + _TOLERANCE))
        if slowest > reclaimed[node]:
            reclaimed[node] = slowest
        finish[node] = earliest + opt.time[reclaimed[node]]
    return reclaimed
