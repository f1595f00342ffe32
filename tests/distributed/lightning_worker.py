"""A Lightning job on gloo with PerseusCallback: a pipeline of MLP stages, ``pp x dp`` ranks.

Launch with ``python -m torch.distributed.run --nproc-per-node N lightning_worker.py OUTPUT_DIR
--pp P [--schedule 1f1b] [--microbatches M] [--steps S] [--callback JSON]``. Stage 0 is
deliberately heavier than the others, so the pipeline is imbalanced. Every rank writes
``OUTPUT_DIR/rank<r>.json``: the callback's summary, the phase after every iteration, the
instructions this rank ran in its last iteration, and the emulated GPU's compute log for the
last ``--log-iterations`` iterations (the clock each instruction really ran at).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from torch.utils.data import DataLoader, TensorDataset

from perseus_lightning.integrations.lightning import PerseusCallback

SCHEDULES = {"1f1b": Schedule1F1B, "gpipe": ScheduleGPipe}
WIDTH = 1024
ROWS_PER_MICROBATCH = 256
HEAVY_STAGE_LAYERS = 3


class PipelineStrategy(DDPStrategy):
    """DDP's process-group set-up without the DDP wrapper: the pipeline schedule communicates."""

    def configure_ddp(self) -> None:
        pass


class PipelineMLP(LightningModule):
    """One pipeline stage of an MLP; gradients are averaged over the stage's data-parallel group."""

    def __init__(self, pp: int, schedule: str, microbatches: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.pp, self.schedule_name, self.microbatches = pp, schedule, microbatches
        rank = int(os.environ.get("RANK", 0))
        self.stage_index = rank % pp
        layers = HEAVY_STAGE_LAYERS if self.stage_index == 0 else 1
        torch.manual_seed(self.stage_index)
        self.layers = nn.Sequential(*(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(layers)))
        self.pipeline_schedule: Any = None

    def setup(self, stage: str) -> None:
        world = dist.get_world_size()
        rank = dist.get_rank()
        groups = [dist.new_group(list(range(s, world, self.pp))) for s in range(self.pp)]  # same stage, every pipeline
        pipeline_groups = [dist.new_group(list(range(k * self.pp, (k + 1) * self.pp))) for k in range(world // self.pp)]
        self.dp_group = groups[self.stage_index]
        pipeline_group = pipeline_groups[rank // self.pp]
        pipeline_stage = PipelineStage(self.layers, self.stage_index, self.pp, torch.device("cpu"), group=pipeline_group)
        self.pipeline_schedule = SCHEDULES[self.schedule_name](pipeline_stage, self.microbatches, loss_fn=nn.MSELoss())

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        inputs, targets = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        first, last = self.stage_index == 0, self.stage_index == self.pp - 1
        self.pipeline_schedule.step(*((inputs,) if first else ()), **({"target": targets} if last else {}))
        for parameter in self.parameters():
            dist.all_reduce(parameter.grad, group=self.dp_group)
            parameter.grad /= dist.get_world_size(self.dp_group)
        optimizer.step()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class PhaseRecorder(Callback):
    """Records the Perseus phase after every iteration."""

    def __init__(self, perseus: PerseusCallback) -> None:
        self.perseus = perseus
        self.phases: list[str] = []
        self.instrumented = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.phases.append(self.perseus.runtime.phase if self.perseus.runtime else "none")
        self.instrumented = len(self.perseus._instrumentations)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("output", type=Path)
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--schedule", choices=list(SCHEDULES), default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--callback", default="{}", help="PerseusCallback keyword arguments, as JSON")
    parser.add_argument("--log-iterations", type=int, default=5)
    args = parser.parse_args()

    torch.set_num_threads(1)
    world = int(os.environ["WORLD_SIZE"])
    perseus = PerseusCallback(**json.loads(args.callback))
    recorder = PhaseRecorder(perseus)
    rows = args.microbatches * ROWS_PER_MICROBATCH
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(args.steps * rows, WIDTH, generator=generator), torch.randn(args.steps * rows, WIDTH, generator=generator))
    trainer = Trainer(
        accelerator="cpu", devices=world, strategy=PipelineStrategy(process_group_backend="gloo"),
        max_steps=args.steps, callbacks=[perseus, recorder], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )
    module = PipelineMLP(args.pp, args.schedule, args.microbatches)
    trainer.fit(module, DataLoader(data, batch_size=rows))

    runtime = perseus.runtime
    device = runtime.device if runtime is not None else None
    log = list(getattr(device, "compute_log", []))
    per_iteration = len(runtime._order) if runtime is not None else 0
    result = {
        "rank": dist.get_rank(),
        "summary": perseus.summary(),
        "phases": recorder.phases,
        "last_iteration": [ins.action for ins in runtime._order] if runtime is not None else [],
        "compute_clocks": [block.clock_mhz for block in log[-args.log_iterations * per_iteration:]] if per_iteration else [],
        "pipeline_rank": runtime._layout.pipeline_rank if runtime is not None and runtime._layout else None,
        "instrumented": recorder.instrumented,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / f"rank{dist.get_rank()}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
