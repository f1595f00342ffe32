"""The command line, GPU set-up and report shared by the GPT recipes (no Lightning, no Accelerate here)."""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from gpt_pipeline import DEFAULT_VIRTUAL_STAGES, SCHEDULES, GPTConfig, check_schedule, split_layers
from rich.console import Console
from rich.table import Table

BACKEND_ENV, EMULATED_DIR_ENV = "PERSEUS_GPU_BACKEND", "PERSEUS_EMULATED_GPU_DIR"


def recipe_parser(description: str | None) -> tuple[argparse.ArgumentParser, argparse._ArgumentGroup]:
    """The recipes' common options; returns the parser and its ``perseus`` group, for each recipe's own."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("parallelism")
    group.add_argument("--pp", type=int, help="pipeline stages, i.e. ranks per pipeline (default: WORLD_SIZE / dp)")
    group.add_argument("--dp", type=int, default=1, help="data-parallel pipelines (default: %(default)s)")
    group.add_argument("--schedule", choices=list(SCHEDULES), default="1f1b",
                       help="pipeline schedule when pp > 1 (default: %(default)s)")
    group.add_argument("--virtual-stages", type=int, help="model stages per rank (default: 2 for interleaved-1f1b)")
    group.add_argument("--microbatches", type=int, default=4, help="microbatches per iteration (default: %(default)s)")
    group = parser.add_argument_group("training")
    group.add_argument("--steps", type=int, default=100, help="iterations, i.e. optimizer steps (default: %(default)s)")
    group.add_argument("--batch-size", type=int, default=8, help="sequences per pipeline iteration (default: %(default)s)")
    group.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="model and data seed (default: %(default)s)")
    group.add_argument("--log-interval", type=int, default=10, help="print the loss every this many steps (default: %(default)s)")
    group = parser.add_argument_group("model (GPT-2, random init)")
    defaults = GPTConfig()
    group.add_argument("--vocab-size", type=int, default=defaults.vocab_size, help="(default: %(default)s)")
    group.add_argument("--seq-len", type=int, default=defaults.seq_len, help="(default: %(default)s)")
    group.add_argument("--n-layer", type=int, help=f"transformer blocks (default: {defaults.n_layer})")
    group.add_argument("--n-embd", type=int, default=defaults.n_embd, help="(default: %(default)s)")
    group.add_argument("--n-head", type=int, default=defaults.n_head, help="(default: %(default)s)")
    group.add_argument("--layers-per-stage", help="blocks of each model stage, e.g. 3,1 (default: as even as possible)")
    perseus = parser.add_argument_group("perseus")
    perseus.add_argument("--straggler-rank", type=int, action="append", default=[], metavar="R",
                         help="emulate a throttled GPU on this rank (repeatable)")
    perseus.add_argument("--straggler-slowdown", type=float, default=1.5, metavar="S",
                         help="their compute slowdown (default: %(default)s)")
    perseus.add_argument("--straggler-steps", type=iteration_window, metavar="A:B",
                         help="straggle during iterations [A, B) (default: all)")
    parser.add_argument("--summary", type=Path, help="write the run summary (JSON) here")
    return parser, perseus


def finish_args(parser: argparse.ArgumentParser, args: argparse.Namespace, launch_hint: str) -> argparse.Namespace:
    """Check the layout against ``WORLD_SIZE`` and the schedule, and split the model into stages."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    args.pp = args.pp or max(world // args.dp, 1)
    if args.pp * args.dp != world:
        parser.error(f"--pp {args.pp} x --dp {args.dp} must equal WORLD_SIZE={world}: {launch_hint.format(n=args.pp * args.dp)}")
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
            args.layers_per_stage = split_layers(args.n_layer or GPTConfig().n_layer, num_stages)
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


def emulation_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Perseus options that throttle the ``--straggler-rank`` GPUs (emulated GPUs only)."""
    if not args.straggler_rank:
        return {}
    window = args.straggler_steps or [0, args.steps]
    return {"emulation": {"straggler_ranks": args.straggler_rank, "straggler_slowdown": args.straggler_slowdown,
                          "straggler_iterations": window}}


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


def print_report(summary: dict[str, Any]) -> None:
    """Baseline vs Perseus iteration time and energy, the plan, straggler episodes, and the recipe's own numbers."""
    recipe, console = summary["recipe"], Console(width=100)
    loss = recipe["loss"]
    facts = Table("", "value", title="GPT pipeline training", show_header=False)
    facts.add_row("loss, first -> last step", f"{loss[0]:.4f} -> {loss[-1]:.4f}" if loss else "-")
    facts.add_row("median iteration time", f"{recipe['median_iteration_time_s'] * 1e3:.1f} ms")
    if "mode" not in summary:
        console.print(facts)
        return
    facts.title += f" with Perseus ({summary['mode']}, phase {summary['phase']})"
    facts.add_row("profiling iterations", str(summary.get("profiling_iterations", 0)))
    plan = summary.get("plan")
    for rank, entries in enumerate(plan["frequencies"] if plan else []):
        clocks = [entry[-1] for entry in entries]  # [kind, (microbatch, (stage,)) MHz]
        facts.add_row(f"pipeline rank {rank} clocks (min / mean / max)",
                      f"{min(clocks):.0f} / {statistics.fmean(clocks):.0f} / {max(clocks):.0f} MHz")
    console.print(facts)

    energy = Table("per iteration, all GPUs", "iteration time", "energy", title="Baseline vs Perseus")
    baseline, deployed = summary.get("baseline"), summary.get("deployed")
    model = {**plan, "energy_j": plan["energy_j"] * recipe["args"]["dp"]} if plan else None  # every pipeline runs the plan
    for name, point in (("baseline (measured)", baseline), ("Perseus (measured)", deployed),
                        ("Perseus plan (model)", model)):
        if point:
            energy.add_row(name, f"{point['iteration_time_s'] * 1e3:.1f} ms", f"{point['energy_j']:.1f} J")
    if baseline and deployed:
        change = 100 * (deployed["iteration_time_s"] / baseline["iteration_time_s"] - 1)
        energy.add_row("change (measured)", f"{change:+.1f} %", f"{-summary['saving_pct']:+.1f} %")
    if summary.get("planned_saving_pct") is not None:
        energy.add_row("change (model)", "+0.0 %", f"{-summary['planned_saving_pct']:+.1f} %")
    if plan:
        energy.caption = ("The model is the plan on the in-situ profile; it leaves out the host's work between "
                          "instructions (optimizer step, gradient sync), which the measurements include.")
    if baseline and deployed and os.environ.get(BACKEND_ENV) == "emulated":
        energy.caption = (energy.caption or "") + (" Emulated GPUs: that work runs on shared CPU cores, so measured "
                                                   "changes move by a few % from run to run.")
    console.print(energy)

    episodes = summary.get("straggler_episodes", [])
    if episodes:
        table = Table("iterations", "straggler", "time / energy per iteration (measured)", "others' saving (model)",
                      title="Straggler episodes: the other pipelines slow down to its pace")
        for episode in episodes:
            measured = (f"{episode['iteration_time_s'] * 1e3:.1f} ms / {episode['energy_j']:.1f} J"
                        if episode.get("energy_j") is not None else "-")
            table.add_row(f"{episode['start_iteration']}-{episode['end_iteration'] or '...'}",
                          f"pipeline {episode['pipeline']}, up to {episode['peak_slowdown']:.2f}x", measured,
                          f"{episode['predicted_saving_pct']:.1f} %" if episode.get("predicted_saving_pct") is not None else "-")
        console.print(table)


def write_plots(runtime: Any, directory: Path) -> list[Path]:
    """The frontier planned from the in-situ profile, and the simulated timeline of its fastest plan."""
    from perseus_lightning.core.simulator import simulate
    from perseus_lightning.plots import plot_frontier, plot_timeline

    if runtime is None or runtime.frontier is None or runtime.profile is None:
        return []
    frontier = runtime.frontier
    directory.mkdir(parents=True, exist_ok=True)
    planned = simulate(frontier.dag, runtime.profile, frontier.p2p_power, frontier.fastest.plan)
    return [
        plot_frontier(frontier, directory / "frontier.png", title="Frontier planned from the in-situ profile"),
        plot_timeline(planned, directory / "timeline.png", title="Deployed plan (simulated on the in-situ profile)"),
    ]
