"""Train a GPT-2 causal LM with Hugging Face Accelerate, pipeline-parallel over ranks and data-parallel
across pipelines, while Perseus removes the energy bloat of the pipeline's imbalance.

    PERSEUS_CONFIG=perseus.yaml accelerate launch --multi_gpu --num_processes 2 recipes/gpt_accelerate.py --pp 2
    perseus launch --perseus-config perseus.yaml --multi_gpu --num_processes 4 recipes/gpt_accelerate.py --pp 2 --dp 2
    accelerate launch --multi_gpu --num_processes 2 recipes/gpt_accelerate.py --pp 2   # no config: no Perseus

Perseus runs only when ``PERSEUS_CONFIG`` names its YAML file (``perseus launch`` sets it). With
``--pp 1`` each rank is a data-parallel replica (DDP through ``accelerator.prepare``) and each
microbatch one gradient-accumulation step. Without CUDA, every rank drives the emulated GPU of its
local rank (see recipes/README.md); on CPU, launch with ``--multi_gpu`` (``--cpu`` runs one process).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
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
from torch import nn

from perseus_lightning.accelerate import ENV_CONFIG, PerseusPlugin


def parse_args() -> argparse.Namespace:
    parser, perseus = recipe_parser(__doc__)
    perseus.description = f"enabled by {ENV_CONFIG}, or by `perseus launch --perseus-config`"
    parser.add_argument("--save-state", type=Path, metavar="DIR",
                        help="checkpoint here at the end: Accelerate's state (with Perseus's plan) and each rank's stages")
    parser.add_argument("--resume-from", type=Path, metavar="DIR", help="resume from a --save-state checkpoint")
    parser.add_argument("--plots", type=Path, help="write the frontier and the deployed plan's timeline (PNG) here")
    args = parser.parse_args()
    if args.straggler_rank and not os.environ.get(ENV_CONFIG):
        parser.error(f"Perseus emulates the stragglers: set {ENV_CONFIG}, or launch with perseus launch --perseus-config")
    hint = "launch with accelerate launch --multi_gpu --num_processes {n} (also on CPU: --cpu runs a single process)"
    return finish_args(parser, args, hint)


def perseus_plugin(args: argparse.Namespace, accelerator: Accelerator) -> PerseusPlugin:
    """The plugin configured by ``$PERSEUS_CONFIG`` (disabled without it), with the straggler emulation on top."""
    return PerseusPlugin.from_env(accelerator, **emulation_overrides(args))


class PipelineGPT:
    """The GPT-2 stages of this rank and one training iteration over them.

    With ``pp > 1`` the ``torch.distributed.pipelining`` schedule runs the microbatches and every
    stage averages its gradients over its data-parallel group; with ``pp == 1`` the model is
    Accelerate's (DDP) and each microbatch is one step of ``accelerator.accumulate``.
    """

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator, perseus: PerseusPlugin) -> None:
        self.args, self.accelerator, self.perseus = args, accelerator, perseus
        rank, num_stages = accelerator.process_index, len(args.layers_per_stage)
        indices = stage_indices(rank % args.pp, args.pp, num_stages // args.pp)
        self.stages = nn.ModuleList(build_stages(args.model, args.layers_per_stage, indices, args.seed)).to(accelerator.device)
        self.holds_first, self.holds_last = 0 in indices, num_stages - 1 in indices
        optimizer = torch.optim.AdamW(self.stages.parameters(), lr=args.lr)
        self.schedule = None
        if args.pp > 1:
            pp_group, self.dp_group = process_groups(args.pp, args.dp)
            self.optimizer = optimizer
            self.schedule = build_schedule(args.schedule, list(self.stages), indices, num_stages, args.microbatches,
                                           accelerator.device, pp_group)
            perseus.attach(self.schedule)
        else:
            self.model, self.optimizer = accelerator.prepare(self.stages[0], optimizer)

    def iteration(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor | None:
        """One optimizer step on a batch; its mean loss (on the ranks that hold the last stage)."""
        inputs, targets = inputs.to(self.accelerator.device), targets.to(self.accelerator.device)
        if self.schedule is None:
            chunks = zip(inputs.chunk(self.args.microbatches), targets.chunk(self.args.microbatches))
            return torch.stack([self.microbatch(x, y) for x, y in chunks]).mean()
        with self.perseus.step():
            self.optimizer.zero_grad()
            losses: list[torch.Tensor] = []
            step_args = (inputs,) if self.holds_first else ()
            step_kwargs = {"target": targets, "losses": losses} if self.holds_last else {}
            self.schedule.step(*step_args, **step_kwargs, return_outputs=False)
            all_reduce_grads(self.stages, self.dp_group)
            self.optimizer.step()
        return torch.stack(losses).mean().detach() if self.holds_last else None

    def microbatch(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one microbatch; the optimizer steps after the last one."""
        with self.accelerator.accumulate(self.model), self.perseus.step():
            loss = causal_lm_loss(self.model(inputs), targets)
            self.accelerator.backward(loss)
            self.optimizer.step()
            self.optimizer.zero_grad()
        return loss.detach()

    def save_state(self, directory: Path, step: int) -> None:
        """Accelerate's state (RNG, Perseus's profile and plan) and this rank's stages, optimizer and step."""
        directory.mkdir(parents=True, exist_ok=True)
        self.accelerator.save_state(str(directory))
        state = {"stages": self.stages.state_dict(), "optimizer": self.optimizer.state_dict(), "step": step}
        torch.save(state, directory / f"stages-rank{self.accelerator.process_index}.pt")

    def load_state(self, directory: Path) -> int:
        """Restore :meth:`save_state`; returns the step to continue from."""
        self.accelerator.load_state(str(directory))
        state = torch.load(directory / f"stages-rank{self.accelerator.process_index}.pt", map_location="cpu")
        self.stages.load_state_dict(state["stages"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["step"]


def recipe_summary(args: argparse.Namespace, losses: list[float] | None, step_starts: list[float]) -> dict[str, Any]:
    """Arguments, loss per step (mean over pipelines) and iteration times; a collective call."""
    per_pipeline = [losses for losses in gather_object([losses]) if losses is not None]
    times = [b - a for a, b in itertools.pairwise(step_starts)]
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "model"},
        "model": vars(args.model),
        "loss": [statistics.fmean(step) for step in zip(*per_pipeline)],
        "iteration_times_s": times,
        "median_iteration_time_s": statistics.median(times[1:] or times),  # the first step warms up
    }


def main() -> None:
    args = parse_args()
    emulated_dir = configure_gpu_backend()
    accumulation = args.microbatches if args.pp == 1 else 1  # with pp > 1 the schedule runs the microbatches
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=accumulation)
    perseus = perseus_plugin(args, accelerator)
    model = PipelineGPT(args, accelerator, perseus)
    dp_index = accelerator.process_index // args.pp
    data = SyntheticTokens(args.steps, args.batch_size, args.model.seq_len, args.model.vocab_size, seed=args.seed + dp_index)

    start = model.load_state(args.resume_from) if args.resume_from else 0
    losses: list[float] = []
    step_starts: list[float] = []
    for step in range(start, args.steps):
        step_starts.append(time.perf_counter())
        loss = model.iteration(*data[step])
        if loss is None:
            continue
        losses.append(loss.item())
        if accelerator.process_index == args.pp - 1 and (step % args.log_interval == 0 or step == args.steps - 1):
            print(f"step {step}: loss {losses[-1]:.4f}", flush=True)
    step_starts.append(time.perf_counter())
    if args.save_state:
        model.save_state(args.save_state, args.steps)

    recipe = recipe_summary(args, losses if model.holds_last else None, step_starts)
    summary = {**(perseus.summary() if perseus.runtime else {}), "recipe": recipe}
    if accelerator.is_main_process:
        print_report(summary)
        if args.summary:
            args.summary.parent.mkdir(parents=True, exist_ok=True)
            args.summary.write_text(json.dumps(summary, indent=2))
        if args.plots:
            for path in write_plots(perseus.runtime, args.plots):
                print(f"wrote {path}")
    accelerator.wait_for_everyone()
    if emulated_dir is not None and accelerator.is_local_main_process:
        shutil.rmtree(emulated_dir, ignore_errors=True)
    accelerator.end_training()  # closes Perseus (clocks restored), then destroys the process group


if __name__ == "__main__":
    main()
