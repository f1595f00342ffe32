"""Benchmark: the planner against a longer whole-DAG MILP, on the measured GPT-3 175B profiles.

Run: .venv/bin/python bench/milp_reference.py [--microbatches 12] [--deadlines 1.0 1.004] [--seconds 60]
                                             [--prove-gap 0.1 --proof-seconds 3600]

The planner's targets are gaps to the LP lower bound, which a non-convex profile may keep out of
any plan's reach. This prints, per profile and deadline D (a multiple of T_min), four energies as
gaps above the LP bound at D:
- planner: the frontier's cheapest plan finishing by D (plan_frontier with its defaults);
- MILP plan: the best plan finishing by D that HiGHS finds within --seconds, with the incremental
  formulation (core/exact.py) seeded with the planner's plan, simulated exactly;
- MILP bound: what HiGHS proves within --seconds with the choice formulation, also seeded, and
  the strengthened bound's pair rows (core/strengthened_bound.py) as cuts: its dual bound, no plan
  finishing by D is cheaper. Above a target, no planner can meet it at D. With --prove-gap G, the
  solve looks only for plans at most G % above the LP bound (HiGHS's objective bound), which
  proves much sooner that there is none: then the column reads "> G %". --proof-seconds limits
  this solve instead of --seconds;
- strengthened: the LP bound strengthened with what cannot fit D (core/strengthened_bound.py), in
  under a second; a bound as well, usually weaker than the MILP's but from 8 x 24 on the only one.
Both MILPs leave out the clocks that cannot fit D (slower than an instruction's float with every
other instruction at max clock), which no plan finishing by D uses. Each row takes about the two
solves' limits; at 8 x 12 the defaults take about 10 minutes. Needs ../shared/data/stage_profiles.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.exact import ExactPlanner
from perseus_lightning.core.options import ClockOptions, clock_options, frequency_plan
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.planner import plan_frontier
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.simulator import simulate
from perseus_lightning.core.strengthened_bound import FIT_TOLERANCE, pair_cost_floors, strengthened_lower_bound

sys.path.insert(0, str(Path(__file__).parent))
from planner import DATA, PROFILES, STAGES  # noqa: E402  (bench/planner.py, beside this script)


def option_indices(options: list[ClockOptions], plan: FrequencyPlan) -> np.ndarray:
    """The option index of each node's clock in ``plan``."""
    return np.array([list(opt.frequencies).index(f) for opt, f in zip(options, plan.as_array().tolist())])


def milp_plan_energy(
    dag: InstructionDAG, stage_profile: Profile, options: list[ClockOptions], fitting: list[ClockOptions],
    p2p_power: float, deadline: float, seed: np.ndarray, seconds: float,
) -> float:
    """Energy, simulated exactly, of the best plan finishing by ``deadline`` that the incremental MILP
    over the ``fitting`` options (a prefix of each node's ``options``) finds in ``seconds`` from ``seed``."""
    found = ExactPlanner(dag, fitting, p2p_power, "incremental", max_nodes=2**31 - 1).solve(deadline, seed, seconds)
    return simulate(dag, stage_profile, p2p_power, frequency_plan(options, found.choice)).energy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--microbatches", type=int, default=12)
    parser.add_argument("--deadlines", type=float, nargs="+", default=[1.0, 1.004], help="multiples of T_min")
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit of each MILP solve")
    parser.add_argument("--gpus", nargs="+", default=[gpu for gpu, *_ in PROFILES], choices=[gpu for gpu, *_ in PROFILES])
    parser.add_argument("--prove-gap", type=float, metavar="G", help="prove that no plan is within G %% of the LP bound")
    parser.add_argument("--proof-seconds", type=float, help="time limit of the proving solve (default: --seconds)")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not present: the benchmark needs the third-party stage profiles in ../shared/data")
    table = Table(title=f"Planner against a {args.seconds:g} s MILP, GPT-3 175B, {STAGES} stages x {args.microbatches} "
                        "microbatches, synchronous 1F1B (gaps above the LP bound at the deadline)")
    for column in ("GPU", "deadline", "planner", "MILP plan", "MILP bound", "strengthened", "binaries", "seconds"):
        table.add_column(column, justify="right")
    for gpu, name, power, _ in PROFILES:
        if gpu not in args.gpus:
            continue
        profile = Profile.load(DATA / name)
        dag = InstructionDAG.from_schedule(build_schedule("1f1b", STAGES, args.microbatches))
        stage_profile = profile.for_stages(dag.schedule.stage_ranks)
        options = clock_options(dag, stage_profile, power)
        relaxation = HullRelaxation(dag, options, power)
        frontier = plan_frontier(profile, dag, power)
        for multiple in args.deadlines:
            deadline = multiple * frontier.baseline_time
            bound = relaxation.solve(deadline).lower_bound
            planned = frontier.select(deadline * (1 + FIT_TOLERANCE))
            seed = option_indices(options, planned.plan)
            fitting, floors = pair_cost_floors(dag, options, deadline)
            started = time.perf_counter()
            energy = milp_plan_energy(dag, stage_profile, options, fitting, power, deadline, seed, args.seconds)
            proving = ExactPlanner(dag, fitting, power, "choice", max_nodes=2**31 - 1)
            for first, second, floor in floors:
                proving.add_cost_floor([first, second], floor)
            cutoff = math.inf if args.prove_gap is None else bound * (1 + args.prove_gap / 100)
            proven = proving.solve(deadline, seed, args.seconds if args.proof_seconds is None else args.proof_seconds, cutoff)
            proof = f"> {args.prove_gap:g} %" if proven.lower_bound == cutoff else f"{100 * (proven.lower_bound / bound - 1):.3f} %"
            table.add_row(gpu, f"{multiple:g} T_min", f"{100 * (planned.energy / bound - 1):.3f} %",
                          f"{100 * (energy / bound - 1):.3f} %", proof,
                          f"{100 * (strengthened_lower_bound(dag, options, power, deadline) / bound - 1):.3f} %",
                          str(sum(len(opt.time) for opt in fitting)), f"{time.perf_counter() - started:.0f}")
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
