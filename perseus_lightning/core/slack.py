"""Slack reclamation: slow instructions down within their slack, never past a deadline.

One backward pass over the DAG in reverse topological order. Each instruction gets the cheapest
(in effective energy ``E - P_block * t``) profiled clock whose time still fits between its
earliest start under the starting plan and the latest start of its successors. Predecessors are
then bounded by that latest start, so the iteration never ends after the deadline.
"""

from __future__ import annotations

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.simulator import earliest_schedule, instruction_costs

_TOLERANCE = 1e-12


def reclaim_slack(
    dag: InstructionDAG,
    profile: Profile,
    p2p_power: float,
    plan: FrequencyPlan | None = None,
    deadline: float | None = None,
) -> FrequencyPlan:
    """Return ``plan`` (default: max clock) with every instruction slowed as far as its slack allows.

    The result finishes by ``deadline`` (default: the starting plan's own iteration time, so zero
    slowdown) and never uses more effective energy per instruction than the starting plan.
    """
    stage_profile = profile.for_stages(dag.schedule.stage_ranks)
    start_plan = plan or FrequencyPlan.max_clock(dag, stage_profile)
    time, _ = instruction_costs(dag, stage_profile, start_plan.as_array())
    start, end = earliest_schedule(dag, time)
    finish = float(end.max()) if deadline is None else deadline
    if finish < end.max() * (1 - _TOLERANCE):
        raise PlanError(
            f"deadline {finish:.6f} s is shorter than the starting plan's iteration time {end.max():.6f} s. "
            f"Fix: give a deadline of at least that, or a faster starting plan."
        )
    frequencies = list(start_plan.frequencies)
    latest_start = np.full(dag.num_nodes, np.inf)
    options: dict[tuple[int, str], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for node in dag.topological_order[::-1].tolist():
        ins = dag.instructions[node]
        latest_finish = min((latest_start[s] for s in dag.successors[node]), default=finish)
        key = (ins.stage, ins.kind)
        prof = stage_profile.get(*key)
        if key not in options:
            idx = np.array([prof.index(f) for f in prof.pareto_frequencies(p2p_power)])
            options[key] = (np.array(prof.frequencies)[idx], prof.time[idx], prof.energy[idx] - p2p_power * prof.time[idx])
        freqs, times, costs = options[key]
        current_time, current_energy = prof.at(frequencies[node])
        window = (latest_finish - start[node]) * (1 + _TOLERANCE)
        fits = np.flatnonzero((times <= window) & (costs < current_energy - p2p_power * current_time))
        if fits.size:
            choice = fits[np.argmin(costs[fits])]
            frequencies[node], current_time = int(freqs[choice]), float(times[choice])
        latest_start[node] = latest_finish - current_time
    return FrequencyPlan(tuple(frequencies))
