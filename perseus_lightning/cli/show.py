"""``perseus show``: a stage profile as tables and curves."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.table import Table

from perseus_lightning.core.profile import Profile

DESCRIPTION = """\
Summarise a stage profile: for each stage and instruction, the time and energy at the
maximum clock, the clock that minimises energy, and how many clocks are Pareto-optimal
(no other clock is both faster and cheaper). With --stage, list every clock of one stage.
"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "show", help="show a stage profile as a table (and a plot)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("profile", metavar="PROFILE", help="stage profile: Zeus CSV or Perseus JSON")
    parser.add_argument("--stage", type=int, help="list every clock of this stage")
    parser.add_argument("--p2p-power", type=float, default=0.0, metavar="W", help="blocking power for the Pareto filter (default: %(default)s)")
    parser.add_argument("--plot", metavar="OUT.png", help="write time and energy against clock, per stage and instruction")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    profile = Profile.load(args.profile)
    console = Console()
    console.print(_summary_table(profile, args.p2p_power))
    if args.stage is not None:
        profile.get(args.stage, "forward")  # names the fix if the stage does not exist
        console.print(_stage_table(profile, args.stage))
    if args.plot:
        from perseus_lightning.plots import plot_profile

        plot_profile(profile, args.plot, p2p_power=args.p2p_power)
        console.print(f"plot written to {args.plot}")
    return 0


def _summary_table(profile: Profile, p2p_power: float) -> Table:
    table = Table(title=f"{profile.source}: {profile.num_stages} stages, {len(profile.frequencies)} common clocks")
    for column in ("stage", "instruction", "MHz", "t @max (s)", "E @max (J)", "min-E MHz", "t (s)", "E (J)", "Pareto"):
        table.add_column(column, justify="right")
    for (stage, kind), prof in profile.items():
        best = int(prof.energy.argmin())
        table.add_row(
            str(stage), kind, f"{prof.frequencies[0]}-{prof.frequencies[-1]}",
            f"{prof.time[-1]:.4f}", f"{prof.energy[-1]:.2f}", str(prof.frequencies[best]),
            f"{prof.time[best]:.4f}", f"{prof.energy[best]:.2f}", str(len(prof.pareto_frequencies(p2p_power))),
        )
    return table


def _stage_table(profile: Profile, stage: int) -> Table:
    kinds = profile.kinds(stage)
    table = Table(title=f"stage {stage}")
    table.add_column("clock (MHz)", justify="right")
    for kind in kinds:
        table.add_column(f"{kind} time (s)", justify="right")
        table.add_column(f"{kind} energy (J)", justify="right")
    freqs = sorted({f for kind in kinds for f in profile.get(stage, kind).frequencies}, reverse=True)
    for f in freqs:
        cells = []
        for kind in kinds:
            prof = profile.get(stage, kind)
            cells += [f"{prof.time[prof.index(f)]:.4f}", f"{prof.energy[prof.index(f)]:.2f}"] if f in prof.frequencies else ["", ""]
        table.add_row(str(f), *cells)
    return table
