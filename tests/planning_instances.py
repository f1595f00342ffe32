"""Profiles, DAGs and plan measures shared by the planner, relax-and-fix and periodic-LP tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.profile import BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, Profile
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.simulator import earliest_schedule
from perseus_lightning.core.slack import option_durations


def noisy_profile(seed: int, num_stages: int, clocks: Mapping[str, Sequence[int]]) -> Profile:
    """A100-like time and power with 3 % time noise and 10 % energy noise: non-convex, non-monotone energy.

    ``clocks`` maps each instruction kind to its profiled frequencies (MHz, at most 1410).
    """
    rng = np.random.default_rng(seed)
    base_time = {FORWARD: 0.04, BACKWARD: 0.08, BACKWARD_INPUT: 0.04, BACKWARD_WEIGHT: 0.04}
    rows = []
    for stage in range(num_stages):
        for kind, frequencies in clocks.items():
            at_max_clock = base_time[kind] * rng.uniform(0.6, 1.4)
            for f in frequencies:
                time = at_max_clock * A100_LIKE.time_factor(f) * rng.uniform(0.97, 1.03)
                rows.append((stage, kind, f, time, time * A100_LIKE.power(f) * rng.uniform(0.9, 1.1)))
    return Profile.from_rows(rows, source=f"<noisy profile, seed {seed}>")


def dag_of(name: str, num_ranks: int, num_microbatches: int, virtual_stages: int = 1, split: bool = False) -> InstructionDAG:
    return InstructionDAG.from_schedule(build_schedule(name, num_ranks, num_microbatches, virtual_stages, split))


def iteration_time(dag: InstructionDAG, options: list[ClockOptions], choice: np.ndarray) -> float:
    """Iteration time of option indices ``choice``."""
    return float(earliest_schedule(dag, option_durations(options, choice))[1].max())


def total_cost(options: list[ClockOptions], choice: np.ndarray) -> float:
    """Summed effective energy of option indices ``choice``."""
    return float(sum(opt.cost[k] for opt, k in zip(options, choice.tolist())))
