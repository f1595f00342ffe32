"""Whether any plan comes within a gap of the LP bound at a deadline: a proof split into cubes.

The exact MILP (:mod:`perseus_lightning.core.exact`, choice formulation, with the strengthened
bound's pair rows) with a cutoff either finds a plan at most that costly or proves that there is
none. On one core the whole DAG can take hours: A100, 8 x 12, ``T_min`` and a cutoff 0.1 % above
the LP bound was unfinished after 106 minutes (docs/planner-research.md, session 23).

:func:`prove_gap` splits the search space instead ("cube and conquer"). A *cube* restricts some
instructions to a range of their clock options. A cube whose MILP does not finish within its
budget is split in two at one instruction's clock, faster or slower, chosen by strong branching on
the cube's strengthened LP (the split whose weaker half has the highest bound), and both halves
are queued; worker processes solve the cubes, one HiGHS thread each. Every cube's windows, fitting
clocks and pair rows are recomputed for its own clocks (they are valid for the plans in it), so a
half whose LP is already above the cutoff is proven without a MILP. The verdict is "proven" when
every cube is, and "found" at the first plan within the cutoff.
"""

from __future__ import annotations

import math
import multiprocessing
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.exact import ExactPlanner
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.relaxation import HullRelaxation, RelaxedSolution
from perseus_lightning.core.simulator import earliest_schedule
from perseus_lightning.core.slack import option_durations, plan_energy
from perseus_lightning.core.strengthened_bound import pair_cost_floors

Cube = tuple[tuple[int, int, int], ...]
"""Restrictions ``(node, first, last)``: the node runs only its options ``first`` to ``last``
(indices into its full options, fastest first). A node restricted twice keeps the intersection."""

Status = Literal["proven", "found", "open"]
CUTOFF_TOLERANCE = 1e-9
"""Relative float noise between HiGHS's objective and a plan's energy summed from its options: a
plan HiGHS found within the cutoff counts as found (else its cube would be split for nothing)."""


@dataclass(frozen=True)
class CubeResult:
    """How one cube's solve ended."""

    cube: Cube
    status: Status
    """``proven``: no plan in the cube costs at most the cutoff; ``found``: one does (``choice``);
    ``open``: the budget ran out first, so the cube is split."""
    bound: float
    """Energy (J) no plan in the cube can beat: the cutoff when proven, else HiGHS's dual bound."""
    seconds: float
    choice: np.ndarray | None = None
    """Option indices (into the full options) of the plan found."""
    energy: float | None = None
    """That plan's energy (J)."""


@dataclass(frozen=True)
class GapProof:
    """The verdict of :func:`prove_gap`."""

    cutoff: float
    """Energy (J) the search was for: a plan at most this costly."""
    verdict: Literal["proven", "found", "undecided"]
    """``proven``: no plan finishing by the deadline costs at most ``cutoff``; ``found``: the plan
    in ``cubes[-1]`` does; ``undecided``: the time limit came first."""
    cubes: tuple[CubeResult, ...]
    """Every cube solved, in the order their solves ended."""
    open_cubes: tuple[Cube, ...] = ()
    """The cubes left undecided (none unless ``undecided``): resume with ``prove_gap(cubes=...)``."""


def restricted_options(options: list[ClockOptions], cube: Cube) -> tuple[list[ClockOptions], np.ndarray]:
    """The options of the plans in ``cube``, and per node the index of its first one in its full
    options (so that ``first + local index`` is a full index)."""
    bounds = {node: (0, len(opt.time) - 1) for node, opt in enumerate(options)}
    for node, first, last in cube:
        low, high = bounds[node]
        bounds[node] = (max(low, first), min(high, last))
    kept = []
    for node, opt in enumerate(options):
        low, high = bounds[node]
        if low > high:
            raise PlanError(f"cube {cube} leaves node {node} no clock option. Fix: restrict each node to overlapping ranges.")
        if (low, high) == (0, len(opt.time) - 1):
            kept.append(opt)
        else:
            kept.append(ClockOptions(opt.frequencies[low : high + 1], opt.time[low : high + 1], opt.cost[low : high + 1]))
    return kept, np.array([bounds[node][0] for node in range(len(options))])


def cube_relaxation(
    dag: InstructionDAG, options: list[ClockOptions], p2p_power: float, deadline: float, cube: Cube
) -> tuple[list[ClockOptions], list[tuple[int, int, float]], np.ndarray, RelaxedSolution] | None:
    """The cube's fitting options, pair rows, first option indices and strengthened LP solution
    (:mod:`~perseus_lightning.core.strengthened_bound`); ``None`` if no plan in the cube finishes
    by ``deadline`` (its all-fastest plan ends after it)."""
    restricted, firsts = restricted_options(options, cube)
    try:
        fitting, floors = pair_cost_floors(dag, restricted, deadline)
    except PlanError:  # the cube's all-fastest plan ends after the deadline
        return None
    relaxation = HullRelaxation(dag, fitting, p2p_power)
    for first, second, floor in floors:
        relaxation.add_cost_floor([first, second], floor)
    return fitting, floors, firsts, relaxation.solve(deadline)


def split_cube(
    dag: InstructionDAG, options: list[ClockOptions], p2p_power: float, deadline: float, cube: Cube
) -> tuple[Cube, Cube]:
    """Two cubes that together hold every plan of ``cube``: one instruction's faster and slower
    clocks, split where the cube's LP runs it between two options. Strong branching picks the
    instruction whose weaker half has the highest strengthened LP bound."""
    relaxed = cube_relaxation(dag, options, p2p_power, deadline, cube)
    if relaxed is None:
        raise PlanError(f"cube {cube} holds no plan finishing by {deadline:.6g} s: there is nothing to split.")
    fitting, _, firsts, solution = relaxed
    tolerance = 1e-9 * deadline
    candidates = []
    for node, (opt, duration) in enumerate(zip(fitting, solution.durations.tolist())):
        faster = int(np.searchsorted(opt.time, duration + tolerance, side="right")) - 1
        if 0 <= faster < len(opt.time) - 1 and opt.time[faster] < duration - tolerance:
            candidates.append((node, faster))
    if not candidates:  # the LP runs every node on one option: halve the node with the most
        node = int(np.argmax([len(opt.time) for opt in fitting]))
        candidates.append((node, (len(fitting[node].time) - 1) // 2))
    best: tuple[float, tuple[Cube, Cube]] | None = None
    for node, faster in candidates:
        first = int(firsts[node])
        halves = (
            (*cube, (node, first, first + faster)),
            (*cube, (node, first + faster + 1, first + len(fitting[node].time) - 1)),
        )
        score = min(_bound(dag, options, p2p_power, deadline, half) for half in halves)
        if best is None or score > best[0]:
            best = (score, halves)
    assert best is not None
    return best[1]


def solve_cube(
    dag: InstructionDAG,
    options: list[ClockOptions],
    p2p_power: float,
    deadline: float,
    cutoff: float,
    cube: Cube,
    seconds: float,
    max_nodes: int = 2**31 - 1,
) -> CubeResult:
    """Search ``cube`` for a plan finishing by ``deadline`` at most ``cutoff`` (J) costly, within
    ``seconds`` and ``max_nodes`` branch-and-bound nodes (HiGHS's heuristics off: they slow proofs)."""
    started = time.perf_counter()
    relaxed = cube_relaxation(dag, options, p2p_power, deadline, cube)
    if relaxed is None or float(relaxed[3].lower_bound) > cutoff:
        return CubeResult(cube, "proven", cutoff, time.perf_counter() - started)
    fitting, floors, firsts, _ = relaxed
    exact = ExactPlanner(dag, fitting, p2p_power, "choice", max_nodes)
    for first, second, floor in floors:
        exact.add_cost_floor([first, second], floor)
    fastest = np.zeros(dag.num_nodes, dtype=np.int64)  # the cube's all-fastest plan: it fits the deadline
    solution = exact.solve(deadline, fastest, seconds, cutoff, heuristics=False)
    elapsed = time.perf_counter() - started
    if solution.lower_bound == cutoff:
        return CubeResult(cube, "proven", cutoff, elapsed)
    end = earliest_schedule(dag, option_durations(fitting, solution.choice))[1]
    energy = plan_energy(fitting, solution.choice, p2p_power * dag.num_ranks, end)
    if energy <= cutoff * (1 + CUTOFF_TOLERANCE):
        return CubeResult(cube, "found", solution.lower_bound, elapsed, firsts + solution.choice, energy)
    return CubeResult(cube, "open", solution.lower_bound, elapsed)


def prove_gap(
    dag: InstructionDAG,
    options: list[ClockOptions],
    p2p_power: float,
    deadline: float,
    cutoff: float,
    workers: int = 1,
    cube_seconds: float = 600.0,
    seconds: float = math.inf,
    cube_nodes: int = 2**31 - 1,
    on_cube: Callable[[CubeResult], None] | None = None,
    cubes: list[Cube] | None = None,
) -> GapProof:
    """Whether any plan finishing by ``deadline`` costs at most ``cutoff`` (J), e.g. the LP bound
    plus a target gap. Cubes are solved on ``workers`` processes (1: in this one), each for at most
    ``cube_seconds`` and ``cube_nodes``, and split when that runs out; after ``seconds`` in all the
    verdict is "undecided". ``on_cube``, if given, is called with each :class:`CubeResult`.
    ``cubes`` starts from those instead of the whole space (to resume a proof: the verdict then
    covers only them, so pass every cube an earlier run left open)."""
    pending: list[Cube] = [()] if cubes is None else list(cubes)
    done: list[CubeResult] = []
    deadline_at = time.monotonic() + seconds
    job = (dag, options, p2p_power, deadline, cutoff)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None
    results: queue.Queue[CubeResult | BaseException] = queue.Queue()
    running = 0
    try:
        while pending or running:
            while pending and running < max(workers, 1) and time.monotonic() < deadline_at:
                cube = pending.pop(0)
                budget = min(cube_seconds, max(deadline_at - time.monotonic(), 1.0))
                if pool is None:
                    results.put(solve_cube(*job, cube, budget, cube_nodes))
                else:
                    pool.apply_async(solve_cube, (*job, cube, budget, cube_nodes), callback=results.put, error_callback=results.put)
                running += 1
            if not running:
                break  # out of time with cubes left
            result = results.get()
            running -= 1
            if isinstance(result, BaseException):
                raise result
            done.append(result)
            if on_cube is not None:
                on_cube(result)
            if result.status == "found":
                return GapProof(cutoff, "found", tuple(done))
            if result.status == "open":
                pending.extend(split_cube(dag, options, p2p_power, deadline, result.cube))
    finally:
        if pool is not None:
            pool.terminate()
    return GapProof(cutoff, "undecided" if pending else "proven", tuple(done), tuple(pending))


def _bound(dag: InstructionDAG, options: list[ClockOptions], p2p_power: float, deadline: float, cube: Cube) -> float:
    relaxed = cube_relaxation(dag, options, p2p_power, deadline, cube)
    return math.inf if relaxed is None else float(relaxed[3].lower_bound)
