"""``perseus plan``: compute the iteration time–energy frontier of a pipeline."""

from __future__ import annotations

import argparse
import time

from rich.console import Console
from rich.table import Table

from perseus_lightning.cli.pipeline_args import add_pipeline_arguments, load_pipeline
from perseus_lightning.core.planner import (
    DEFAULT_STEP,
    EXACT_SECONDS,
    MAX_RESTARTS,
    PARALLEL_MIN_NODES,
    RESTART_NODES,
    RESTART_WITHIN,
    Frontier,
    plan_frontier,
)
from perseus_lightning.core.rounding import available_cpus

DESCRIPTION = f"""\
Compute the iteration time-energy frontier: frequency plans from T_min (every instruction
at max clock's iteration time: zero slowdown, minimum energy for it) to T* (the minimum-energy
iteration time), spaced at most 0.5 % of T_min apart. Every plan's time and energy come from
the exact simulator. By default deadlines are spaced {100 * DEFAULT_STEP:g} % of T_min apart.
Small pipelines (up to a few thousand clock options in all) are also solved exactly, as a
MILP, for up to --exact-seconds: the zero-slowdown plan first, then the frontier's gaps.

Writes frontier.json (schema: version, schedule, stages, microbatches, p2p_power, baseline,
actions, plans[{{iteration_time, energy, lower_bound, frequencies}}]); `perseus simulate
--plan frontier.json` simulates its fastest plan, and `perseus simulate --frontier` evaluates
stragglers with it.
"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "plan", help="compute the time-energy frontier of frequency plans",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pipeline_arguments(parser)
    parser.add_argument("--output", required=True, metavar="frontier.json", help="where to write the frontier")
    parser.add_argument("--points", type=int, metavar="N", help="plan N deadlines evenly from T_min to T* instead")
    parser.add_argument("--exact-seconds", type=float, default=EXACT_SECONDS, metavar="S",
                        help=f"time for exact MILP solves on small pipelines (default {EXACT_SECONDS:g}; 0: none)")
    parser.add_argument("--restarts", type=int, metavar="N",
                        help=f"more optimal LP solutions to round at deadlines within {100 * RESTART_WITHIN:g} %% of T_min "
                             f"whose plan is still above its target, with the optimum of the LP with window floors (default: "
                             f"{RESTART_NODES} / instructions, at most {MAX_RESTARTS}; 0: neither; more take longer, "
                             f"for plans as cheap or cheaper)")
    parser.add_argument("--workers", type=int, default=available_cpus(), metavar="N",
                        help=f"processes that round deadlines in parallel, on pipelines of {PARALLEL_MIN_NODES} "
                             "instructions or more (default: the CPUs available, %(default)s here; same plans with 1)")
    parser.add_argument("--plot", metavar="OUT.png", help="write energy against iteration time for every plan")
    parser.add_argument("--zeus-dir", metavar="DIR", help="also write Zeus's freqs_pipeline_%%05d.py files (1F1B only)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args)
    console = Console()
    started = time.perf_counter()
    with console.status("planning the frontier..."):
        frontier = plan_frontier(
            pipeline.profile, pipeline.dag, pipeline.p2p_power, points=args.points, exact_seconds=args.exact_seconds,
            workers=args.workers, restarts=args.restarts,
        )
    elapsed = time.perf_counter() - started
    frontier.save(args.output)
    console.print(summary_table(frontier, title=f"frontier of {len(frontier.plans)} plans in {elapsed:.1f} s"))
    console.print(f"frontier written to {args.output}")
    if args.zeus_dir:
        written = frontier.write_zeus(args.zeus_dir)
        console.print(f"{len(written)} Zeus plans written to {args.zeus_dir}")
    if args.plot:
        from perseus_lightning.plots import plot_frontier

        plot_frontier(frontier, args.plot)
        console.print(f"plot written to {args.plot}")
    return 0


def summary_table(frontier: Frontier, title: str) -> Table:
    """Baseline, zero-slowdown plan and T* plan: time, energy, saving and gap to the LP bound."""
    table = Table(title=title)
    for column in ("", "time (s)", "slowdown", "energy (J)", "saving", "vs LP bound"):
        table.add_column(column, justify="right")
    t0, e0 = frontier.baseline_time, frontier.baseline_energy
    table.add_row("max clock", f"{t0:.5f}", "", f"{e0:.1f}", "", "")
    for label, point in (("zero slowdown", frontier.fastest), ("T*", frontier.plans[-1])):
        gap = f"{100 * (point.energy / point.lower_bound - 1):+.3f} %" if point.lower_bound else ""
        table.add_row(label, f"{point.iteration_time:.5f}", f"{100 * (point.iteration_time / t0 - 1):+.3f} %",
                      f"{point.energy:.1f}", f"{100 * (1 - point.energy / e0):.2f} %", gap)
    return table
