"""Slack reclamation: slow instructions down within their slack, never past a deadline.

:func:`reclaim_slack` is one backward pass over the DAG in reverse topological order. Each
instruction gets its cheapest clock option whose time still fits between its earliest start under
the starting choice and the latest start of its successors. Its predecessors are then bounded by
its own latest start, so the iteration never ends after the deadline, and no instruction ever gets
a costlier option. The backward pass hands slack to the latest instructions first;
:func:`reclaim_slack_by_value` hands it where it saves the most energy per second.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.simulator import earliest_schedule, latest_starts

_TOLERANCE = 1e-12
_NONE = -1
"""No move queued (option indices start at 0)."""
DEADLINE_TOLERANCE = 1e-9
"""How far past the deadline (relative) a starting choice may end: floating-point noise of the LP."""
CHEAPER = 1e-9
"""Relative energy difference that counts as a cheaper plan."""


def option_durations(options: list[ClockOptions], choice: np.ndarray) -> np.ndarray:
    """Per-node time of the chosen option indices."""
    return np.array([opt.time[k] for opt, k in zip(options, choice.tolist())])


def plan_energy(options: list[ClockOptions], choice: np.ndarray, idle_power: float, end: np.ndarray) -> float:
    """Energy of option indices ``choice``, whose nodes end at ``end``: the options' effective
    energies plus ``idle_power`` over the whole iteration (what the simulator computes)."""
    return sum(opt.cost_list[k] for opt, k in zip(options, choice.tolist())) + idle_power * float(end.max())


def _schedule_within(
    dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray, deadline: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """``(durations, earliest starts)`` of ``choice``; ``None`` if it ends past ``deadline``
    (relative tolerance ``DEADLINE_TOLERANCE``)."""
    durations = option_durations(options, choice)
    start, end = earliest_schedule(dag, durations)
    return None if end.max() > deadline * (1 + DEADLINE_TOLERANCE) else (durations, start)


def reclaim_slack(
    dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray, deadline: float
) -> np.ndarray | None:
    """Option indices at least as slow (and as cheap) as ``choice``, finishing by ``deadline``.

    ``None`` when ``choice`` itself does not finish by ``deadline`` (relative tolerance
    ``DEADLINE_TOLERANCE``).
    """
    schedule = _schedule_within(dag, options, choice, deadline)
    if schedule is None:
        return None
    start = schedule[1].tolist()
    reclaimed = choice.tolist()
    latest_start = [0.0] * dag.num_nodes
    successors = dag.successors
    for node in dag.topological_order[::-1].tolist():
        latest_finish = min([latest_start[s] for s in successors[node]], default=deadline)
        opt = options[node]
        slowest = opt.cheapest_within((latest_finish - start[node]) * (1 + _TOLERANCE))
        if slowest > reclaimed[node]:
            reclaimed[node] = slowest
        latest_start[node] = latest_finish - opt.time_list[reclaimed[node]]
    return np.array(reclaimed, dtype=np.int64)


def reclaim_slack_by_value(
    dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray, deadline: float
) -> np.ndarray | None:
    """Like :func:`reclaim_slack`, one instruction at a time: always the move that saves the most
    energy per second of slack it takes (to the instruction's cheapest option that fits its window).
    ``None`` when ``choice`` does not finish by ``deadline``."""
    schedule = _schedule_within(dag, options, choice, deadline)
    if schedule is None:
        return None
    durations, start = schedule
    return _SlackByValue(dag, options, choice, durations, start, latest_starts(dag, durations, deadline)).run()


class _SlackByValue:
    """Every node's window, from its earliest start to its latest finish, and a heap of each node's
    best move, offered again whenever its window or option changes. The latest schedule is kept in
    reversed time (``-latest_finish``, ``-latest_start``), where it is an earliest schedule of the
    reversed DAG: a move delays the earliest starts after its node in both."""

    def __init__(
        self,
        dag: InstructionDAG,
        options: list[ClockOptions],
        choice: np.ndarray,
        durations: np.ndarray,
        start: np.ndarray,
        latest_start: np.ndarray,
    ) -> None:
        self.dag, self.options = dag, options
        self.choice = choice.tolist()
        self.duration = durations.tolist()
        self.start, self.finish = start.tolist(), (start + durations).tolist()
        self.reversed_start, self.reversed_finish = (-latest_start - durations).tolist(), (-latest_start).tolist()
        order = dag.topological_order.tolist()
        rank = dag.topological_rank
        self.rank, self.order = rank.tolist(), order
        self.reversed_rank, self.reversed_order = (dag.num_nodes - 1 - rank).tolist(), order[::-1]
        self.version = [0] * dag.num_nodes
        self.offered = [_NONE] * dag.num_nodes
        """Each node's queued target option (``_NONE``: none)."""
        self.moves: list[tuple[float, int, int, int]] = []
        """Heap of (-saving per second, node, the node's version when offered, target option)."""
        for node in range(dag.num_nodes):
            self._offer(node)

    def run(self) -> np.ndarray:
        while self.moves:
            _, node, version, target = heapq.heappop(self.moves)
            if version == self.version[node]:
                self._move(node, target)
        return np.array(self.choice, dtype=np.int64)

    def _offer(self, node: int) -> None:
        """Queue ``node``'s move to the cheapest option that fits its window, if that is slower (a
        move already queued to that same option stays queued)."""
        opt, current = self.options[node], self.choice[node]
        target = opt.cheapest_within(self._window(node))
        if target == self.offered[node]:
            return
        self.version[node] += 1
        if target > current:
            times, costs = opt.time_list, opt.cost_list
            value = (costs[current] - costs[target]) / (times[target] - times[current])
            heapq.heappush(self.moves, (-value, node, self.version[node], target))
            self.offered[node] = target
        else:
            self.offered[node] = _NONE

    def _move(self, node: int, target: int) -> None:
        self.choice[node] = target
        self.duration[node] = self.options[node].time_list[target]
        self.finish[node] = self.start[node] + self.duration[node]
        self.reversed_finish[node] = self.reversed_start[node] + self.duration[node]
        dag = self.dag
        later = self._delay(node, self.start, self.finish, dag.successors, dag.predecessors, self.rank, self.order)
        earlier = self._delay(
            node,
            self.reversed_start,
            self.reversed_finish,
            dag.predecessors,
            dag.successors,
            self.reversed_rank,
            self.reversed_order,
        )
        self._offer(node)
        for narrowed in (*later, *earlier):
            self._narrow(narrowed)

    def _narrow(self, node: int) -> None:
        """Offer ``node``'s move again after its window shrank (a move only ever shrinks the windows
        of the nodes before and after it): with no move queued, or a queued target that still fits,
        nothing changes, so the bisection of :meth:`_offer` is skipped."""
        target = self.offered[node]
        if target != _NONE and self.options[node].time_list[target] > self._window(node):
            self._offer(node)

    def _window(self, node: int) -> float:
        """The time ``node`` may take: its latest finish minus its earliest start (up to float noise)."""
        return (-self.reversed_start[node] - self.start[node]) * (1 + _TOLERANCE)

    def _delay(
        self,
        node: int,
        start: list[float],
        finish: list[float],
        after: Sequence[Sequence[int]],
        before: Sequence[Sequence[int]],
        rank: list[int],
        order: list[int],
    ) -> list[int]:
        """Delay the earliest ``start`` (and ``finish``) of every node ``after`` ``node``, whose finish
        moved later, in topological ``order`` (``rank``: each node's position in it); the nodes delayed.

        Every node queued comes after the one being processed, so each is processed once, after all
        its predecessors (a node queued twice pops twice in a row: the second is skipped)."""
        queue = [rank[n] for n in after[node]]
        heapq.heapify(queue)
        delayed: list[int] = []
        duration = self.duration
        pop, push = heapq.heappop, heapq.heappush
        last = -1
        while queue:
            position = pop(queue)
            if position == last:  # queued by two delayed predecessors
                continue
            last = position
            current = order[position]
            earliest = start[current]
            for p in before[current]:
                if finish[p] > earliest:
                    earliest = finish[p]
            if earliest > start[current]:
                start[current], finish[current] = earliest, earliest + duration[current]
                delayed.append(current)
                for n in after[current]:
                    push(queue, rank[n])
        return delayed
