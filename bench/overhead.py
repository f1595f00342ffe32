"""Benchmark: what PerseusCallback costs training when it only observes, and per instruction.

Run: .venv/bin/python bench/overhead.py [--repeats 4] [--steps 30] [--check]

(a) Step time of the CPU GPT recipe (``recipes/gpt_lightning.py``: 2 processes, ``--pp 2``,
torchrun, gloo, emulated GPUs) without the callback (``--no-perseus``) and with it in observe mode
(``--perseus-config`` with ``mode: observe``), ``--repeats`` runs of each, interleaved in the same
process as A B, B A, A B, ... so that machine drift hits both alike. The step times are the
recipe's ``iteration_times_s`` (one training_step start to the next, so they include the
callback's batch hooks and its per-iteration all-gather), without each run's first ``--skip``
steps (compilation, caches, the runtime's warm-up and baseline phases), pooled over the runs.
Ratio = median with the callback / median without; target <= 1.02. The 95 % interval resamples
the pooled steps (bootstrap; steps of one run are not independent, so it is a little narrow). The
caption adds each run pair's ratio and the ratio of the 10th percentiles: other jobs on the machine
only add time, so the fast steps are the least disturbed. The load average is printed with them.
With ``--check`` the exit status is 1 when the target is missed.

(b) Per-instruction hook cost, in this process: a fake pipeline stage (``stage_index`` and the three
``*_one_chunk`` methods with torch 2.13's signatures, bodies that return at once), one stage of 4
microbatches (F0-F3, B0-B3 per iteration), each call timed with ``perf_counter_ns``. Rows are
interleaved over ``--rounds`` rounds of ``--iterations`` iterations each. Median and p99 per call,
and the median added to the bare call; the table's caption says what each row includes. The last
line multiplies the observe-mode cost by the instructions of one recipe step.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.planner import Frontier, FrontierPlan
from perseus_lightning.core.schedules import from_actions
from perseus_lightning.gpu.device import GPUDevice
from perseus_lightning.gpu.emulated import DEFAULT_UPDATE_PERIOD, EmulatedGPU
from perseus_lightning.integrations.pipelining import StageInstrumentation
from perseus_lightning.runtime.config import PerseusConfig
from perseus_lightning.runtime.runtime import STATE_VERSION, PerseusRuntime

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "gpt_lightning.py"
TARGET_RATIO = 1.02
MICROBATCHES = 4
CLOCKS = (1410, 1230)


# ------------------------------------------------------------------ (a) step time
def run_recipe(observe: bool, args: argparse.Namespace, workdir: Path, tag: str) -> tuple[list[float], dict[str, Any], float]:
    """One torchrun job of the recipe: its step times (s), its summary, its wall time (s)."""
    summary_path = workdir / f"{tag}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(RECIPE),
               "--pp", "2", "--schedule", args.schedule, "--microbatches", str(MICROBATCHES), "--steps", str(args.steps),
               "--log-interval", str(10 * args.steps), "--summary", str(summary_path)]
    command += ["--perseus-config", str(workdir / "observe.yaml")] if observe else ["--no-perseus"]
    env = {**os.environ, "PERSEUS_GPU_BACKEND": "emulated"}
    env.pop("PERSEUS_EMULATED_GPU_DIR", None)  # each job gets its own emulated GPUs
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0 or not summary_path.exists():
        sys.exit(f"recipe run failed ({' '.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    summary = json.loads(summary_path.read_text())
    return summary["recipe"]["iteration_times_s"], summary, wall


def step_time_table(args: argparse.Namespace, console: Console) -> tuple[Table, bool, float]:
    """Table (a), whether the target is met, and the baseline's median step time (s)."""
    load_before = os.getloadavg()[0]
    steps: dict[bool, list[np.ndarray]] = {False: [], True: []}
    walls: dict[bool, list[float]] = {False: [], True: []}
    phases: set[str] = set()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        (workdir / "observe.yaml").write_text("mode: observe\ngpu_backend: emulated\ncache_dir: null\n")
        for repeat in range(args.repeats):
            for observe in ((False, True) if repeat % 2 == 0 else (True, False)):
                times, summary, wall = run_recipe(observe, args, workdir, f"{repeat}-{int(observe)}")
                steps[observe].append(np.asarray(times[args.skip:]))
                walls[observe].append(wall)
                if observe:
                    phases.add(f"{summary.get('mode')}/{summary.get('phase')}")
                console.print(f"  run {repeat + 1}/{args.repeats} {'observe' if observe else 'no callback'}: "
                              f"median step {1e3 * np.median(times[args.skip:]):.1f} ms ({wall:.0f} s wall)")
    pooled = {k: np.concatenate(v) for k, v in steps.items()}
    base, observed = float(np.median(pooled[False])), float(np.median(pooled[True]))
    ratio = observed / base
    rng = np.random.default_rng(0)
    boot = [np.median(rng.choice(pooled[True], pooled[True].size)) / np.median(rng.choice(pooled[False], pooled[False].size))
            for _ in range(2000)]
    low, high = np.percentile(boot, [2.5, 97.5])
    pair = [float(np.median(o) / np.median(b)) for b, o in zip(steps[False], steps[True])]
    met = ratio <= TARGET_RATIO

    table = Table(title=f"(a) GPT recipe step time, 2 processes (--pp 2, {args.schedule}, {MICROBATCHES} microbatches), "
                        f"emulated GPUs, {args.repeats} runs each of {args.steps} steps, first {args.skip} skipped")
    for column in ("variant", "steps", "median ms", "p10 ms", "p90 ms", "per-run medians ms", "ratio", "mean wall s"):
        table.add_column(column, justify="right")
    for observe, name in ((False, "no callback (--no-perseus)"), (True, "callback, mode: observe")):
        t = 1e3 * pooled[observe]
        table.add_row(name, str(t.size), f"{np.median(t):.1f}", f"{np.percentile(t, 10):.1f}", f"{np.percentile(t, 90):.1f}",
                      " ".join(f"{1e3 * np.median(s):.0f}" for s in steps[observe]),
                      f"{np.median(t) / (1e3 * base):.3f}", f"{np.mean(walls[observe]):.1f}")
    p10 = np.percentile(pooled[True], 10) / np.percentile(pooled[False], 10)
    table.caption = (f"observe / none = {ratio:.3f} (bootstrap 95 %: {low:.3f}-{high:.3f}); target <= {TARGET_RATIO}: "
                     f"{'met' if met else 'NOT MET'}. Per run pair: {' '.join(f'{r:.3f}' for r in pair)} (median "
                     f"{np.median(pair):.3f}); p10 / p10 = {p10:.3f} (other load on the machine only adds time). "
                     f"Callback ended in {', '.join(sorted(phases))}. Load average (1 min) before / after: "
                     f"{load_before:.1f} / {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.")
    return table, met, base


# ------------------------------------------------------- (b) per-instruction hooks
class FakeStage:
    """A ``PipelineStage`` look-alike: ``stage_index`` and the three ``*_one_chunk`` methods, doing nothing."""

    stage_index = 0

    def forward_one_chunk(self, fwd_chunk_id: int, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
                          save_forward_output: bool = True) -> Any:
        return args

    def backward_one_chunk(self, bwd_chunk_id: int, loss: Any = None, full_backward: bool = True,
                           last_backward: bool = False) -> None:
        return None

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        return None


class FastGPU(GPUDevice):
    """A GPU whose calls cost nothing: ``computing()`` is the base class's no-op (as on NVML)."""

    name, uuid = "fast fake GPU", "GPU-fake"

    def __init__(self, index: int, observe_only: bool) -> None:
        self.index, self._observe_only, self._clock = index, observe_only, None

    @property
    def observe_only(self) -> bool:
        return self._observe_only

    def supported_clocks(self) -> tuple[int, ...]:
        return tuple(sorted(A100_LIKE.frequencies, reverse=True))

    def locked_clock(self) -> int | None:
        return self._clock

    def lock_clock(self, mhz: int) -> None:
        self._clock = mhz

    def reset_clock(self) -> None:
        self._clock = None

    def energy_j(self) -> float:
        return 100.0 * time.perf_counter()

    def power_w(self) -> float:
        return 100.0


def order() -> list[tuple[str, tuple[Any, ...]]]:
    """One iteration of the one-stage pipeline: the method and arguments of each call."""
    return ([("forward_one_chunk", (mb, ())) for mb in range(MICROBATCHES)]
            + [("backward_one_chunk", (mb,)) for mb in range(MICROBATCHES)])


def restored_state(new_clock_each: bool) -> dict[str, Any]:
    """A runtime state with a frontier for F0-F3, B0-B3 whose plan alternates two clocks (or keeps one)."""
    dag = InstructionDAG.from_schedule(from_actions([[f"0F{m}" for m in range(MICROBATCHES)] +
                                                     [f"0B{m}" for m in range(MICROBATCHES)]], name="bench"))
    frequencies = [0] * dag.num_nodes
    for position, node in enumerate(dag.rank_nodes(0)):
        frequencies[node] = CLOCKS[position % 2] if new_clock_each else CLOCKS[0]
    plan = FrontierPlan(0.01, 1.0, FrequencyPlan(tuple(frequencies)))
    frontier = Frontier(dag, A100_LIKE.blocking_power, (0.01, 1.0), [plan])
    measured = {"iteration_time_s": 0.01, "energy_j": 1.0}
    return {"version": STATE_VERSION, "baseline": measured, "deployed": measured, "frontier": frontier.to_dict(),
            "profiling_iterations": 0, "straggler_episodes": [], "reference_time": [1.0]}


class Setup:
    """One row of table (b): a stage, optionally instrumented, optionally driving a runtime."""

    def __init__(self, name: str, instrument: bool, runtime: PerseusRuntime | None = None, phase: str = "") -> None:
        self.name, self.runtime, self.stage = name, runtime, FakeStage()
        self.per_call: list[np.ndarray] = []
        self.per_iteration: list[np.ndarray] = []
        if instrument:
            on_begin = runtime.instruction_begin if runtime else None
            on_end = runtime.instruction_end if runtime else None
            self.instrumentation: StageInstrumentation | None = StageInstrumentation(self.stage, on_begin, on_end)
        else:
            self.instrumentation = None
        if runtime is not None:
            runtime.start()
            for _ in range(4):  # through warm-up (and baseline) into the phase measured
                self.iterate(record=False)
            if runtime.phase != phase:
                sys.exit(f"{name}: the runtime is in phase {runtime.phase!r}, expected {phase!r}")

    def iterate(self, record: bool = True) -> None:
        calls = [(getattr(self.stage, method), call_args) for method, call_args in order()]
        timer = time.perf_counter_ns
        elapsed = np.empty(len(calls))
        begin = timer()
        if self.runtime is not None:
            self.runtime.iteration_begin()
        hooks = timer() - begin
        for i, (method, call_args) in enumerate(calls):
            start = timer()
            method(*call_args)
            elapsed[i] = timer() - start
        begin = timer()
        if self.runtime is not None:
            self.runtime.iteration_end()
        hooks += timer() - begin
        if self.instrumentation is not None:
            self.instrumentation.executed.clear()
        if record:
            self.per_call.append(elapsed / 1e3)
            self.per_iteration.append(np.array([hooks / 1e3]))

    def close(self) -> None:
        if self.instrumentation is not None:
            self.instrumentation.remove()
        if self.runtime is not None:
            self.runtime.close()


def sleep_zero_us(calls: int = 2000) -> float:
    """Median wall time of ``time.sleep(0)`` (µs): what the emulator's stretch costs when there is nothing to stretch."""
    elapsed = np.empty(calls)
    for i in range(calls):
        start = time.perf_counter_ns()
        time.sleep(0)
        elapsed[i] = time.perf_counter_ns() - start
    return float(np.median(elapsed)) / 1e3


def publish_us(state_dir: str, calls: int = 200) -> float:
    """Median wall time (µs) of the emulated GPU publishing its counter to its state file (flock, JSON,
    ``os.replace``), which the computing process does once per counter update, on the training thread."""
    gpu = EmulatedGPU(9, state_dir=state_dir)
    elapsed = np.empty(calls)
    for i in range(calls):
        start = time.perf_counter_ns()
        gpu._update_state(energy_j=float(i), updated_at=time.time())  # the write _sync_counter makes
        elapsed[i] = time.perf_counter_ns() - start
        time.sleep(0.002)
    return float(np.median(elapsed)) / 1e3


def hook_cost_table(args: argparse.Namespace, state_dir: str) -> tuple[Table, dict[str, float]]:
    """Table (b), and the added µs per instruction of each row."""
    observe = PerseusConfig.from_mapping({"mode": "observe", "cache_dir": None, "warmup_iterations": 1,
                                          "baseline_iterations": 1}, source="bench")
    apply = PerseusConfig.from_mapping({"mode": "apply", "cache_dir": None, "warmup_iterations": 1}, source="bench")

    def deployed(new_clock_each: bool, device: GPUDevice) -> PerseusRuntime:
        runtime = PerseusRuntime(apply, device=device)
        runtime.load_state_dict(restored_state(new_clock_each))
        return runtime

    makers: list[tuple[str, Callable[[], Setup]]] = [
        ("bare method call (baseline)", lambda: Setup("bare", instrument=False)),
        ("StageInstrumentation, no callbacks", lambda: Setup("wrapper", instrument=True)),
        ("+ runtime, observe, no-op computing() (NVML-like)",
         lambda: Setup("observe", True, PerseusRuntime(observe, device=FastGPU(0, observe_only=True)), "monitor")),
        ("+ runtime, observe, emulated GPU (CPU recipe)",
         lambda: Setup("observe emulated", True, PerseusRuntime(observe, device=EmulatedGPU(1, state_dir=state_dir)),
                       "monitor")),
        ("+ runtime, deployed, fast GPU, same clock throughout",
         lambda: Setup("deployed same", True, deployed(False, FastGPU(2, observe_only=False)), "monitor")),
        ("+ runtime, deployed, fast GPU, new clock each instruction",
         lambda: Setup("deployed new", True, deployed(True, FastGPU(3, observe_only=False)), "monitor")),
        ("+ runtime, deployed, emulated GPU, new clock each instruction",
         lambda: Setup("deployed emulated", True, deployed(True, EmulatedGPU(4, state_dir=state_dir)), "monitor")),
    ]
    setups = [(name, make()) for name, make in makers]
    try:
        for _ in range(args.rounds):
            for _, setup in setups:
                for _ in range(args.iterations):
                    setup.iterate()
        applied = len(setups[5][1].runtime._setter.events)  # the bench reads the clock log
    finally:
        for _, setup in setups:
            setup.close()

    bare = float(np.median(np.concatenate(setups[0][1].per_call)))
    sleep0 = sleep_zero_us()
    table = Table(title=f"(b) per-instruction hook cost, {args.rounds} x {args.iterations} iterations of "
                        f"{2 * MICROBATCHES} instructions per row, rows interleaved")
    for column in ("row", "median µs", "p99 µs", "added µs (median - bare)", "iteration hooks µs"):
        table.add_column(column, justify="right")
    added: dict[str, float] = {}
    for name, setup in setups:
        calls = np.concatenate(setup.per_call)
        median = float(np.median(calls))
        added[setup.name] = median - bare
        iteration = f"{np.median(np.concatenate(setup.per_iteration)):.1f}" if setup.runtime is not None else "-"
        table.add_row(name, f"{median:.2f}", f"{np.percentile(calls, 99):.2f}", f"{median - bare:.2f}", iteration)
    table.caption = (
        "Each row times one *_one_chunk call on the training thread. Wrapper: StageInstrumentation's bind of the "
        "arguments, the Instruction, the executed list. Runtime rows add instruction_begin/instruction_end in the "
        "phase they end in (observe: monitor, nothing planned; deployed: a restored frontier, monitor phase, "
        "AsyncClockSetter running). Observe with the emulated GPU adds EmulatedGPU.computing(): a stat of its "
        "state file, its mutex, once per 100 ms a state-file write, and time.sleep(extra time at the locked clock), "
        f"0 s at max clock, yet a nanosleep syscall: {sleep0:.0f} µs median here (timer slack). "
        "'New clock each instruction' "
        f"alternates {CLOCKS[0]}/{CLOCKS[1]} MHz, so every instruction wakes the setter's worker thread "
        f"({applied:,} changes applied on the fast GPU). Iteration hooks: iteration_begin + iteration_end with "
        "LocalCollectives, i.e. without the all-gather a multi-process run adds."
    )
    added["observe emulated iteration"] = float(np.median(np.concatenate(setups[3][1].per_iteration)))
    added["publish"] = publish_us(state_dir)
    return table, added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=4, help="recipe runs per variant in (a) (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per recipe run (default: %(default)s)")
    parser.add_argument("--skip", type=int, default=5, help="first steps of each run left out (default: %(default)s)")
    parser.add_argument("--schedule", default="1f1b", choices=("1f1b", "gpipe"), help="(default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds in (b) (default: %(default)s)")
    parser.add_argument("--iterations", type=int, default=400, help="iterations per row and round in (b) (default: %(default)s)")
    parser.add_argument("--skip-recipe", action="store_true", help="only the in-process table (b)")
    parser.add_argument("--check", action="store_true", help=f"exit 1 when the observe/none ratio exceeds {TARGET_RATIO}")
    args = parser.parse_args()
    logging.getLogger("perseus_lightning.gpu.safety").setLevel(logging.ERROR)  # no watchdog for FastGPU: expected
    if args.steps <= args.skip:
        parser.error(f"--steps {args.steps} must exceed --skip {args.skip}")
    console = Console(width=160)

    with tempfile.TemporaryDirectory() as state_dir:
        hooks, added = hook_cost_table(args, state_dir)
    console.print(hooks)
    if args.skip_recipe:
        return
    console.print("(a) recipe runs:")
    table, met, base = step_time_table(args, console)
    console.print(table)
    hooks_us = 2 * MICROBATCHES * added["observe emulated"]
    publishes = base / DEFAULT_UPDATE_PERIOD
    publish_us = publishes * added["publish"]
    total = hooks_us + publish_us + added["observe emulated iteration"]
    console.print(
        f"Observe-mode cost per recipe step and rank, from (b): {2 * MICROBATCHES} instructions x "
        f"{added['observe emulated']:.0f} µs = {hooks_us:.0f} µs; {publishes:.1f} emulated counter publishes x "
        f"{added['publish']:.0f} µs (state-file write, median) = {publish_us:.0f} µs; iteration hooks "
        f"{added['observe emulated iteration']:.0f} µs; total {total:.0f} µs = {100 * total / (1e6 * base):.2f} % of the "
        f"{1e3 * base:.0f} ms step. Not in (b): the all-gather over gloo (and the wait for the other rank) and "
        f"Lightning's log_dict of the metrics, once per step."
    )
    if args.check and not met:
        sys.exit(1)


if __name__ == "__main__":
    main()
