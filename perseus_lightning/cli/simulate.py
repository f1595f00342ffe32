"""``perseus simulate``: iteration time and energy of a pipeline under a frequency plan."""

from __future__ import annotations

import argparse
import json

from rich.console import Console
from rich.table import Table

from perseus_lightning.cli.pipeline_args import add_pipeline_arguments, load_pipeline
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.simulator import SimulationResult, simulate, simulate_data_parallel

DESCRIPTION = """\
Simulate one training iteration exactly: the iteration time is the longest path of the
schedule's instruction DAG, and every GPU draws the blocking power (--p2p-power) while it
is not computing. Without --plan every instruction runs at the profile's maximum clock.

With --pipelines N, N data-parallel copies of the pipeline meet at gradient sync, one of
them --straggler-slowdown times slower (at max clock); the others run the plan and then
wait for it at the blocking power.
"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "simulate", help="simulate one iteration: time, energy, per-stage busy/idle",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_pipeline_arguments(parser)
    parser.add_argument("--plan", metavar="PLAN.json", help="frequency plan: {\"frequencies\": [[[\"forward\", 1410], ...], ...]}, one list per stage in execution order (a frontier file: its first plan)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    parser.add_argument("--timeline", metavar="OUT.png", help="write a Gantt chart of the iteration, coloured by clock")
    parser.add_argument("--pipelines", type=int, default=1, metavar="N", help="data-parallel pipelines (default: %(default)s)")
    parser.add_argument("--straggler-slowdown", type=float, default=1.0, metavar="S", help="one pipeline runs S times slower (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args)
    plan = FrequencyPlan.load(args.plan, pipeline.dag) if args.plan else None
    result = simulate(pipeline.dag, pipeline.profile, pipeline.p2p_power, plan)
    data_parallel = None
    if args.pipelines > 1 or args.straggler_slowdown != 1.0:
        data_parallel = simulate_data_parallel(
            pipeline.dag, pipeline.profile, pipeline.p2p_power, args.pipelines, args.straggler_slowdown, plan
        )
    if args.timeline:
        from perseus_lightning.plots import plot_timeline

        plot_timeline(result, args.timeline)
    if args.json:
        out = result.to_dict(timeline=True)
        if data_parallel is not None:
            out["data_parallel"] = data_parallel.to_dict()
        print(json.dumps(out))
        return 0
    console = Console()
    console.print(_summary_table(result))
    console.print(_stage_table(result))
    if data_parallel is not None:
        dp = data_parallel.to_dict()
        console.print(
            f"{dp['pipelines']} pipelines, straggler {dp['straggler_slowdown']}x: sync at {dp['sync_time']:.4f} s, "
            f"total energy {dp['energy']:.1f} J"
        )
    if args.timeline:
        console.print(f"timeline written to {args.timeline}")
    return 0


def _summary_table(result: SimulationResult) -> Table:
    schedule = result.dag.schedule
    table = Table(title=f"{schedule.name}, {schedule.num_ranks} stages, {schedule.num_microbatches} microbatches")
    for column in ("iteration time (s)", "energy (J)", "compute (J)", "idle (J)", "blocking power (W)"):
        table.add_column(column, justify="right")
    table.add_row(
        f"{result.iteration_time:.5f}", f"{result.energy:.2f}", f"{result.compute_energy:.2f}",
        f"{result.idle_energy:.2f}", f"{result.p2p_power:g}",
    )
    return table


def _stage_table(result: SimulationResult) -> Table:
    table = Table(title="per stage")
    for column in ("stage", "busy (s)", "idle (s)", "compute (J)", "idle (J)"):
        table.add_column(column, justify="right")
    for rank, usage in enumerate(result.ranks):
        table.add_row(str(rank), f"{usage.busy:.4f}", f"{usage.idle:.4f}", f"{usage.compute_energy:.2f}", f"{usage.idle_energy:.2f}")
    return table
