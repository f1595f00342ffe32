"""Command-line arguments that describe a pipeline: profile, schedule and size."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.schedules import SCHEDULES, build_schedule


@dataclass(frozen=True)
class Pipeline:
    """A loaded profile and the instruction DAG of the chosen schedule."""

    profile: Profile
    dag: InstructionDAG
    p2p_power: float


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("profile", metavar="PROFILE", help="stage profile: Zeus CSV (stage,instruction,frequency,time,energy) or Perseus JSON")
    parser.add_argument("--stages", type=int, help="pipeline stages (GPUs per pipeline); default: the profile's stage count")
    parser.add_argument("--microbatches", type=int, required=True, help="microbatches per iteration")
    parser.add_argument("--schedule", choices=SCHEDULES, default="1f1b", help="pipeline schedule (default: %(default)s)")
    parser.add_argument(
        "--virtual-stages", type=int, default=1, metavar="V",
        help="model chunks per stage, for interleaved-1f1b and zero-bubble (default: %(default)s)",
    )
    parser.add_argument(
        "--p2p-power", type=float, required=True, metavar="W",
        help="blocking power: watts a GPU draws while it waits on P2P communication (A100: 83.64, A40: 70.38)",
    )


def load_pipeline(args: argparse.Namespace) -> Pipeline:
    profile = Profile.load(args.profile)
    stages = args.stages if args.stages is not None else profile.num_stages
    schedule = build_schedule(args.schedule, stages, args.microbatches, args.virtual_stages, profile.has_split_backward)
    dag = InstructionDAG.from_schedule(schedule)
    profile.for_stages(schedule.stage_ranks)  # fail early if the stage counts do not fit
    return Pipeline(profile, dag, args.p2p_power)
