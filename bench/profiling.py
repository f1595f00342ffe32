"""Benchmark: plans from the in-situ clock profiler against plans from the full, exact profile.

Run: .venv/bin/python bench/profiling.py [--seeds 5] [--iterations 4]

Needs ../shared/data/stage_profiles (third-party data, not shipped). Each measured GPT-3 175B profile
is the truth of an emulated GPU (8 stages, 12 microbatches, synchronous 1F1B). Training runs in
virtual time, one :class:`~perseus_lightning.runtime.profiler.ClockProfiler` per rank as in the
runtime: every rank runs ``--iterations`` iterations at its profiler's next clock (ranks whose
profiler is done run at the maximum clock), each instruction lasting its profiled time with
``--time-jitter`` relative noise, and a fraction ``--stall-rate`` of them ``--stall-factor`` times
longer at the same power (a host stall inside the instruction; none by default). Each rank's energy
counter updates every ``--update-period`` seconds with ``--counter-noise`` multiplicative noise on
each update, like the emulated GPU; each update's time is known only to within ``--read-gap`` (the
sampler's poll). The counter is attributed to the instruction kinds by
:func:`~perseus_lightning.gpu.energy.attribute_energy`, the runtime's regression, and fed to the
rank's profiler; rank 0 plans on the merged rows.

Columns: clocks the busiest rank measured / supported clocks; training iterations spent profiling;
energy saving of the zero-slowdown plan (``plan_frontier(...).fastest``) against every instruction
at max clock, planned on the full profile and on the in-situ one; their difference; the in-situ
plan's iteration time against ``T_min``. Every plan is evaluated by the exact simulator on the true
profile. Target (A100): within 0.5 percentage points, at most a quarter of the clocks, at most
0.1 % slower; the exit status is 1 if a run misses it.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.planner import EXACT_SECONDS, plan_frontier
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.simulator import earliest_schedule, instruction_costs, simulate
from perseus_lightning.gpu.energy import attribute_energy
from perseus_lightning.runtime.profiler import ClockProfiler, KindMeasurement

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "stage_profiles"
PROFILES = (("A100", "gpt3-175b+a100_sxm_bf16.csv", 83.64, True), ("A40", "gpt3-175b+a40_bf16.csv", 70.38, False))
"""(GPU, file, blocking power W, whether the target applies)."""
STAGES, MICROBATCHES = 8, 12
TARGET_GAP_PP = 0.5
TARGET_SLOWDOWN = 0.001


@dataclass(frozen=True)
class Emulation:
    """How the virtual-time training and its energy counter deviate from the true profile."""

    iterations: int
    time_jitter: float
    update_period: float
    counter_noise: float
    read_gap: float
    stall_rate: float = 0.0
    """Fraction of instructions stalled: ``stall_factor`` times longer, at the same power."""
    stall_factor: float = 3.0


@dataclass(frozen=True)
class Outcome:
    """One profiling run: its cost, and the zero-slowdown savings on the true profile."""

    clocks_measured: int
    iterations: int
    saving_full: float
    saving_in_situ: float
    slowdown: float
    rank0_clocks: tuple[int, ...]


def run_iterations(dag: InstructionDAG, truth: Profile, rank_clocks: list[int], emulation: Emulation,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Start, end and power of every instruction of ``emulation.iterations`` back-to-back iterations,
    rank ``r`` locked at ``rank_clocks[r]``; node ``n`` of iteration ``k`` is entry ``k * num_nodes + n``."""
    mean_time, energy = instruction_costs(dag, truth, np.array(rank_clocks)[dag.ranks])
    starts, ends, offset = [], [], 0.0
    for _ in range(emulation.iterations):
        durations = mean_time * (1.0 + emulation.time_jitter * rng.standard_normal(dag.num_nodes))
        if emulation.stall_rate > 0:
            durations[rng.random(dag.num_nodes) < emulation.stall_rate] *= emulation.stall_factor
        start, end = earliest_schedule(dag, durations)
        starts.append(start + offset)
        ends.append(end + offset)
        offset += float(end.max())
    return np.concatenate(starts), np.concatenate(ends), np.tile(energy / mean_time, emulation.iterations)


def counter_readings(starts: np.ndarray, ends: np.ndarray, power: np.ndarray, p2p_power: float, emulation: Emulation,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rank's energy counter over its instructions (idle at ``p2p_power``): estimated update times and readings."""
    ticks = rng.uniform(0.0, emulation.update_period) + np.arange(0.0, ends.max(), emulation.update_period)
    busy = np.clip(ticks[:, None] - starts[None, :], 0.0, (ends - starts)[None, :])
    true_energy = p2p_power * ticks + busy @ (power - p2p_power)
    increments = np.diff(true_energy, prepend=0.0) * np.maximum(0.0, 1.0 + emulation.counter_noise * rng.standard_normal(len(ticks)))
    observed = ticks + rng.uniform(-0.5, 0.5, len(ticks)) * emulation.read_gap
    return observed, np.cumsum(increments)


def measure(dag: InstructionDAG, truth: Profile, p2p_power: float, rank_clocks: list[int], emulation: Emulation,
            rng: np.random.Generator) -> list[dict[tuple[int, str], KindMeasurement]]:
    """Each rank's attributed time and energy per (stage, kind) after running at ``rank_clocks``."""
    starts, ends, power = run_iterations(dag, truth, rank_clocks, emulation, rng)
    node_ranks = np.tile(dag.ranks, emulation.iterations)
    keys = [(ins.stage, ins.kind) for ins in dag.instructions] * emulation.iterations
    per_rank = []
    for rank in range(dag.num_ranks):
        mine = np.flatnonzero(node_ranks == rank)
        ticks, values = counter_readings(starts[mine], ends[mine], power[mine], p2p_power, emulation, rng)
        attribution = attribute_energy(ticks, values, [(keys[n], starts[n], ends[n]) for n in mine])
        per_rank.append({key: KindMeasurement(label.duration_s, label.energy_j, label.count)
                         for key, label in attribution.labels.items()})
    return per_rank


def profile_in_situ(dag: InstructionDAG, truth: Profile, p2p_power: float, emulation: Emulation,
                    rng: np.random.Generator) -> tuple[Profile, list[ClockProfiler], int]:
    """Profile every rank in situ until all profilers are done; the merged profile, the profilers, the iterations."""
    profilers = [ClockProfiler(truth.frequencies, p2p_power=p2p_power) for _ in range(dag.num_ranks)]
    iterations = 0
    while not all(p.done for p in profilers):
        rank_clocks = [p.next_clock() or truth.max_frequency for p in profilers]
        for profiler, clock, measured in zip(profilers, rank_clocks, measure(dag, truth, p2p_power, rank_clocks, emulation, rng)):
            if not profiler.done:
                profiler.record(clock, measured)
        iterations += emulation.iterations
    rows = [row for profiler in profilers for row in profiler.rows()]
    return Profile.from_rows(rows, source="<in-situ profile>"), profilers, iterations


def evaluate(truth: Profile, dag: InstructionDAG, p2p_power: float, emulation: Emulation, seed: int,
             exact_seconds: float = EXACT_SECONDS) -> Outcome:
    """Profile ``truth`` in situ (random stream ``seed``) and compare the zero-slowdown plans, both planned
    with ``exact_seconds`` of exact MILP (used by small pipelines only)."""
    baseline = simulate(dag, truth, p2p_power)
    full = plan_frontier(truth, dag, p2p_power, exact_seconds=exact_seconds).fastest
    estimate, profilers, iterations = profile_in_situ(dag, truth, p2p_power, emulation, np.random.default_rng(seed))
    deployed = simulate(dag, truth, p2p_power, plan_frontier(estimate, dag, p2p_power, exact_seconds=exact_seconds).fastest.plan)
    return Outcome(
        clocks_measured=max(len(p.measured_clocks) for p in profilers),
        iterations=iterations,
        saving_full=1.0 - full.energy / baseline.energy,
        saving_in_situ=1.0 - deployed.energy / baseline.energy,
        slowdown=deployed.iteration_time / baseline.iteration_time - 1.0,
        rank0_clocks=profilers[0].measured_clocks,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="independent noisy profiling runs per GPU")
    parser.add_argument("--iterations", type=int, default=4, help="training iterations measured per clock")
    parser.add_argument("--time-jitter", type=float, default=0.005, help="relative noise of each instruction's duration")
    parser.add_argument("--stall-rate", type=float, default=0.0, help="fraction of instructions stalled by the host")
    parser.add_argument("--stall-factor", type=float, default=3.0, help="how many times longer a stalled instruction takes")
    parser.add_argument("--update-period", type=float, default=0.1, help="energy counter update period (s)")
    parser.add_argument("--counter-noise", type=float, default=0.005, help="relative noise of each counter update")
    parser.add_argument("--read-gap", type=float, default=0.001, help="uncertainty of each update's time (s)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not present: the benchmark needs the third-party stage profiles in ../shared/data")
    emulation = Emulation(args.iterations, args.time_jitter, args.update_period, args.counter_noise, args.read_gap,
                          args.stall_rate, args.stall_factor)
    console = Console(width=160)
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", STAGES, MICROBATCHES))
    missed = False
    for gpu, name, p2p_power, has_target in PROFILES:
        truth = Profile.load(DATA / name)
        supported = len(truth.frequencies)
        table = Table(title=f"In-situ profiling, GPT-3 175B on {gpu} ({STAGES} stages x {MICROBATCHES} microbatches, 1F1B, "
                            f"P_block {p2p_power} W, counter noise {100 * args.counter_noise:g} %)")
        for column in ("seed", "clocks measured", "profiling iterations", "saving, full profile", "saving, in situ",
                       "difference", "true slowdown", "seconds"):
            table.add_column(column, justify="right")
        outcomes = []
        for seed in range(args.seeds):
            started = time.perf_counter()
            outcome = evaluate(truth, dag, p2p_power, emulation, seed)
            outcomes.append(outcome)
            table.add_row(str(seed), f"{outcome.clocks_measured} / {supported}", str(outcome.iterations),
                          f"{100 * outcome.saving_full:.2f} %", f"{100 * outcome.saving_in_situ:.2f} %",
                          f"{100 * (outcome.saving_full - outcome.saving_in_situ):.2f} pp", f"{100 * outcome.slowdown:+.3f} %",
                          f"{time.perf_counter() - started:.1f}")
        console.print(table)
        worst_gap = max(100 * (o.saving_full - o.saving_in_situ) for o in outcomes)
        worst_slowdown = max(o.slowdown for o in outcomes)
        most_clocks = max(o.clocks_measured for o in outcomes)
        console.print(f"rank 0's clocks (seed 0): {', '.join(map(str, outcomes[0].rank0_clocks))} MHz")
        if has_target:
            met = worst_gap < TARGET_GAP_PP and worst_slowdown <= TARGET_SLOWDOWN and 4 * most_clocks <= supported
            missed |= not met
            console.print(f"target (difference < {TARGET_GAP_PP} pp, slowdown <= {100 * TARGET_SLOWDOWN:g} %, at most a quarter "
                          f"of the clocks): {'met' if met else 'MISSED'} (worst: {worst_gap:.2f} pp, "
                          f"{100 * worst_slowdown:+.3f} %, {most_clocks} / {supported} clocks)\n")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
