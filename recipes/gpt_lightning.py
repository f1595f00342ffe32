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
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from gpt_pipeline import (
    DEFAULT_VIRTUAL_STAGES,
    SCHEDULES,
    GPTConfig,
    SyntheticTokens,
    all_reduce_grads,
    build_schedule,
    build_stages,
    causal_lm_loss,
    check_schedule,
    process_groups,
    split_layers,
    stage_indices,
)
from lightning.pytorch.strategies import DDPStrategy
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.data import DataLoader

BACKEND_ENV, EMULATED_DIR_ENV = "PERSEUS_GPU_BACKEND", "PERSEUS_EMULATED_GPU_DIR"
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
    world = int(os.environ.get("WORLD_SIZE", "1"))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("parallelism")
    group.add_argument("--pp", type=int, help="pipeline stages, i.e. ranks per pipeline (default: WORLD_SIZE / dp)")
    group.add_argument("--dp", type=int, default=1, help="data-parallel pipelines (default: %(default)s)")
    group.add_argument(
        "--schedule",
        choices=list(SCHEDULES),
        default="1f1b",
        help="pipeline schedule when pp > 1 (default: %(default)s)",
    )
    group.add_argument("--virtual-stages", type=int, help="model stages per rank (default: 2 for interleaved-1f1b)")
    group.add_argument(
        "--microbatches", type=int, default=4, help="microbatches per pipeline iteration (default: %(default)s)"
    )
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=100, help="pipeline iterations (default: %(default)s)")
    group.add_argument(
        "--batch-size", type=int, default=8, help="sequences per pipeline iteration (default: %(default)s)"
    )
    group.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="model and data seed (default: %(default)s)")
    group.add_argument(
        "--log-interval", type=int, default=10, help="print the loss every this many steps (default: %(default)s)"
    )
    group = parser.add_argument_group("model (GPT-2, random init)")
    defaults = GPTConfig()
    group.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="(default: %(default)s)")
    group.add_argument("--seq-len", type=int, default=defaults.seq_len, help="(default: %(default)s)")
    group.add_argument("--n-layer", type=int, help=f"transformer blocks (default: {defaults.n_layer})")
    group.add_argument("--n-embd", type=int, default=defaults.n_embd, help="(default: %(default)s)")
    group.add_argument("--n-head", type=int, default=defaults.n_head, help="(default: %(default)s)")
    group.add_argument("--layers-per-stage", help="blocks of each model stage, e.g. 3,1 (default: as even as possible)")
    group = parser.add_argument_group("perseus")
    group.add_argument("--perseus-config", type=Path, help="PerseusCallback options (YAML)")
    group.add_argument("--no-perseus", action="store_true", help="train without the callback (baselines, overhead)")
    group.add_argument(
        "--straggler-rank",
        type=int,
        action="append",
        default=[],
        metavar="R",
        help="emulate a throttled GPU on this rank (repeatable)",
    )
    group.add_argument(
        "--straggler-slowdown",
        type=float,
        default=1.5,
        metavar="S",
        help="their compute slowdown (default: %(default)s)",
    )
    group.add_argument(
        "--straggler-steps",
        type=iteration_window,
        metavar="A:B",
        help="straggle during iterations [A, B) (default: all)",
    )
    parser.add_argument("--summary", type=Path, help="write the run summary (JSON) here")
    parser.add_argument("--plots", type=Path, help="write the frontier and the deployed plan's timeline (PNG) here")
    args = parser.parse_args()

    args.pp = args.pp or max(world // args.dp, 1)
    if args.pp * args.dp != world:
        parser.error(
            f"--pp {args.pp} x --dp {args.dp} must equal WORLD_SIZE={world}: "
            f"launch with torchrun --nproc-per-node {args.pp * args.dp}"
        )
    if args.no_perseus and args.straggler_rank:
        parser.error("the Perseus callback emulates stragglers; for a baseline, set mode: observe in --perseus-config")
    args.virtual_stages = args.virtual_stages or DEFAULT_VIRTUAL_STAGES.get(args.schedule, 1)
    if args.pp > 1:
        try:
            check_schedule(args.schedule, args.pp, args.virtual_stages, args.microbatches)
        except ValueError as error:
            parser.error(str(error))
        if args.batch_size % args.microbatches:
            parser.error(f"--batch-size {args.batch_size} must be a multiple of --microbatches {args.microbatches}")
    num_stages = args.pp * args.virtual_stages if args.pp > 1 else 1
    if args.layers_per_stage:
        args.layers_per_stage = [int(n) for n in args.layers_per_stage.split(",")]
        n_layer = args.n_layer or sum(args.layers_per_stage)
        if len(args.layers_per_stage) != num_stages or sum(args.layers_per_stage) != n_layer:
            parser.error(f"--layers-per-stage needs {num_stages} counts (that sum to --n-layer, when given)")
    else:
        try:
            args.layers_per_stage = split_layers(args.n_layer or defaults.n_layer, num_stages)
        except ValueError as error:
            parser.error(str(error))
    args.n_layer = sum(args.layers_per_stage)
    args.model = GPTConfig(args.vocab_size, args.seq_len, args.n_layer, args.n_embd, args.n_head)
    return args


def iteration_window(text: str) -> list[int]:
    """Parse ``A:B`` into ``[A, B]``."""
    try:
        start, stop = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A:B (two iteration numbers), got {text!r}") from None
    return [start, stop]


def configure_gpu_backend() -> Path | None:
    """Without CUDA, drive emulated GPUs: each rank the one of its local rank.

    Unless ``$PERSEUS_EMULATED_GPU_DIR`` is set, they live in a directory of this job's own, which
    all ranks of a node derive from the rendezvous; it is returned, to remove at the end.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault(BACKEND_ENV, "emulated")
    if os.environ.get(BACKEND_ENV) != "emulated" or EMULATED_DIR_ENV in os.environ:
        return None
    job = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'local')}-{os.environ.get('MASTER_PORT', os.getpid())}"
    path = Path(tempfile.gettempdir()) / f"perseus-emulated-gpus-{os.getuid()}-{job}"
    os.environ[EMULATED_DIR_ENV] = str(path)
    return path


def perseus_callback(args: argparse.Namespace) -> pl.Callback | None:
    """The Perseus callback configured from the command line, or ``None`` with ``--no-perseus``."""
    if args.no_perseus:
        return None
    from perseus_lightning.integrations.lightning import PerseusCallback

    overrides: dict[str, Any] = {}
    if args.straggler_rank:
        overrides["emulation"] = {
            "straggler_ranks": args.straggler_rank,
            "straggler_slowdown": args.straggler_slowdown,
            "straggler_iterations": args.straggler_steps or [0, args.steps],
        }
    if args.perseus_config:
        return PerseusCallback.from_config(args.perseus_config, **overrides)
    return PerseusCallback(**overrides)


def print_report(summary: dict[str, Any]) -> None:
    """Baseline vs deployed iteration time and energy, the plan's clocks, and the recipe's own numbers."""
    recipe, perseus = summary["recipe"], "mode" in summary
    title = "GPT pipeline training"
    if perseus:
        title += f" with Perseus ({summary['mode']}, phase {summary['phase']})"
    table = Table("", "value", title=title)
    loss = recipe["loss"]
    table.add_row("loss, first -> last step", f"{loss[0]:.4f} -> {loss[-1]:.4f}" if loss else "-")
    table.add_row("median iteration time (recipe)", f"{recipe['median_iteration_time_s'] * 1e3:.1f} ms")
    if perseus:
        baseline, deployed, plan = summary.get("baseline"), summary.get("deployed"), summary.get("plan")
        for name, point in (("baseline", baseline), ("deployed", deployed), ("plan (predicted)", plan)):
            if point:
                time_energy = f"{point['iteration_time_s'] * 1e3:.1f} ms / {point['energy_j']:.1f} J"
                table.add_row(f"{name}: iteration time / energy", time_energy)
        if baseline and deployed:
            change = 100 * (deployed["iteration_time_s"] / baseline["iteration_time_s"] - 1)
            table.add_row("iteration time change", f"{change:+.1f} %")
        if summary.get("saving_pct") is not None:
            table.add_row("energy saving per iteration", f"{summary['saving_pct']:.1f} %")
        table.add_row("profiling iterations", str(summary.get("profiling_iterations", 0)))
        for rank, entries in enumerate(plan["frequencies"] if plan else []):
            clocks = [entry[-1] for entry in entries]  # [kind, (microbatch, (stage,)) MHz]
            mhz = f"{min(clocks):.0f} / {statistics.fmean(clocks):.0f} / {max(clocks):.0f} MHz"
            table.add_row(f"pipeline rank {rank}: planned clock min / mean / max", mhz)
        for episode in summary.get("straggler_episodes", []):
            table.add_row(
                f"straggler episode, iterations {episode['start_iteration']}-{episode['end_iteration'] or '...'}",
                f"pipeline {episode['pipeline']} up to {episode['peak_slowdown']:.2f}x slower",
            )
            if episode.get("energy_j") is not None:
                table.add_row("  during it: iteration time / energy",
                              f"{episode['iteration_time_s'] * 1e3:.1f} ms / {episode['energy_j']:.1f} J")
            table.add_row("  others' saving vs waiting at full speed (model)", f"{episode['predicted_saving_pct']:.1f} %")
    table.columns[1].justify = "right"
    Console().print(table)


def write_plots(callback: Any, directory: Path) -> list[Path]:
    """The frontier planned from the in-situ profile, and the simulated timeline of the fastest plan."""
    from perseus_lightning.core.simulator import simulate
    from perseus_lightning.plots import plot_frontier, plot_timeline

    runtime = callback.runtime if callback else None
    if runtime is None or runtime.frontier is None or runtime.profile is None:
        return []
    frontier = runtime.frontier
    directory.mkdir(parents=True, exist_ok=True)
    planned = simulate(frontier.dag, runtime.profile, frontier.p2p_power, frontier.fastest.plan)
    return [
        plot_frontier(frontier, directory / "frontier.png", title="Frontier planned from the in-situ profile"),
        plot_timeline(planned, directory / "timeline.png", title="Deployed plan (simulated on the in-situ profile)"),
    ]


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
            for path in write_plots(callback, args.plots):
                print(f"wrote {path}")
    dist.barrier()
    if emulated_dir is not None and trainer.local_rank == 0:
        shutil.rmtree(emulated_dir, ignore_errors=True)
    dist.destroy_process_group()  # without it, ~1 in 30 gloo jobs aborts at exit


if __name__ == "__main__":
    main()
