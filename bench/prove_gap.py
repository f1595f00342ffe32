"""Benchmark: is any plan within G % of the LP bound at a deadline? A proof split over processes.

Run: .venv/bin/python bench/prove_gap.py [--gpu A100] [--microbatches 12] [--deadline 1.0] [--gap 0.1]
                                         [--workers 2] [--cube-seconds 600] [--hours 2]
                                         [--cube NODE:FIRST-LAST[,NODE:FIRST-LAST...] ...]

The planner's targets are gaps to the LP lower bound (0.1 % at zero slowdown). Whether any plan
meets one at a deadline is the exact MILP with a cutoff (core/exact.py), which on one core can
take hours (bench/milp_reference.py --prove-gap). This runs core/gap_proof.py instead: the search
space is split into cubes (instructions restricted to their faster or slower clocks) that worker
processes solve, and a cube that does not finish within --cube-seconds is split again. Prints
each cube as it ends, then the verdict: "proven" (no plan within G %), "found" (the plan's gap and
iteration time, simulated exactly) or "undecided" after --hours. --cube (repeatable) starts from
the given cubes instead of the whole DAG, to resume a proof: pass every cube an earlier run left
open, as printed (node index, then its range of clock options), since the verdict covers only
them. Needs ../shared/data/stage_profiles.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.gap_proof import Cube, CubeResult, prove_gap
from perseus_lightning.core.options import clock_options, frequency_plan
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.simulator import simulate

sys.path.insert(0, str(Path(__file__).parent))
from planner import DATA, PROFILES, STAGES  # noqa: E402  (bench/planner.py, beside this script)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", default="A100", choices=[gpu for gpu, *_ in PROFILES])
    parser.add_argument("--microbatches", type=int, default=12)
    parser.add_argument("--deadline", type=float, default=1.0, help="a multiple of T_min (all-max-clock time)")
    parser.add_argument("--gap", type=float, default=0.1, help="target gap above the LP bound, in %%")
    parser.add_argument("--workers", type=int, default=2, help="processes solving cubes (one HiGHS thread each)")
    parser.add_argument("--cube-seconds", type=float, default=600.0, help="budget of one cube before it is split")
    parser.add_argument("--hours", type=float, default=2.0, help="limit of the whole proof")
    parser.add_argument("--cube", action="append", type=_cube, help="start from this cube, e.g. 161:0-3,159:0-3")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not present: the benchmark needs the third-party stage profiles in ../shared/data")
    _, name, power, _ = next(entry for entry in PROFILES if entry[0] == args.gpu)
    profile = Profile.load(DATA / name)
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", STAGES, args.microbatches))
    stage_profile = profile.for_stages(dag.schedule.stage_ranks)
    options = clock_options(dag, stage_profile, power)
    t_min = simulate(dag, stage_profile, power, FrequencyPlan.max_clock(dag, profile)).iteration_time
    deadline = args.deadline * t_min
    bound = HullRelaxation(dag, options, power).solve(deadline).lower_bound
    cutoff = bound * (1 + args.gap / 100)
    console = Console(width=160)
    console.print(f"{args.gpu}, {STAGES} x {args.microbatches}, deadline {args.deadline:g} T_min ({deadline:.6f} s): "
                  f"is any plan within {args.gap:g} % of the LP bound {bound:.3f} J (at most {cutoff:.3f} J)?")
    started = time.perf_counter()

    def report(cube: CubeResult) -> None:
        restrictions = ",".join(f"{node}:{first}-{last}" for node, first, last in cube.cube) or "whole DAG"
        labels = " ".join(str(dag.instructions[node]) for node, _, _ in cube.cube)
        console.print(f"{time.perf_counter() - started:7.0f} s  {cube.status:6s}  bound {100 * (cube.bound / bound - 1):.4f} %  "
                      f"{cube.seconds:6.0f} s  {restrictions}  {labels}")

    proof = prove_gap(dag, options, power, deadline, cutoff, args.workers, args.cube_seconds, args.hours * 3600,
                      on_cube=report, cubes=args.cube)
    console.print(f"verdict: {proof.verdict} after {time.perf_counter() - started:.0f} s and {len(proof.cubes)} cubes")
    for cube in proof.open_cubes:
        console.print("open: --cube " + (",".join(f"{node}:{first}-{last}" for node, first, last in cube) or "(whole DAG: no --cube)"))
    if proof.verdict == "found":
        result = simulate(dag, stage_profile, power, frequency_plan(options, proof.cubes[-1].choice))
        console.print(f"plan: {100 * (result.energy / bound - 1):.5f} % above the LP bound, "
                      f"iteration time {result.iteration_time / t_min:.9f} T_min")


def _cube(text: str) -> Cube:
    """``NODE:FIRST-LAST[,...]``, as the cubes are printed."""
    restrictions = []
    for part in text.split(","):
        node, span = part.split(":")
        first, last = span.split("-")
        restrictions.append((int(node), int(first), int(last)))
    return tuple(restrictions)


if __name__ == "__main__":
    main()
