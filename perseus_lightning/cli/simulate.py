"""``perseus simulate``: iteration time and energy of a pipeline under a frequency plan."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

from perseus_lightning.cli.pipeline_args import add_pipeline_arguments, load_pipeline
from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.extrinsic import evaluate_straggler
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.planner import Frontier
from perseus_lightning.core.simulator import SimulationResult, simulate, simulate_data_parallel

DESCRIPTION = """\
Simulate one training iteration exactly: the iteration time is the longest path of the
schedule's instruction DAG, and every GPU draws the blocking power (--p2p-power) while it
is not computing. Without --plan every instruction runs at the profile's maximum clock.

With --pipelines N, N data-parallel copies of the pipeline meet at gradient sync, one of
them --straggler-slowdown times slower (every instruction takes that factor more time and
energy); the others finish early and wait for it at the blocking power. Without --frontier,
the straggler runs at max clock and the others run --plan. With --frontier (from `perseus
plan`), the report compares the baseline (everyone at max clock) with Perseus: the straggler
runs the fastest plan, and the others the plan for min(T', T*), where T' is the straggler's
iteration time.
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
    parser.add_argument("--frontier", metavar="frontier.json", help="evaluate Perseus against stragglers with this frontier (from `perseus plan`)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args)
    plan = FrequencyPlan.load(args.plan, pipeline.dag) if args.plan else None
    result = simulate(pipeline.dag, pipeline.profile, pipeline.p2p_power, plan)
    data_parallel = args.pipelines > 1 or args.straggler_slowdown != 1.0
    report: dict[str, Any] = {}
    if args.frontier:
        frontier = Frontier.load(args.frontier)
        if frontier.dag.schedule.actions() != pipeline.dag.schedule.actions():
            raise PlanError(
                f"{args.frontier}: was planned for {frontier.dag.schedule.name} with {frontier.dag.num_ranks} stages and "
                f"{frontier.dag.schedule.num_microbatches} microbatches, not this pipeline. Fix: plan this pipeline with `perseus plan`."
            )
        report["straggler"] = evaluate_straggler(frontier, pipeline.profile, args.pipelines, args.straggler_slowdown).to_dict()
    elif data_parallel:
        report["data_parallel"] = simulate_data_parallel(
            pipeline.dag, pipeline.profile, pipeline.p2p_power, args.pipelines, args.straggler_slowdown, plan
        ).to_dict()
    if args.timeline:
        from perseus_lightning.plots import plot_timeline

        plot_timeline(result, args.timeline)
    if args.json:
        print(json.dumps({**result.to_dict(timeline=True), **report}))
        return 0
    console = Console()
    console.print(_summary_table(result))
    console.print(_stage_table(result))
    if "straggler" in report:
        console.print(_straggler_table(report["straggler"]))
    if "data_parallel" in report:
        dp = report["data_parallel"]
        console.print(
            f"{dp['pipelines']} pipelines, straggler {dp['straggler_slowdown']}x: sync at {dp['sync_time']:.4f} s, "
            f"total energy {dp['energy']:.1f} J"
        )
    if args.timeline:
        console.print(f"timeline written to {args.timeline}")
    return 0


def _straggler_table(evaluation: dict[str, Any]) -> Table:
    table = Table(title=f"{evaluation['pipelines']} pipelines, one {evaluation['straggler_slowdown']}x slower")
    for column in ("", "sync time (s)", "energy (J)", "saving"):
        table.add_column(column, justify="right")
    table.add_row("baseline (max clock)", f"{evaluation['baseline']['sync_time']:.4f}", f"{evaluation['baseline_energy']:.1f}", "")
    table.add_row("Perseus", f"{evaluation['perseus']['sync_time']:.4f}", f"{evaluation['perseus_energy']:.1f}",
                  f"{100 * evaluation['saving']:.2f} %")
    return table


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
