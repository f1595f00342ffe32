"""Benchmark: the frontier planner on noisy, non-convex profiles (and lowtime on the same ones).

Run: .venv/bin/python bench/robustness.py [--microbatches 12] [--seeds 3] [--lowtime-seeds 1] [--milp-seconds 0]

Each measured GPT-3 175B profile is perturbed as a noisier measurement would be: every (stage,
instruction, clock) row's time and energy are multiplied by independent log-normal factors
exp(sigma * z), at the levels of NOISE (time sigma / energy sigma). The perturbed profile is the
truth the planner plans for and the exact simulator measures, so lower clocks may come out faster
than the maximum, and energy is non-convex and non-monotone in the clock. Per GPU and level, over
--seeds perturbations:
- invariants: seeds whose frontier holds every invariant of the planner (fastest plan no slower
  than all-max-clock, relative 1e-6; every plan no costlier than the baseline; energy falling
  with time; no Pareto-dominated clock; each plan's time and energy those of the exact simulator);
  the exit status is 1 when any seed breaks one;
- planner s: median wall time of plan_frontier;
- saving @0, gap @0, max gap, spacing: as in bench/planner.py (lowest saving, largest gaps and
  spacing over the seeds; gaps against the LP bound at each plan's own iteration time);
- bound @0: the least gap that any zero-slowdown plan can have, by the strengthened bound (as
  bench/planner.py's), on the seed of the gap @0 column: how much of that gap is proven forced;
- MILP @0 (with --milp-seconds S): the best zero-slowdown plan the whole-DAG MILP finds in S
  seconds, seeded with the planner's (as bench/milp_reference.py's "MILP plan"), as its largest
  gap over the seeds: how much of the gap a longer search recovers, and how much is the bound's;
- lowtime 0.3.0 (when installed, on the first --lowtime-seeds seeds): wall time, and the saving
  of its cheapest plan that is no slower than all-max-clock, by our exact simulator, beside ours on
  the same seeds. On noisy profiles lowtime's fastest plan can be faster than all-max-clock, since
  some lower clocks are; its plan at zero slowdown is the fair comparison.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.planner import Frontier, plan_frontier
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.rounding import ROUNDING_TOLERANCE, available_cpus
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.simulator import simulate
from perseus_lightning.core.strengthened_bound import pair_cost_floors

sys.path.insert(0, str(Path(__file__).parent))
from milp_reference import milp_plan_energy, option_indices  # noqa: E402  (beside this script)
from planner import DATA, PROFILES, STAGES, frontier_quality, lp_bounds  # noqa: E402

NOISE = ((0.0, 0.0), (0.005, 0.02), (0.01, 0.05), (0.03, 0.10))
"""(time sigma, energy sigma) of the log-normal perturbations; the first is the profile as measured."""
ZERO_SLOWDOWN = 1e-6
"""Relative margin by which the fastest plan may end after all-max-clock and still be zero slowdown."""


def perturbed(profile: Profile, time_sigma: float, energy_sigma: float, seed: int) -> Profile:
    """``profile`` with every row's time and energy multiplied by independent factors exp(sigma * z)."""
    rng = np.random.default_rng(seed)
    rows = [
        (stage, kind, freq, t * float(np.exp(time_sigma * rng.standard_normal())), e * float(np.exp(energy_sigma * rng.standard_normal())))
        for stage, kind, freq, t, e in profile.rows()
    ]
    return Profile.from_rows(rows, source=f"{profile.source}, perturbed ({time_sigma:g}/{energy_sigma:g}, seed {seed})")


def broken_invariants(frontier: Frontier, profile: Profile) -> list[str]:
    """The planner's invariants that ``frontier`` breaks on ``profile`` (empty when it holds them all)."""
    dag, power = frontier.dag, frontier.p2p_power
    stage_profile = profile.for_stages(dag.schedule.stage_ranks)
    pareto = {key: set(prof.pareto_frequencies(power)) for key, prof in stage_profile.items()}
    broken = []
    if frontier.fastest.iteration_time > frontier.baseline_time * (1 + ZERO_SLOWDOWN):
        broken.append("fastest plan slower than all-max-clock")
    if any(p.energy > frontier.baseline_energy for p in frontier.plans):
        broken.append("a plan costlier than the baseline")
    if any(b.energy >= a.energy for a, b in zip(frontier.plans, frontier.plans[1:])):
        broken.append("energy not falling with time")
    for plan in frontier.plans:
        freqs = plan.plan.as_array().tolist()
        if any(f not in pareto[(ins.stage, ins.kind)] for ins, f in zip(dag.instructions, freqs)):
            broken.append("a Pareto-dominated clock")
            break
        result = simulate(dag, profile, power, plan.plan)
        if abs(result.iteration_time - plan.iteration_time) > ROUNDING_TOLERANCE * plan.iteration_time or \
                abs(result.energy - plan.energy) > ROUNDING_TOLERANCE * plan.energy:
            broken.append("time or energy not the simulator's")
            break
    return broken


@dataclass(frozen=True)
class Run:
    """One perturbed profile's frontier, measured."""

    seconds: float
    broken: list[str]
    saving: float
    gap_at_zero: float
    bound_at_zero: float
    """The least gap at zero slowdown that any plan can have (the strengthened bound)."""
    max_gap: float
    spacing: float
    milp_gap_at_zero: float | None = None
    """Gap of the MILP's zero-slowdown plan, when asked for."""
    lowtime: tuple[float, float | None] | None = None
    """lowtime's (wall time, saving of its cheapest zero-slowdown plan, or None if it has none)."""


def measure(profile: Profile, power: float, microbatches: int, workers: int, milp_seconds: float, with_lowtime: bool) -> Run:
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", STAGES, microbatches))
    started = time.perf_counter()
    frontier = plan_frontier(profile, dag, power, workers=workers)
    seconds = time.perf_counter() - started
    options, bounds = lp_bounds(frontier, profile)
    gap_at_zero, least, max_gap, spacing = frontier_quality(frontier, options, bounds)
    milp = milp_at_zero_slowdown(frontier, profile, options, milp_seconds) / bounds[0] - 1 if milp_seconds else None
    lowtime = lowtime_at_zero_slowdown(profile, frontier, microbatches) if with_lowtime else None
    return Run(seconds, broken_invariants(frontier, profile), 1 - frontier.fastest.energy / frontier.baseline_energy,
               gap_at_zero, least, max_gap, spacing, milp, lowtime)


def milp_at_zero_slowdown(frontier: Frontier, profile: Profile, options: list[ClockOptions], seconds: float) -> float:
    """Energy of the best zero-slowdown plan the incremental MILP finds in ``seconds``, from the planner's."""
    dag, deadline = frontier.dag, frontier.baseline_time
    fitting, _ = pair_cost_floors(dag, options, deadline)
    seed = option_indices(options, frontier.fastest.plan)
    return milp_plan_energy(dag, profile, options, fitting, frontier.p2p_power, deadline, seed, seconds)


def lowtime_at_zero_slowdown(profile: Profile, frontier: Frontier, microbatches: int) -> tuple[float, float | None]:
    from lowtime_baseline import run_lowtime

    result = run_lowtime(profile, STAGES, microbatches, frontier.p2p_power)
    runs = [simulate(frontier.dag, profile, frontier.p2p_power, plan) for plan in result.plans]
    fitting = [r.energy for r in runs if r.iteration_time <= frontier.baseline_time * (1 + ZERO_SLOWDOWN)]
    return result.wall_time, (1 - min(fitting) / frontier.baseline_energy) if fitting else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--microbatches", type=int, default=12)
    parser.add_argument("--seeds", type=int, default=3, help="perturbations per GPU and noise level")
    parser.add_argument("--lowtime-seeds", type=int, default=1, help="of those, how many lowtime also solves (when installed)")
    parser.add_argument("--milp-seconds", type=float, default=0.0, help="MILP time limit per seed for the MILP @0 column (0: skip)")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="planner worker processes (default: the CPUs available)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not present: the benchmark needs the third-party stage profiles in ../shared/data")
    lowtime_seeds = args.lowtime_seeds if importlib.util.find_spec("lowtime") else 0
    table = Table(title=f"Planner on perturbed GPT-3 175B profiles, {STAGES} stages x {args.microbatches} microbatches, "
                        f"synchronous 1F1B, {args.seeds} seed(s) per level, {args.workers} worker(s)")
    for column in ("GPU", "noise t / E", "invariants", "planner s", "saving @0", "gap @0", "bound @0", "MILP @0", "max gap", "spacing",
                   "lowtime s", "lowtime saving @0", "ours, same seeds"):
        table.add_column(column, justify="right")
    failed = False
    for gpu, name, power, _ in PROFILES:
        measured = Profile.load(DATA / name)
        for time_sigma, energy_sigma in NOISE:
            seeds = range(args.seeds) if time_sigma or energy_sigma else range(1)
            runs = [measure(perturbed(measured, time_sigma, energy_sigma, seed), power, args.microbatches, args.workers,
                            args.milp_seconds, seed < lowtime_seeds) for seed in seeds]
            for seed, run in zip(seeds, runs):
                if run.broken:
                    failed = True
                    print(f"{gpu}, noise {time_sigma:g}/{energy_sigma:g}, seed {seed}: {'; '.join(run.broken)}")
            compared = [run for run in runs if run.lowtime is not None]
            lowtime = [
                f"{statistics.median(run.lowtime[0] for run in compared):.1f}",
                ", ".join("none" if run.lowtime[1] is None else f"{100 * run.lowtime[1]:.2f} %" for run in compared),
                ", ".join(f"{100 * run.saving:.2f} %" for run in compared),
            ] if compared else ["not run"] + [""] * 2
            worst = max(runs, key=lambda run: run.gap_at_zero)
            table.add_row(
                gpu, "as measured" if not (time_sigma or energy_sigma) else f"{100 * time_sigma:g} / {100 * energy_sigma:g} %",
                f"{sum(not run.broken for run in runs)} / {len(runs)}",
                f"{statistics.median(run.seconds for run in runs):.2f}",
                f"{100 * min(run.saving for run in runs):.2f} %",
                f"{100 * worst.gap_at_zero:.3f} %",
                f"{100 * worst.bound_at_zero:.3f} %",
                f"{100 * max(run.milp_gap_at_zero for run in runs):.3f} %" if args.milp_seconds else "not run",
                f"{100 * max(run.max_gap for run in runs):.3f} %",
                f"{100 * max(run.spacing for run in runs):.2f} %",
                *lowtime,
            )
    Console(width=180).print(table)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
