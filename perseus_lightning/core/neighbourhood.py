"""Neighbourhood search: windows of consecutive instructions re-pick their clocks together.

Relax-and-fix and its improvement passes choose only between the two hull vertices around the
LP's durations, and slack reclamation moves one instruction at a time. A plan a little above the
LP bound often needs a few neighbouring instructions moved at once: one a clock faster, two others
a clock slower. :func:`search_neighbourhood` takes windows of ``window`` consecutive instructions
in the order of the plan's start times; each member may take any clock option within ``reach`` of
its own, every other instruction keeps its option, and a small MILP (HiGHS) picks the cheapest mix
that still lets every path end by the deadline. A window's pick replaces its options only if the
iteration gets cheaper, so a pass never costs more and always meets the deadline.

Members are consecutive in a topological order, so every path between two of them stays inside
the window: the instructions before it bound the members' starts by their earliest finishes, and
those after it bound the members' finishes by their latest starts, both exact while the window's
MILP runs.
"""

from __future__ import annotations

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.highs_model import ConstraintRows, solve_small_milp
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.simulator import earliest_schedule, latest_starts
from perseus_lightning.core.slack import CHEAPER, DEADLINE_TOLERANCE, option_durations, plan_energy

WINDOW = 16
"""Instructions per window's MILP."""
REACH = 1
"""How many clock options away from its own each member may move, either way."""
MAX_NODES = 200
"""Branch-and-bound nodes per window's MILP (deterministic, unlike a time limit)."""


def search_neighbourhood(
    dag: InstructionDAG,
    options: list[ClockOptions],
    choice: np.ndarray,
    deadline: float,
    idle_power: float,
    window: int = WINDOW,
    reach: int = REACH,
    offset: int = 0,
) -> np.ndarray:
    """One pass of windows over ``choice`` (option indices that finish by ``deadline``), the first
    window ``offset`` long if not 0. Returns option indices that finish by ``deadline`` and cost no
    more, counting ``idle_power`` over the iteration (:func:`~perseus_lightning.core.slack.plan_energy`)."""
    choice = choice.copy()
    durations = option_durations(options, choice)
    start, end = earliest_schedule(dag, durations)
    energy = plan_energy(options, choice, idle_power, end)
    order = dag.by_start(start).tolist()
    latest = latest_starts(dag, durations, deadline)
    firsts = [0, *range(offset, len(order), window)] if offset else list(range(0, len(order), window))
    for first, stop in zip(firsts, [*firsts[1:], len(order)]):
        members = order[first:stop]
        picked = _best_mix(dag, options, members, choice, end, latest, deadline, reach)
        if picked is None or np.array_equal(picked, choice[members]):
            continue
        trial = choice.copy()
        trial[members] = picked
        trial_durations = option_durations(options, trial)
        _, trial_end = earliest_schedule(dag, trial_durations)
        trial_energy = plan_energy(options, trial, idle_power, trial_end)
        if trial_end.max() <= deadline * (1 + DEADLINE_TOLERANCE) and trial_energy < energy * (1 - CHEAPER):
            choice, end, energy = trial, trial_end, trial_energy
            latest = latest_starts(dag, trial_durations, deadline)
    return choice


def _best_mix(
    dag: InstructionDAG,
    options: list[ClockOptions],
    members: list[int],
    choice: np.ndarray,
    end: np.ndarray,
    latest: np.ndarray,
    deadline: float,
    reach: int,
) -> np.ndarray | None:
    """The cheapest options of ``members`` within ``reach`` of ``choice``, every other node fixed;
    ``None`` if HiGHS finds no feasible mix (the current one always is, up to its tolerances)."""
    import highspy

    column = {node: k for k, node in enumerate(members)}
    candidates, first_binary = [], [len(members)]
    for node in members:
        own, count = int(choice[node]), len(options[node].time)
        candidates.append(list(range(max(own - reach, 0), min(own + reach, count - 1) + 1)))
        first_binary.append(first_binary[-1] + len(candidates[-1]))
    rows = ConstraintRows()
    inf = highspy.kHighsInf
    earliest = []
    for k, node in enumerate(members):
        picks = [(first_binary[k] + j, float(options[node].time[c])) for j, c in enumerate(candidates[k])]
        rows.add([(col, 1.0) for col, _ in picks], 1.0, 1.0)  # one option each
        earliest.append(max((float(end[p]) for p in dag.predecessors[node] if p not in column), default=0.0))
        successors = dag.successors[node]
        outside = [float(latest[s]) for s in successors if s not in column]
        if outside or not successors:  # ends before the instructions after the window, or by the deadline
            rows.add([(k, 1.0), *picks], -inf, min(outside, default=deadline))
        for succ in successors:
            if succ in column:
                rows.add([(k, 1.0), (column[succ], -1.0), *picks], -inf, 0.0)
    cost = [float(options[node].cost[c]) for node, cs in zip(members, candidates) for c in cs]
    lp = highspy.HighsLp()
    lp.num_col_ = first_binary[-1]
    lp.col_cost_ = np.concatenate([np.zeros(len(members)), cost])
    lp.col_lower_ = np.concatenate([earliest, np.zeros(len(cost))])
    lp.col_upper_ = np.concatenate([np.full(len(members), inf), np.ones(len(cost))])
    lp.integrality_ = [highspy.HighsVarType.kContinuous] * len(members) + [highspy.HighsVarType.kInteger] * len(cost)
    current = np.zeros(first_binary[-1])  # the members' own options, at their current starts: feasible
    current[: len(members)] = [float(end[node] - options[node].time[choice[node]]) for node in members]
    current[[first_binary[k] + cs.index(int(choice[node])) for k, (node, cs) in enumerate(zip(members, candidates))]] = 1.0
    values = solve_small_milp(lp, rows, MAX_NODES, start=current)
    if values is None:
        return None
    return np.array([cs[int(np.argmax(values[first_binary[k] : first_binary[k + 1]]))] for k, cs in enumerate(candidates)])
