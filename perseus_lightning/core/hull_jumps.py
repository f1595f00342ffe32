"""Hull jumps: move instructions that run on a clock above their convex hull onto a hull vertex.

Rounding the LP's fractional durations leaves many instructions on a clock between two vertices of
their lower convex hull, above the chord: each pays an excess over the hull for a little time. The
MILP's plans instead gather the slack so that some instructions reach the next slower vertex while
others run faster. :func:`jump_to_hull` makes such moves one instruction at a time, largest excess
first:

1. the instruction takes its next slower hull vertex, and the paths through it end past the deadline;
2. repair: while they do, instructions on the longest of them (not the one moved) take faster
   options, those that cost the least per second they give back first, from the instructions on
   every longest path (speeding one up shortens them all) when any can run faster;
3. the instructions whose windows the move changed take the slack it freed, the one that saves the
   most per second first;
4. the move is kept only if the iteration got cheaper, else undone. If it was undone, the
   instruction tries its next faster hull vertex instead (no repair needed, its slack is reclaimed).

Moves are made within windows of :data:`WINDOW` instructions consecutive in start order, the
instructions outside holding still, so earliest and latest starts are updated incrementally within
the window (:class:`_Windows`) and an undone move is rolled back from a log: a move costs time in
proportion to the instructions whose windows it changes, not to the pipeline's length.

On the A40 profile (8 stages, GPT-3 175B) this took the planner's zero-slowdown plan from 0.59-0.64 %
to 0.37-0.51 % above the LP bound at 12-96 microbatches (docs/planner-research.md, session 19).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.simulator import earliest_schedule, latest_starts
from perseus_lightning.core.slack import CHEAPER, DEADLINE_TOLERANCE, option_durations, plan_energy

MAX_PASSES = 2
"""Most passes over the instructions above their hull, each over windows (every other one shifted by
half a window); they stop after a pass that kept no move."""
WINDOW = 64
"""Instructions per window: consecutive in the order of their earliest starts. The instructions
outside a window keep their options and their earliest (before) or latest (after) schedule while
moves are made inside it, so a move's updates stay inside the window."""
MAX_REPAIRS = 16
"""Most rounds of speed-ups to repair one move; a move that needs more is undone."""
_TIGHT = 1e-12
"""Relative difference (to the deadline) within which two times count as equal."""


def jump_to_hull(
    dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray, deadline: float, idle_power: float
) -> np.ndarray:
    """Option indices no costlier than ``choice`` (which must finish by ``deadline``), after
    passes of hull jumps (at most :data:`MAX_PASSES`); ``idle_power`` is charged over the whole iteration."""
    return _Jumps(dag, options, choice, deadline, idle_power).run()


class _Hull:
    """Per option of one :class:`ClockOptions`: its cost above the lower hull, the next slower and
    faster hull vertices (-1: none), and its cheapest step to a faster option."""

    def __init__(self, options: ClockOptions) -> None:
        hull_time, hull_cost = options.lower_hull()
        self.excess = (options.cost - np.interp(options.time, hull_time, hull_cost)).tolist()
        hull = options.hull
        count = len(options.time)
        self.slower_vertex = [next((v for v in hull if v > k), -1) for k in range(count)]
        self.faster_vertex = [max((v for v in hull if v < k), default=-1) for k in range(count)]
        times, costs = options.time_list, options.cost_list
        self.cheapest_step: list[tuple[float, int] | None] = [
            min(((costs[f] - costs[k]) / (times[k] - times[f]), f) for f in range(k)) if k else None for k in range(count)
        ]
        """Per option: ``(cost per second given back, faster option)`` of the step that costs the least per second."""


class _Jumps:
    """One plan's hull jumps: its option per node, and the windows' schedules."""

    def __init__(
        self, dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray, deadline: float, idle_power: float
    ) -> None:
        self.dag, self.options, self.idle_power = dag, options, idle_power
        self.choice = choice.tolist()
        hulls: dict[int, _Hull] = {}
        for opt in options:
            if id(opt) not in hulls:
                hulls[id(opt)] = _Hull(opt)
        self.hulls = [hulls[id(opt)] for opt in options]
        _, end = earliest_schedule(dag, option_durations(options, choice))
        self.deadline = min(deadline, float(end.max()))
        """Moves never lengthen the iteration, so its idle energy never grows."""
        self.tolerance = deadline * _TIGHT
        self.overrun = deadline * DEADLINE_TOLERANCE
        self.threshold = CHEAPER * plan_energy(options, choice, idle_power, end)
        """Energy (J) a move must save to be kept."""
        self.rank: list[int] = dag.topological_rank.tolist()
        self.windows: _Windows
        self.failures = [0] * dag.num_nodes
        """Each node's failed moves since a kept move last changed its window."""

    def run(self) -> np.ndarray:
        for number in range(MAX_PASSES):
            kept = 0
            durations = option_durations(self.options, np.array(self.choice))
            self.windows = windows = _Windows(self.dag, durations, self.deadline, self.rank)
            for members in self._windows(WINDOW // 2 if number % 2 else 0):
                windows.focus(members)
                excess = [  # not the nodes that failed in both window alignments since a kept move reached them
                    (self.hulls[node].excess[self.choice[node]], node) for node in members if self.failures[node] < 2
                ]
                for value, node in sorted(excess, reverse=True):
                    if value <= 0:
                        break
                    if self.hulls[node].excess[self.choice[node]] > 0:
                        kept += self._jump(node)
            if not kept:
                break
        return np.array(self.choice, dtype=np.int64)

    def _windows(self, offset: int) -> list[list[int]]:
        """Runs of :data:`WINDOW` nodes in the order of their earliest starts (a topological order),
        the first ``offset`` long (when not 0)."""
        order = self.dag.by_start(np.array(self.windows.start)).tolist()
        cuts = [0, *range(offset or WINDOW, len(order), WINDOW), len(order)]
        return [order[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]

    def _jump(self, node: int) -> bool:
        """Move ``node`` to its slower hull vertex, else to its faster one; whether either was kept.
        A node that failed in both window alignments is not tried again until a kept move reaches it."""
        hull, option = self.hulls[node], self.choice[node]
        mark = self.windows.mark()
        if self._try(node, hull.slower_vertex[option]) or self._try(node, hull.faster_vertex[option]):
            for other in self.windows.touched_since(mark):
                self.failures[other] = 0
            return True
        self.failures[node] += 1
        return False

    def _set(self, options: dict[int, int], changed: dict[int, int]) -> float:
        """Give each node its option in ``options`` (node: option), remembering each node's first
        option in ``changed``; the cost they save."""
        saved = 0.0
        durations = {}
        for node, option in options.items():
            opt = self.options[node]
            changed.setdefault(node, self.choice[node])
            saved += opt.cost_list[self.choice[node]] - opt.cost_list[option]
            self.choice[node] = option
            durations[node] = opt.time_list[option]
        self.windows.set_durations(durations)
        return saved

    def _try(self, node: int, target: int) -> bool:
        """Move ``node`` to option ``target`` (see the module docstring); whether the move was kept."""
        if target < 0:
            return False
        windows = self.windows
        mark = windows.mark()
        changed: dict[int, int] = {}
        saved = self._set({node: target}, changed)
        for _ in range(MAX_REPAIRS):
            if windows.slack(node) >= -self.overrun:
                break
            faster = self._speedups(node)
            if not faster:
                break
            saved += self._set(faster, changed)
        if windows.slack(node) >= -self.overrun:
            saved += self._reclaim(windows.touched_since(mark) - {node}, changed)
            if saved > self.threshold:
                return True
        windows.undo(mark)
        for other, option in changed.items():
            self.choice[other] = option
        return False

    def _reclaim(self, nodes: set[int], changed: dict[int, int]) -> float:
        """Slow ``nodes`` down within their windows, the move that saves the most per second first
        (windows only shrink as moves are made, so a queued move is checked again when popped);
        the cost saved."""
        windows, choice, options = self.windows, self.choice, self.options
        moves: list[tuple[float, int, int]] = []

        def fitting(other: int) -> int:  # the cheapest option that fits the window: slack plus duration
            return options[other].cheapest_within((-windows.reversed_start[other] - windows.start[other]) * (1 + _TIGHT))

        def offer(other: int) -> None:
            opt, current = options[other], choice[other]
            target = fitting(other)
            if target > current:
                value = (opt.cost_list[current] - opt.cost_list[target]) / (opt.time_list[target] - opt.time_list[current])
                heapq.heappush(moves, (-value, other, target))

        for other in nodes:
            offer(other)
        saved = 0.0
        while moves:
            _, other, target = heapq.heappop(moves)
            if fitting(other) == target:
                saved += self._set({other: target}, changed)
            else:
                offer(other)
        return saved

    def _speedups(self, node: int) -> dict[int, int]:
        """Faster options (instruction: option) that give back the time by which the paths through
        ``node`` end past the deadline, never ``node``'s. From the instructions on every longest path
        through ``node`` (speeding one up shortens them all): steps to a faster option, the one that
        costs the least per second it gives back first, until they give back enough. If none of them
        can run faster, the cheapest such step of any instruction on one of those paths."""
        on_every, on_some = self.windows.longest_paths_through(node, self.tolerance)
        steps = [step for other in on_every if (step := self._cheapest_step(other, self.choice[other]))]
        heapq.heapify(steps)
        picked: dict[int, int] = {}
        given_back, needed = 0.0, -self.windows.slack(node)
        while steps and given_back < needed:
            _, other, option = heapq.heappop(steps)
            times = self.options[other].time_list
            given_back += times[picked.get(other, self.choice[other])] - times[option]
            picked[other] = option
            if step := self._cheapest_step(other, option):
                heapq.heappush(steps, step)
        if not picked:
            cheapest = min(filter(None, (self._cheapest_step(other, self.choice[other]) for other in on_some)), default=None)
            if cheapest is not None:
                picked[cheapest[1]] = cheapest[2]
        return picked

    def _cheapest_step(self, node: int, option: int) -> tuple[float, int, int] | None:
        """``(cost per second given back, node, faster option)`` of ``node``'s cheapest step from ``option``."""
        step = self.hulls[node].cheapest_step[option]
        return None if step is None else (step[0], node, step[1])


class _Windows:
    """Every node's earliest start, and its latest finish (for every path to end by ``deadline``)
    as a start in reversed time, kept up to date as durations change; :meth:`undo` returns to a
    :meth:`mark`. In reversed time the latest schedule is the earliest schedule of the reversed
    DAG, so one propagation serves both (as in :mod:`perseus_lightning.core.slack`)."""

    def __init__(self, dag: InstructionDAG, durations: np.ndarray, deadline: float, rank: list[int]) -> None:
        self.start = earliest_schedule(dag, durations)[0].tolist()
        self.reversed_start = (-latest_starts(dag, durations, deadline) - durations).tolist()
        """Minus each node's latest finish."""
        self.duration = durations.tolist()
        self.successors, self.predecessors = dag.successors, dag.predecessors
        self.rank, self.order = rank, dag.topological_order.tolist()
        self.reversed_rank, self.reversed_order = [dag.num_nodes - 1 - r for r in rank], self.order[::-1]
        self.member = [False] * dag.num_nodes
        self._members: list[int] = []
        self._log: list[tuple[list[float], int, float]] = []

    def focus(self, members: list[int]) -> None:
        """Keep ``members`` up to date from now on, and no other nodes. ``members`` are the next
        run of a topological order whose earlier runs were focused on before: their earliest starts
        are recomputed here from their predecessors' (exact, as those came earlier); the latest
        finishes of the nodes after them were never changed, and the nodes before them are not read again."""
        for node in self._members:
            self.member[node] = False
        self._members = members
        start, duration, predecessors = self.start, self.duration, self.predecessors
        for node in members:
            self.member[node] = True
            start[node] = max([start[p] + duration[p] for p in predecessors[node]], default=0.0)
        self._log.clear()

    def slack(self, node: int) -> float:
        """Latest start less earliest start: negative when a path through ``node`` ends past the deadline."""
        return -self.reversed_start[node] - self.duration[node] - self.start[node]

    def mark(self) -> int:
        return len(self._log)

    def undo(self, mark: int) -> None:
        log = self._log
        for values, node, value in reversed(log[mark:]):
            values[node] = value
        del log[mark:]

    def touched_since(self, mark: int) -> set[int]:
        """The nodes whose duration, earliest start or latest finish changed since ``mark``."""
        return {node for _, node, _ in self._log[mark:]}

    def _write(self, values: list[float], node: int, value: float) -> None:
        self._log.append((values, node, values[node]))
        values[node] = value

    def set_durations(self, durations: dict[int, float]) -> None:
        """Give each node (a member) its duration in ``durations``, and update the schedules."""
        for node, duration in durations.items():
            self._write(self.duration, node, duration)
        self._propagate(list(durations), self.start, self.successors, self.predecessors, self.rank, self.order)
        self._propagate(
            list(durations), self.reversed_start, self.predecessors, self.successors, self.reversed_rank, self.reversed_order
        )

    def _propagate(
        self,
        nodes: list[int],
        start: list[float],
        after: Sequence[Sequence[int]],
        before: Sequence[Sequence[int]],
        rank: list[int],
        order: list[int],
    ) -> None:
        """Recompute the ``start`` of every member ``after`` ``nodes``, whose finishes moved, in
        the topological ``order`` of that direction of time (``rank``: each node's position in it)."""
        duration, member, log = self.duration, self.member, self._log
        pop, push = heapq.heappop, heapq.heappush
        queue = [rank[n] for node in nodes for n in after[node] if member[n]]
        heapq.heapify(queue)
        last = -1
        while queue:
            position = pop(queue)
            if position == last:  # queued by two moved nodes before it
                continue
            last = position
            current = order[position]
            earliest = -math.inf
            for p in before[current]:
                finish = start[p] + duration[p]
                if finish > earliest:
                    earliest = finish
            if earliest != start[current]:
                log.append((start, current, start[current]))  # as _write, inlined on this hot path
                start[current] = earliest
                for n in after[current]:
                    if member[n]:
                        push(queue, rank[n])

    def longest_paths_through(self, node: int, tolerance: float) -> tuple[list[int], list[int]]:
        """The nodes on every longest path through ``node``, and those on at least one (``node`` left out)."""
        before = _paths(node, self._setting(self.start, self.predecessors, tolerance), self.reversed_rank.__getitem__)
        after = _paths(node, self._setting(self.reversed_start, self.successors, tolerance), self.rank.__getitem__)
        return before[0] + after[0], before[1] + after[1]

    def _setting(self, start: list[float], before: Sequence[Sequence[int]], tolerance: float) -> Callable[[int], list[int]]:
        """For a node, the members ``before`` it whose finish sets its ``start`` (in that direction of time)."""
        duration, member = self.duration, self.member
        return lambda c: [p for p in before[c] if member[p] and start[p] + duration[p] >= start[c] - tolerance]


def _paths(node: int, next_nodes: Callable[[int], list[int]], order_key: Callable[[int], int]) -> tuple[list[int], list[int]]:
    """Following ``next_nodes`` from ``node`` until there are none (``order_key`` sorts the nodes
    so that each comes before those it leads to): the nodes on every such path, and those on at
    least one (``node`` left out). A node is on every path when the paths from ``node`` to it
    times the paths from it onwards make all paths."""
    order, links = [node], {node: next_nodes(node)}
    for current in order:
        for other in links[current]:
            if other not in links:
                links[other] = next_nodes(other)
                order.append(other)
    order.sort(key=order_key)
    near = dict.fromkeys(order, 0)
    near[node] = 1
    for current in order:
        for other in links[current]:
            near[other] += near[current]
    far: dict[int, int] = {}
    for current in reversed(order):
        count = 0
        for other in links[current]:
            count += far[other]
        far[current] = count or 1  # a node with no next nodes ends one path
    total = far[node]
    return [n for n in order[1:] if near[n] * far[n] == total], order[1:]
