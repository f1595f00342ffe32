"""Benchmark: the frontier planner on the measured GPT-3 175B profiles, against the LP bound and lowtime.

Run: .venv/bin/python bench/planner.py [--microbatches 12 24 48 96] [--lowtime-max 24] [--restarts N] [--scale]

Needs ../shared/data/stage_profiles (third-party data, not shipped). Columns:
- planner s: wall time of plan_frontier (the whole frontier, T_min to T*), with as many worker
  processes as `perseus plan` takes by default (the CPUs available; --workers to change) and the
  planner's default restarts near T_min (--restarts 0 for none, the planner before session 27);
- saving @0: energy saving of the zero-slowdown plan against every instruction at max clock;
- gap @0: that plan's energy above the LP lower bound at the same deadline (T_min);
- bound @0: how far above that LP bound every zero-slowdown plan must be, proven by the LP
  strengthened with what cannot fit at T_min (core/strengthened_bound.py): a zero-slowdown target
  below it is out of any planner's reach;
- max gap: the largest gap of any plan, against the LP bound at the plan's own iteration time;
- spacing: the largest distance between neighbouring plans, in % of T_min;
- lowtime 0.3.0 (when installed, up to --lowtime-max microbatches): wall time, saving of its
  fastest plan and that plan's slowdown, both by our exact simulator.
A second table evaluates stragglers (16 pipelines, one 1.2x slower) against the paper's emulation.
With --scale, a third times 16 x 128 and 32 x 256 synthetic pipelines (planned with the periodic LP,
with the same workers) and compares their zero-slowdown plans with the full LP bound, which takes
about a minute at 32 x 256, and at 16 x 128 every plan with the full LP bound at its iteration time.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.extrinsic import evaluate_straggler
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.options import ClockOptions, clock_options
from perseus_lightning.core.planner import Frontier, plan_frontier
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.rounding import available_cpus
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.strengthened_bound import strengthened_lower_bound

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "stage_profiles"
PROFILES = (("A100", "gpt3-175b+a100_sxm_bf16.csv", 83.64, 27.0), ("A40", "gpt3-175b+a40_bf16.csv", 70.38, 23.6))
STAGES = 8


def lp_bounds(frontier: Frontier, profile: Profile) -> tuple[list[ClockOptions], list[float]]:
    """The clock options of the frontier's DAG on ``profile``, and the LP bound at each plan's own iteration time."""
    dag = frontier.dag
    options = clock_options(dag, profile.for_stages(dag.schedule.stage_ranks), frontier.p2p_power)
    relaxation = HullRelaxation(dag, options, frontier.p2p_power)
    return options, [relaxation.solve(p.iteration_time).lower_bound for p in frontier.plans]


def largest_spacing(frontier: Frontier) -> float:
    """The largest distance between neighbouring plans' iteration times, as a fraction of T_min."""
    return max(np.diff([p.iteration_time for p in frontier.plans]), default=0.0) / frontier.baseline_time


def frontier_quality(frontier: Frontier, options: list[ClockOptions], bounds: list[float]) -> tuple[float, float, float, float]:
    """(gap at zero slowdown, the proven least such gap, largest gap at each plan's own time,
    largest spacing / T_min), from :func:`lp_bounds`'s ``options`` and ``bounds``."""
    gaps = [p.energy / bound - 1 for p, bound in zip(frontier.plans, bounds)]
    least = strengthened_lower_bound(frontier.dag, options, frontier.p2p_power, frontier.fastest.iteration_time) / bounds[0] - 1
    return gaps[0], least, max(gaps), largest_spacing(frontier)


def lowtime_columns(profile: Profile, microbatches: int, p2p_power: float, baseline: tuple[float, float], limit: int) -> list[str]:
    if importlib.util.find_spec("lowtime") is None:
        return ["not installed"] * 3
    if microbatches > limit:
        return [f"skipped (> {limit} mb)"] + [""] * 2
    sys.path.insert(0, str(Path(__file__).parent))
    from lowtime_baseline import run_lowtime

    result = run_lowtime(profile, STAGES, microbatches, p2p_power)
    return [f"{result.wall_time:.1f}", f"{100 * (1 - result.fastest_energy / baseline[1]):.2f} %",
            f"{100 * (result.fastest_time / baseline[0] - 1):+.3f} %"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--microbatches", type=int, nargs="+", default=[12, 24, 48, 96])
    parser.add_argument("--lowtime-max", type=int, default=24, help="run lowtime up to this many microbatches")
    parser.add_argument("--scale", action="store_true", help="also time 16 x 128 and 32 x 256 synthetic pipelines")
    parser.add_argument("--workers", type=int, default=available_cpus(), help="planner worker processes (default: the CPUs available)")
    parser.add_argument("--restarts", type=int, help="restarts per deadline near T_min (default: the planner's, by size)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not present: the benchmark needs the third-party stage profiles in ../shared/data")
    console = Console(width=160)

    restarts = "default restarts" if args.restarts is None else f"{args.restarts} restart(s)"
    table = Table(title=f"Frontier planner, GPT-3 175B, {STAGES} stages, synchronous 1F1B, {args.workers} worker(s), {restarts}")
    for column in ("GPU", "mb", "plans", "planner s", "saving @0", "gap @0", "bound @0", "max gap", "spacing",
                   "lowtime s", "lowtime saving", "lowtime slowdown"):
        table.add_column(column, justify="right")
    frontiers: dict[str, tuple[Frontier, Profile]] = {}
    for gpu, name, power, _ in PROFILES:
        profile = Profile.load(DATA / name)
        for m in args.microbatches:
            dag = InstructionDAG.from_schedule(build_schedule("1f1b", STAGES, m))
            started = time.perf_counter()
            frontier = plan_frontier(profile, dag, power, workers=args.workers, restarts=args.restarts)
            elapsed = time.perf_counter() - started
            gap0, least_gap0, max_gap, spacing = frontier_quality(frontier, *lp_bounds(frontier, profile))
            saving = 1 - frontier.fastest.energy / frontier.baseline_energy
            lowtime = lowtime_columns(profile, m, power, (frontier.baseline_time, frontier.baseline_energy), args.lowtime_max)
            table.add_row(gpu, str(m), str(len(frontier.plans)), f"{elapsed:.2f}", f"{100 * saving:.2f} %",
                          f"{100 * gap0:.3f} %", f"{100 * least_gap0:.3f} %", f"{100 * max_gap:.3f} %", f"{100 * spacing:.2f} %", *lowtime)
            frontiers[f"{gpu}-{m}"] = (frontier, profile)
    console.print(table)

    straggler = Table(title="Stragglers: 16 pipelines, one 1.2x slower (paper emulation: 8 stages, 96 microbatches)")
    for column in ("GPU", "mb", "baseline J", "Perseus J", "saving", "paper"):
        straggler.add_column(column, justify="right")
    for gpu, _, _, paper in PROFILES:
        key = f"{gpu}-{max(args.microbatches)}"
        frontier, profile = frontiers[key]
        result = evaluate_straggler(frontier, profile, 16, 1.2)
        straggler.add_row(gpu, str(max(args.microbatches)), f"{result.baseline.energy:.0f}", f"{result.perseus.energy:.0f}",
                          f"{100 * result.saving:.1f} %", f"{paper} %")
    console.print(straggler)

    if args.scale:
        console.print(scale_table(args.workers))


FULL_LP_MAX_GAP_NODES = 4096
"""Up to this many instructions the scale table also takes every plan's gap to the full LP bound
(about 0.6 s per deadline at 16 x 128, about a minute at 32 x 256)."""


def scale_table(workers: int) -> Table:
    """Long pipelines on a synthetic A100-like profile (10 % random stage imbalance): the planner
    (periodic LP) timed, then its zero-slowdown plan (and, up to ``FULL_LP_MAX_GAP_NODES``
    instructions, every plan) compared with the full LP bound, solved apart."""
    table = Table(title=f"Scale: synthetic A100-like profile, synchronous 1F1B, {workers} worker(s)")
    for column in ("stages x mb", "instructions", "plans", "planner s", "peak RSS MB", "worker RSS MB", "saving @0",
                   "gap @0 (full LP)", "max gap (full LP)", "spacing", "LP bound s"):
        table.add_column(column, justify="right")
    for stages, microbatches in ((16, 128), (32, 256)):
        rng = np.random.default_rng(0)
        profile = A100_LIKE.profile([(0.05 * (1 + 0.1 * rng.random()), 0.1 * (1 + 0.1 * rng.random())) for _ in range(stages)])
        dag = InstructionDAG.from_schedule(build_schedule("1f1b", stages, microbatches))
        started = time.perf_counter()
        frontier = plan_frontier(profile, dag, A100_LIKE.blocking_power, workers=workers)
        elapsed = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # whole process, so far
        worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest ended worker, so far
        started = time.perf_counter()
        options = clock_options(dag, profile.for_stages(dag.schedule.stage_ranks), frontier.p2p_power)
        full = HullRelaxation(dag, options, frontier.p2p_power)
        bound = full.solve(frontier.fastest.iteration_time).lower_bound
        bound_time = time.perf_counter() - started
        max_gap = "skipped"
        if dag.num_nodes <= FULL_LP_MAX_GAP_NODES:
            max_gap = f"{100 * max(p.energy / full.solve(p.iteration_time).lower_bound - 1 for p in frontier.plans):.3f} %"
        spacing = largest_spacing(frontier)
        table.add_row(f"{stages} x {microbatches}", str(dag.num_nodes), str(len(frontier.plans)), f"{elapsed:.1f}", f"{peak:.0f}", f"{worker:.0f}",
                      f"{100 * (1 - frontier.fastest.energy / frontier.baseline_energy):.2f} %",
                      f"{100 * (frontier.fastest.energy / bound - 1):.3f} %", max_gap, f"{100 * spacing:.2f} %", f"{bound_time:.1f}")
    return table

if __name__ == "__main__":
    main()
