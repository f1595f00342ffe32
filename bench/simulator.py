"""Benchmark: DAG construction and exact simulation scale linearly with the instruction count.

Run: .venv/bin/python bench/simulator.py
Prints, per schedule and size, the wall time of building the DAG and of one simulation, and the
time per instruction relative to the smallest size (a ratio near 1.0 means linear scaling).
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.table import Table

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.simulator import simulate

STAGES = 8
MICROBATCHES = (96, 192, 384, 768)
REPEATS = 3


def best_of(fn, repeats: int = REPEATS) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    profile = A100_LIKE.profile([(0.05, 0.1)] * STAGES)
    table = Table(title=f"DAG build and simulation, {STAGES} stages (best of {REPEATS})")
    # The last two columns: time per instruction relative to the smallest size of that schedule.
    for column in ("schedule", "M", "nodes", "edges", "build ms", "sim ms", "build/instr", "sim/instr"):
        table.add_column(column, justify="right")
    for name, virtual in (("1f1b", 1), ("interleaved-1f1b", 2)):
        reference: tuple[float, float] | None = None
        for m in MICROBATCHES:
            schedule = build_schedule(name, STAGES, m, virtual)
            build = best_of(lambda: InstructionDAG.from_schedule(schedule))
            dag = InstructionDAG.from_schedule(schedule)
            sim = best_of(lambda: simulate(dag, profile, A100_LIKE.blocking_power))
            per = (build / dag.num_nodes, sim / dag.num_nodes)
            reference = reference or per
            table.add_row(name, str(m), str(dag.num_nodes), str(len(dag.edge_sources)), f"{1e3 * build:.1f}",
                          f"{1e3 * sim:.1f}", f"{per[0] / reference[0]:.2f}", f"{per[1] / reference[1]:.2f}")
    Console().print(table)


if __name__ == "__main__":
    main()
