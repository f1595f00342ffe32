"""Exact simulation of one training iteration under a frequency plan.

The iteration time ``T`` is the longest path of the instruction DAG, with each instruction taking
its profiled time at its planned frequency. Every GPU idles at the blocking power ``P_block``
whenever it is not computing (pipeline bubbles, waits on neighbours), so with ``R`` GPUs::

    E(plan) = sum_i E_i(f_i) + P_block * (R * T - sum_i t_i(f_i))

:func:`simulate_data_parallel` adds data parallelism: ``N`` copies of the pipeline meet at the
gradient synchronisation, so when one is slowed down every other one waits for it at ``P_block``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.plan import FrequencyPlan, check_frequencies
from perseus_lightning.core.profile import Profile


@dataclass(frozen=True)
class RankUsage:
    """Time and energy of one GPU (rank) over one iteration."""

    busy: float
    idle: float
    compute_energy: float
    idle_energy: float

    @property
    def energy(self) -> float:
        return self.compute_energy + self.idle_energy


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of one simulated iteration. Per-node arrays are indexed by DAG node id."""

    dag: InstructionDAG
    p2p_power: float
    frequencies: np.ndarray
    instruction_time: np.ndarray
    instruction_energy: np.ndarray
    start: np.ndarray
    end: np.ndarray

    @property
    def iteration_time(self) -> float:
        return float(self.end.max())

    @property
    def ranks(self) -> list[RankUsage]:
        """Busy and idle time, compute and idle energy, of each rank."""
        T = self.iteration_time
        busy = np.bincount(self.dag.ranks, weights=self.instruction_time, minlength=self.dag.num_ranks)
        energy = np.bincount(self.dag.ranks, weights=self.instruction_energy, minlength=self.dag.num_ranks)
        return [RankUsage(float(b), T - float(b), float(e), self.p2p_power * (T - float(b))) for b, e in zip(busy, energy)]

    @property
    def compute_energy(self) -> float:
        return float(self.instruction_energy.sum())

    @property
    def idle_energy(self) -> float:
        return self.p2p_power * (self.dag.num_ranks * self.iteration_time - float(self.instruction_time.sum()))

    @property
    def energy(self) -> float:
        """Total iteration energy of all GPUs, idle time included (J)."""
        return self.compute_energy + self.idle_energy

    def timeline(self) -> list[dict[str, Any]]:
        """Every instruction with its rank, frequency, start and end, in node order."""
        return [
            {"rank": int(r), "stage": ins.stage, "instruction": ins.kind, "microbatch": ins.microbatch,
             "frequency": int(f), "start": float(s), "end": float(e)}
            for ins, r, f, s, e in zip(self.dag.instructions, self.dag.ranks, self.frequencies, self.start, self.end)
        ]

    def to_dict(self, timeline: bool = False) -> dict[str, Any]:
        """JSON-ready summary: ``iteration_time`` (s), ``energy`` (J) and per-rank ``stages``."""
        out: dict[str, Any] = {
            "schedule": self.dag.schedule.name,
            "stages_count": self.dag.num_ranks,
            "microbatches": self.dag.schedule.num_microbatches,
            "p2p_power": self.p2p_power,
            "iteration_time": self.iteration_time,
            "energy": self.energy,
            "compute_energy": self.compute_energy,
            "idle_energy": self.idle_energy,
            "stages": [
                {"busy": u.busy, "idle": u.idle, "compute_energy": u.compute_energy, "idle_energy": u.idle_energy}
                for u in self.ranks
            ],
        }
        if timeline:
            out["timeline"] = self.timeline()
        return out


def instruction_costs(dag: InstructionDAG, profile: Profile, frequencies: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Profiled ``(time, energy)`` of every node at its frequency. ``profile`` is per model stage."""
    time = np.empty(dag.num_nodes)
    energy = np.empty(dag.num_nodes)
    for node, (ins, f) in enumerate(zip(dag.instructions, frequencies.tolist())):
        prof = profile.get(ins.stage, ins.kind)
        i = prof.index(f)
        time[node] = prof.time[i]
        energy[node] = prof.energy[i]
    return time, energy


def earliest_schedule(dag: InstructionDAG, durations: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Earliest start and end of every node (as-soon-as-possible execution): the longest paths.
    ``durations`` are non-negative; a level of :attr:`InstructionDAG.levels` at a time."""
    duration = np.asarray(durations, dtype=float)
    start = np.zeros(dag.num_nodes)
    end = np.zeros(dag.num_nodes + 1)  # the padding's end, 0: no later than any predecessor's
    for nodes, predecessors in dag.levels:
        start[nodes] = level_start = end[predecessors].max(axis=1)
        end[nodes] = level_start + duration[nodes]
    return start, end[:-1]


def latest_starts(dag: InstructionDAG, durations: np.ndarray, deadline: float) -> np.ndarray:
    """Latest start of every node that still lets every path end by ``deadline`` (as-late-as-possible
    execution; negative where the nodes' durations cannot fit). ``durations`` are non-negative."""
    duration = np.asarray(durations, dtype=float)
    latest = np.full(dag.num_nodes + 1, float(deadline))  # the padding's: no earlier than any successor's
    for nodes, successors in dag.reverse_levels:
        latest[nodes] = latest[successors].min(axis=1) - duration[nodes]
    return latest[:-1]


def simulate(
    dag: InstructionDAG,
    profile: Profile,
    p2p_power: float,
    plan: FrequencyPlan | None = None,
    slowdown: float = 1.0,
) -> SimulationResult:
    """Simulate one iteration of ``dag`` under ``plan`` (default: every instruction at max clock).

    ``profile`` may have one stage per rank or one per model stage (see :meth:`Profile.for_stages`).
    ``slowdown`` stretches every instruction's time and energy by that factor, modelling a GPU
    that runs slower at the same power (for example a thermally throttled straggler).
    """
    if not p2p_power >= 0:
        raise PlanError(f"blocking power is {p2p_power} W. Fix: give the GPU's power while waiting on P2P, in watts (>= 0).")
    if not slowdown > 0:
        raise PlanError(f"slowdown is {slowdown}. Fix: give a positive factor, 1.0 for none.")
    stage_profile = profile.for_stages(dag.schedule.stage_ranks)
    plan = plan or FrequencyPlan.max_clock(dag, stage_profile)
    check_frequencies(plan, dag, stage_profile)
    freqs = plan.as_array()
    time, energy = instruction_costs(dag, stage_profile, freqs)
    time, energy = time * slowdown, energy * slowdown
    start, end = earliest_schedule(dag, time)
    return SimulationResult(dag, float(p2p_power), freqs, time, energy, start, end)


@dataclass(frozen=True)
class DataParallelResult:
    """``pipelines`` data-parallel pipelines, one of them a straggler, meeting at gradient sync.

    Each pipeline's iteration ends at ``sync_time``, when the slowest one finishes. A pipeline
    that finishes early idles on all its GPUs at the blocking power until then.
    """

    pipelines: int
    straggler_slowdown: float
    straggler: SimulationResult
    others: SimulationResult

    @property
    def sync_time(self) -> float:
        return max(self.straggler.iteration_time, self.others.iteration_time)

    def pipeline_energy(self, run: SimulationResult) -> float:
        """One pipeline's energy including its wait for gradient sync."""
        wait = self.sync_time - run.iteration_time
        return run.energy + run.p2p_power * run.dag.num_ranks * wait

    @property
    def energy(self) -> float:
        """Energy of all pipelines for one synchronised iteration (J)."""
        return self.pipeline_energy(self.straggler) + (self.pipelines - 1) * self.pipeline_energy(self.others)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipelines": self.pipelines,
            "straggler_slowdown": self.straggler_slowdown,
            "sync_time": self.sync_time,
            "straggler_iteration_time": self.straggler.iteration_time,
            "others_iteration_time": self.others.iteration_time,
            "straggler_energy": self.pipeline_energy(self.straggler),
            "others_energy_each": self.pipeline_energy(self.others),
            "energy": self.energy,
        }


def simulate_data_parallel(
    dag: InstructionDAG,
    profile: Profile,
    p2p_power: float,
    pipelines: int,
    straggler_slowdown: float,
    plan: FrequencyPlan | None = None,
    straggler_plan: FrequencyPlan | None = None,
) -> DataParallelResult:
    """Simulate ``pipelines`` data-parallel pipelines, one of which runs ``straggler_slowdown`` times slower.

    The non-stragglers run ``plan``; the straggler runs ``straggler_plan`` (default: max clock)
    with time and energy stretched by the slowdown.
    """
    if pipelines < 1:
        raise PlanError(f"pipelines is {pipelines}. Fix: give at least 1 data-parallel pipeline.")
    if not straggler_slowdown >= 1:
        raise PlanError(f"straggler slowdown is {straggler_slowdown}. Fix: give a factor >= 1 (1.2 = 20 % slower).")
    straggler = simulate(dag, profile, p2p_power, straggler_plan, slowdown=straggler_slowdown)
    others = simulate(dag, profile, p2p_power, plan)
    return DataParallelResult(pipelines, straggler_slowdown, straggler, others)
