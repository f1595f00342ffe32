"""Run a tiny 2-rank ``torch.distributed.pipelining`` job on gloo and record the executed actions.

Launch with ``python -m torch.distributed.run --nproc-per-node 2 pipelining_worker.py SCHEDULE
MICROBATCHES OUTPUT_JSON [--virtual-stages V] [--steps N]``. Rank 0 writes
``{"steps": [[rank 0 actions, rank 1 actions], ...]}``, one entry per training step, with the
actions in the order each rank ran them (e.g. ``"0F0"``).
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
    parser.add_argument("schedule", choices=[*SINGLE_STAGE_SCHEDULES, *MULTI_STAGE_SCHEDULES])
    parser.add_argument("microbatches", type=int)
    parser.add_argument("output", type=Path)
    parser.add_argument("--virtual-stages", type=int, default=1, help="model stages per rank")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    num_stages = world * args.virtual_stages
    layers = [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(num_stages)]  # same on every rank
    local_indices = range(rank, num_stages, world)  # rank r runs stages r, r + world, ...
    stages = [PipelineStage(layers[v], v, num_stages, torch.device("cpu")) for v in local_indices]
    loss_fn = nn.MSELoss()
    if args.schedule in SINGLE_STAGE_SCHEDULES:
        if len(stages) != 1:
            parser.error(f"{args.schedule} runs one stage per rank; drop --virtual-stages")
        schedule = SINGLE_STAGE_SCHEDULES[args.schedule](stages[0], args.microbatches, loss_fn=loss_fn)
    else:
        schedule = MULTI_STAGE_SCHEDULES[args.schedule](stages, args.microbatches, loss_fn=loss_fn)
    optimizer = torch.optim.SGD([p for v in local_indices for p in layers[v].parameters()], lr=0.1)

    batch = args.microbatches * ROWS_PER_MICROBATCH
    inputs, targets = torch.randn(batch, WIDTH), torch.randn(batch, WIDTH)
    steps: list[list[list[str]]] = []
    for _ in range(args.steps):
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

    if rank == 0:
        partial = args.output.with_suffix(".partial")
        partial.write_text(json.dumps({"steps": steps}))
        os.replace(partial, args.output)  # the file appears complete or not at all
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
