"""The computation DAG of one training iteration.

Nodes are instructions. Edges are each rank's execution order plus the data dependencies:

- ``F(v, j) -> F(v+1, j)``: activations flow forward;
- ``B(v+1, j) -> B(v, j)`` (or ``I``): gradients flow backward;
- ``F(last, j) -> B(last, j)`` (or ``I``) on the last stage;
- ``I(v, j) -> W(v, j)``: the weight gradient needs the output gradient.

Point-to-point communication takes no time in this model. Edges are built with a hash lookup per
node, in time linear in the number of instructions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from perseus_lightning.core.errors import ScheduleError
from perseus_lightning.core.profile import BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD
from perseus_lightning.core.schedules import Instruction, PipelineSchedule


@dataclass(frozen=True)
class InstructionDAG:
    """Instruction DAG of a :class:`PipelineSchedule`; node ``i`` is ``instructions[i]``."""

    schedule: PipelineSchedule
    instructions: tuple[Instruction, ...]
    ranks: np.ndarray
    """Rank (GPU) of each node."""
    edge_sources: np.ndarray
    edge_targets: np.ndarray
    topological_order: np.ndarray
    _index: dict[Instruction, int] = field(repr=False, compare=False)

    @classmethod
    def from_schedule(cls, schedule: PipelineSchedule) -> InstructionDAG:
        instructions = tuple(ins for order in schedule.rank_orders for ins in order)
        index = {ins: i for i, ins in enumerate(instructions)}
        ranks = np.array([r for r, order in enumerate(schedule.rank_orders) for _ in order], dtype=np.int64)
        sources: list[int] = []
        targets: list[int] = []
        pos = 0
        for order in schedule.rank_orders:  # execution order on each rank
            sources += range(pos, pos + len(order) - 1)
            targets += range(pos + 1, pos + len(order))
            pos += len(order)
        last = schedule.num_stages - 1
        for i, ins in enumerate(instructions):  # data dependencies, one lookup each
            v, j = ins.stage, ins.microbatch
            if ins.kind == FORWARD:
                pred = index.get(Instruction(v - 1, FORWARD, j)) if v > 0 else None
            elif ins.kind == BACKWARD_WEIGHT:
                pred = index.get(Instruction(v, BACKWARD_INPUT, j))
            elif v == last:
                pred = index.get(Instruction(v, FORWARD, j))
            else:
                pred = index.get(Instruction(v + 1, BACKWARD, j), index.get(Instruction(v + 1, BACKWARD_INPUT, j)))
            if pred is not None:
                sources.append(pred)
                targets.append(i)
        src = np.array(sources, dtype=np.int64)
        dst = np.array(targets, dtype=np.int64)
        order = _topological_order(len(instructions), src, dst, schedule, instructions)
        return cls(schedule, instructions, ranks, src, dst, order, index)

    @property
    def num_nodes(self) -> int:
        return len(self.instructions)

    @property
    def num_ranks(self) -> int:
        return self.schedule.num_ranks

    def index(self, instruction: Instruction) -> int:
        """Node id of ``instruction``."""
        return self._index[instruction]

    @cached_property
    def predecessors(self) -> tuple[tuple[int, ...], ...]:
        """Predecessors of every node."""
        return _adjacency(self.num_nodes, self.edge_targets, self.edge_sources)

    @cached_property
    def successors(self) -> tuple[tuple[int, ...], ...]:
        """Successors of every node."""
        return _adjacency(self.num_nodes, self.edge_sources, self.edge_targets)

    @cached_property
    def topological_rank(self) -> np.ndarray:
        """Each node's position in :attr:`topological_order`."""
        rank = np.empty(self.num_nodes, dtype=np.int64)
        rank[self.topological_order] = np.arange(self.num_nodes)
        return rank

    def by_start(self, start: np.ndarray) -> np.ndarray:
        """Nodes by their ``start`` times, ties in topological order: a topological order whenever
        ``start`` holds a schedule's start times (a successor never starts before its predecessor)."""
        return np.lexsort((self.topological_rank, start))

    @cached_property
    def levels(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """Nodes by depth (the most edges on a path from a node without predecessors), each level
        with its nodes' predecessors, one row per node padded with ``num_nodes``. A node's
        predecessors all lie in earlier levels, so a schedule is one vectorised step per level."""
        return _levels(self.num_nodes, self.topological_order, self.predecessors)

    @cached_property
    def reverse_levels(self) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """:attr:`levels` of the reversed DAG: nodes by height (the most edges on a path to a node
        without successors), each level with its nodes' successors, padded with ``num_nodes``."""
        return _levels(self.num_nodes, self.topological_order[::-1], self.successors)

    @cached_property
    def sinks(self) -> np.ndarray:
        """Nodes without successors."""
        return np.flatnonzero(np.bincount(self.edge_sources, minlength=self.num_nodes) == 0)

    def rank_nodes(self, rank: int) -> range:
        """Node ids of ``rank`` in execution order (nodes are numbered rank by rank)."""
        start = sum(len(o) for o in self.schedule.rank_orders[:rank])
        return range(start, start + len(self.schedule.rank_orders[rank]))


def _adjacency(n: int, keys: np.ndarray, values: np.ndarray) -> tuple[tuple[int, ...], ...]:
    """For each node ``k``, the ``values`` of the edges whose ``keys`` entry is ``k``."""
    lists: list[list[int]] = [[] for _ in range(n)]
    for key, value in zip(keys.tolist(), values.tolist()):
        lists[key].append(value)
    return tuple(map(tuple, lists))


def _levels(n: int, order: np.ndarray, before: tuple[tuple[int, ...], ...]) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """Nodes grouped by the most edges on a path to them from a node with nothing ``before`` it (in
    ``order``, a topological order), each group with its nodes' ``before`` lists padded with ``n``."""
    depth = [0] * n
    for node in order.tolist():
        depth[node] = max((depth[p] + 1 for p in before[node]), default=0)
    padded = np.full((n, max([1, *map(len, before)])), n, dtype=np.int64)
    for node, nodes in enumerate(before):
        padded[node, : len(nodes)] = nodes
    by_depth = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(np.asarray(depth, dtype=np.int64)[by_depth], np.arange(max(depth, default=-1) + 2))
    return tuple((by_depth[a:b], padded[by_depth[a:b]]) for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _topological_order(
    n: int, src: np.ndarray, dst: np.ndarray, schedule: PipelineSchedule, instructions: tuple[Instruction, ...]
) -> np.ndarray:
    """Kahn's algorithm; a cycle means the schedule deadlocks, which is reported per rank."""
    indegree = np.bincount(dst, minlength=n)
    successors = _adjacency(n, src, dst)
    ready = [i for i in range(n) if indegree[i] == 0]
    order: list[int] = []
    while ready:
        node = ready.pop()
        order.append(node)
        for nxt in successors[node]:
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    if len(order) < n:
        done = set(order)
        stuck = []
        pos = 0
        for rank, rank_order in enumerate(schedule.rank_orders):
            blocked = next((pos + k for k in range(len(rank_order)) if pos + k not in done), None)
            if blocked is not None:
                stuck.append(f"rank {rank} at '{instructions[blocked]}'")
            pos += len(rank_order)
        raise ScheduleError(
            f"schedule '{schedule.name}' deadlocks: {', '.join(stuck)} each wait on an instruction that runs later. "
            f"Fix: order each rank's actions so that a stage's forward follows the previous stage's and its "
            f"backward follows the next stage's."
        )
    return np.array(order, dtype=np.int64)

