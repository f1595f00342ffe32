"""Run tiny 2-rank ``torch.distributed.pipelining`` jobs on gloo and record the executed actions.

Launch with ``python -m torch.distributed.run --nproc-per-node 2 pipelining_worker.py OUTPUT_JSON
SCHEDULE:MICROBATCHES:VIRTUAL_STAGES ... [--steps N]``: one pipeline per spec, one after the other
in the same process group. Rank 0 writes ``{"SPEC": [[rank 0 actions, rank 1 actions], ...], ...}``,
per spec one entry per training step, with the actions in the order each rank ran them (e.g. ``"0F0"``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
)

from perseus_lightning.core.schedules import Instruction
from perseus_lightning.integrations.pipelining import StageInstrumentation

SINGLE_STAGE_SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
MULTI_STAGE_SCHEDULES = {"interleaved-1f1b": ScheduleInterleaved1F1B, "zero-bubble": ScheduleInterleavedZeroBubble}
WIDTH = 8
ROWS_PER_MICROBATCH = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("specs", nargs="+", help="SCHEDULE:MICROBATCHES:VIRTUAL_STAGES, e.g. 1f1b:4:1")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    observed = {}
    for spec in args.specs:
        schedule, microbatches, virtual_stages = spec.split(":")
        if schedule in SINGLE_STAGE_SCHEDULES and virtual_stages != "1":
            parser.error(f"{spec}: {schedule} runs one stage per rank")
        observed[spec] = run(schedule, int(microbatches), int(virtual_stages), args.steps)
    if dist.get_rank() == 0:
        partial = args.output.with_suffix(".partial")
        partial.write_text(json.dumps(observed))
        os.replace(partial, args.output)  # the file appears complete or not at all
    dist.destroy_process_group()


def run(schedule_name: str, microbatches: int, virtual_stages: int, num_steps: int) -> list[list[list[str]]]:
    """Train ``num_steps`` steps of one pipeline; on rank 0, each step's actions per rank (else ``[]``)."""
    torch.manual_seed(0)
    rank, world = dist.get_rank(), dist.get_world_size()
    num_stages = world * virtual_stages
    layers = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(num_stages)]  # same on every rank
    local_indices = range(rank, num_stages, world)  # rank r runs stages r, r + world, ...
    stages = [PipelineStage(layers[v], v, num_stages, torch.device("cpu")) for v in local_indices]
    loss_fn = nn.MSELoss()
    if schedule_name in SINGLE_STAGE_SCHEDULES:
        schedule = SINGLE_STAGE_SCHEDULES[schedule_name](stages[0], microbatches, loss_fn=loss_fn)
    else:
        schedule = MULTI_STAGE_SCHEDULES[schedule_name](stages, microbatches, loss_fn=loss_fn)
    optimizer = torch.optim.SGD([p for v in local_indices for p in layers[v].parameters()], lr=0.1)

    batch = microbatches * ROWS_PER_MICROBATCH
    inputs, targets = torch.randn(batch, WIDTH), torch.randn(batch, WIDTH)
    steps: list[list[list[str]]] = []
    for _ in range(num_steps):
        executed: list[Instruction] = []  # all local stages, in the order this rank ran them
        instrumentations = [StageInstrumentation(stage, on_end=executed.append) for stage in stages]
        step_inputs = (inputs,) if 0 in local_indices else ()
        step_kwargs = {"target": targets, "losses": []} if num_stages - 1 in local_indices else {}
        optimizer.zero_grad()
        schedule.step(*step_inputs, **step_kwargs)
        optimizer.step()
        for instrumentation in instrumentations:
            instrumentation.remove()
        gathered: list[list[str]] | None = [[] for _ in range(world)] if rank == 0 else None
        dist.gather_object([ins.action for ins in executed], gathered, dst=0)
        if gathered is not None:
            steps.append(gathered)
    return steps


if __name__ == "__main__":
    main()
