"""``perseus demo``: plan the built-in example pipeline and compare it with the baseline."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.gpu_model import A100_LIKE, example_profile
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.extrinsic import evaluate_straggler
from perseus_lightning.core.planner import plan_frontier
from perseus_lightning.core.simulator import simulate

STAGES = 4
MICROBATCHES = 8
PIPELINES = 4
STRAGGLER_SLOWDOWN = 1.1

DESCRIPTION = f"""\
Plan the built-in example pipeline (a {STAGES}-stage GPT on {A100_LIKE.name} GPUs, 1F1B,
{MICROBATCHES} microbatches): compute its time-energy frontier, deploy the zero-slowdown plan
(the instructions off the critical path slow down, the iteration does not), then let
{PIPELINES - 1} of {PIPELINES} data-parallel pipelines slow to the pace of a straggler
{STRAGGLER_SLOWDOWN}x slower. Prints baseline vs plan, and writes the profile, the frontier, its
plot and both timelines to --output-dir.
"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo", help="plan a built-in example pipeline and print baseline vs plan",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--output-dir", type=Path, default=Path("perseus-demo"), metavar="DIR",
                        help="where to write profile.csv, frontier.json and the plots (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from perseus_lightning.plots import plot_frontier, plot_timeline

    console = Console()
    profile = example_profile()
    power = A100_LIKE.blocking_power
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", STAGES, MICROBATCHES))
    baseline = simulate(dag, profile, power)
    frontier = plan_frontier(profile, dag, power)
    planned = simulate(dag, profile, power, frontier.fastest.plan)
    straggler = evaluate_straggler(frontier, profile, PIPELINES, STRAGGLER_SLOWDOWN)
    dp_baseline, dp_planned = straggler.baseline, straggler.perseus

    table = Table(title=f"Built-in example: {STAGES}-stage GPT on {A100_LIKE.name} GPUs, 1F1B, {MICROBATCHES} microbatches")
    for column in ("pipelines", "clocks", "iteration time (s)", "energy (J)", "saving"):
        table.add_column(column, justify="right")
    table.add_row("1", "max clock", f"{baseline.iteration_time:.4f}", f"{baseline.energy:.1f}", "")
    table.add_row("", "Perseus plan", f"{planned.iteration_time:.4f}", f"{planned.energy:.1f}", _saving(planned.energy, baseline.energy))
    table.add_section()
    table.add_row(f"{PIPELINES}, one {STRAGGLER_SLOWDOWN}x slower", "max clock", f"{dp_baseline.sync_time:.4f}", f"{dp_baseline.energy:.1f}", "")
    table.add_row("", "others paced", f"{dp_planned.sync_time:.4f}", f"{dp_planned.energy:.1f}", _saving(dp_planned.energy, dp_baseline.energy))
    console.print(table)

    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    profile.save(out / "profile.csv")
    frontier.save(out / "frontier.json")
    plot_frontier(frontier, out / "frontier.png")
    plot_timeline(baseline, out / "timeline_baseline.png", title="baseline: every instruction at max clock")
    plot_timeline(planned, out / "timeline_plan.png", title="Perseus plan: same iteration time, less energy")
    console.print(f"wrote {out}/profile.csv, frontier.json, frontier.png, timeline_baseline.png, timeline_plan.png")
    console.print(
        f"check it: perseus simulate {out}/profile.csv --microbatches {MICROBATCHES} "
        f"--p2p-power {power} --plan {out}/frontier.json"
    )
    return 0


def _saving(energy: float, baseline: float) -> str:
    return f"{100 * (1 - energy / baseline):.1f} %"
