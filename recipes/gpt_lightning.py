"""Train a GPT-2 causal LM with PyTorch Lightning, pipeline-parallel over ranks and data-parallel across
pipelines, while Perseus removes the energy bloat of the pipeline's imbalance.

    torchrun --nproc-per-node 2 recipes/gpt_lightning.py --pp 2 --schedule 1f1b
    torchrun --nproc-per-node 4 recipes/gpt_lightning.py --pp 2 --dp 2 --summary out.json
    python recipes/gpt_lightning.py --pp 1 --dp 1   # one process: plain training, no pipelining

Without CUDA, every rank drives the emulated GPU of its local rank (see recipes/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from gpt_cli import configure_gpu_backend, emulation_overrides, finish_args, print_report, recipe_parser, write_plots
from gpt_pipeline import (
    SyntheticTokens,
    all_reduce_grads,
    build_schedule,
    build_stages,
    causal_lm_loss,
    process_groups,
    stage_indices,
)
from lightning.pytorch.strategies import DDPStrategy
from torch import nn
from torch.utils.data import DataLoader

warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch 2.13: harmless deprecation noise


class PipelineParallelStrategy(DDPStrategy):
    """Lightning's DDP launch and process group, without the ``DistributedDataParallel`` wrapper.

    The pipeline schedule runs autograd itself, and :class:`PipelineGPT` averages its gradients
    over its data-parallel group.
    """

    def configure_ddp(self) -> None:
        """Leave the LightningModule unwrapped."""


class PipelineGPT(pl.LightningModule):
    """The GPT-2 stages of global rank ``rank``, trained one pipeline iteration per batch (manual optimization).

    ``pipeline_schedule`` is the ``torch.distributed.pipelining`` schedule, from ``configure_model``
    on (``None`` when ``pp == 1``): the Perseus callback finds the stages through it.
    """

    def __init__(self, args: argparse.Namespace, rank: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.args = args
        num_stages = len(args.layers_per_stage)
        self.stage_indices = stage_indices(rank % args.pp, args.pp, num_stages // args.pp)
        self.stages = nn.ModuleList(build_stages(args.model, args.layers_per_stage, self.stage_indices, args.seed))
        self.holds_first, self.holds_last = 0 in self.stage_indices, num_stages - 1 in self.stage_indices
        self.dp_group: dist.ProcessGroup | None = None
        self.pipeline_schedule = None
        self.losses: list[torch.Tensor] = []  # per step, on a last-stage rank
        self.step_starts: list[float] = []

    def configure_model(self) -> None:
        """Create the process groups and the schedule, once the process group exists."""
        if self.dp_group is not None:
            return
        args = self.args
        pp_group, self.dp_group = process_groups(args.pp, args.dp)
        if args.pp > 1:
            self.pipeline_schedule = build_schedule(
                args.schedule,
                list(self.stages),
                self.stage_indices,
                len(args.layers_per_stage),
                args.microbatches,
                self.trainer.strategy.root_device,
                pp_group,
            )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.args.lr)

    def train_dataloader(self) -> DataLoader:
        """Each pipeline's own synthetic batches, the same on all of its stages."""
        a, dp_index = self.args, self.global_rank // self.args.pp
        data = SyntheticTokens(a.steps, a.batch_size, a.model.seq_len, a.model.vocab_size, seed=a.seed + dp_index)
        return DataLoader(data, batch_size=None)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        """One pipeline iteration: forward and backward of all microbatches, gradient averaging, optimizer step."""
        self.step_starts.append(time.perf_counter())
        inputs, targets = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        if self.pipeline_schedule is None:
            loss = causal_lm_loss(self.stages[0](inputs), targets)
            self.manual_backward(loss)
        else:
            losses: list[torch.Tensor] = []
            step_args = (inputs,) if self.holds_first else ()
            step_kwargs = {"target": targets, "losses": losses} if self.holds_last else {}
            self.pipeline_schedule.step(*step_args, **step_kwargs, return_outputs=False)
            loss = torch.stack(losses).mean() if self.holds_last else None
        all_reduce_grads(self.stages, self.dp_group)
        optimizer.step()
        if loss is None:
            return
        self.losses.append(loss.detach())
        self.log("train_loss", loss.detach())
        last_step = batch_idx == self.args.steps - 1
        if self.global_rank == self.args.pp - 1 and (batch_idx % self.args.log_interval == 0 or last_step):
            print(f"step {batch_idx}: loss {loss.item():.4f}", flush=True)

    def on_train_end(self) -> None:
        self.step_starts.append(time.perf_counter())

    def recipe_summary(self) -> dict[str, Any]:
        """Arguments, loss per step (mean over pipelines) and iteration times; a collective call."""
        gathered: list[list[float] | None] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, [loss.item() for loss in self.losses] if self.holds_last else None)
        per_pipeline = [losses for losses in gathered if losses is not None]
        times = [b - a for a, b in zip(self.step_starts, self.step_starts[1:])]
        return {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(self.args).items() if k != "model"},
            "model": vars(self.args.model),
            "loss": [statistics.fmean(step) for step in zip(*per_pipeline)],
            "iteration_times_s": times,
            "median_iteration_time_s": statistics.median(times[1:] or times),  # the first step warms up
        }


def parse_args() -> argparse.Namespace:
    parser, perseus = recipe_parser(__doc__)
    perseus.add_argument("--perseus-config", type=Path, help="PerseusCallback options (YAML)")
    perseus.add_argument("--no-perseus", action="store_true", help="train without the callback (baselines, overhead)")
    parser.add_argument("--plots", type=Path, help="write the frontier and the deployed plan's timeline (PNG) here")
    args = parser.parse_args()
    if args.no_perseus and args.straggler_rank:
        parser.error("the Perseus callback emulates stragglers; for a baseline, set mode: observe in --perseus-config")
    return finish_args(parser, args, "launch with torchrun --nproc-per-node {n}")


def perseus_callback(args: argparse.Namespace) -> pl.Callback | None:
    """The Perseus callback configured from the command line, or ``None`` with ``--no-perseus``."""
    if args.no_perseus:
        return None
    from perseus_lightning.integrations.lightning import PerseusCallback

    overrides = emulation_overrides(args)
    if args.perseus_config:
        return PerseusCallback.from_config(args.perseus_config, **overrides)
    return PerseusCallback(**overrides)


def main() -> None:
    args = parse_args()
    emulated_dir = configure_gpu_backend()
    callback = perseus_callback(args)
    cuda = torch.cuda.is_available()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=local_world,
        num_nodes=args.pp * args.dp // local_world,
        strategy=PipelineParallelStrategy(process_group_backend="nccl" if cuda else "gloo"),
        max_steps=args.steps,
        callbacks=[callback] if callback else [],
        logger=False,
        enable_checkpointing=False,  # Lightning would save rank 0's stages only
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,  # each pipeline draws its own batches
    )
    model = PipelineGPT(args, rank=int(os.environ.get("RANK", "0")))
    trainer.fit(model)

    summary = {**(callback.summary() if callback else {}), "recipe": model.recipe_summary()}
    if trainer.global_rank == 0:
        print_report(summary)
        if args.summary:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(json.dumps(summary, indent=2))
        if args.plots:
            for path in write_plots(callback.runtime if callback else None, args.plots):
                print(f"wrote {path}")
    dist.barrier()
    if emulated_dir is not None and trainer.local_rank == 0:
        shutil.rmtree(emulated_dir, ignore_errors=True)
    dist.destroy_process_group()  # without it, ~1 in 30 gloo jobs aborts at exit


if __name__ == "__main__":
    main()
