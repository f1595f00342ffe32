"""Clock options of each instruction: its Pareto-optimal (time, effective energy) choices.

A plan only ever needs these: any other clock is no faster and no cheaper than one of them.
Effective energy is ``E - P_block * t``, what running costs on top of idling at the blocking
power; minimising its sum at a fixed iteration time minimises the iteration's total energy.
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.profile import InstructionProfile, Profile


@dataclass(frozen=True)
class ClockOptions:
    """Pareto-optimal clocks of one instruction, fastest first (time rising, cost falling)."""

    frequencies: np.ndarray
    time: np.ndarray
    cost: np.ndarray
    """Effective energy ``E - P_block * t`` (J)."""

    @classmethod
    def from_profile(cls, profile: InstructionProfile, p2p_power: float) -> ClockOptions:
        keep = [profile.index(f) for f in profile.pareto_frequencies(p2p_power)]
        order = np.argsort(profile.time[keep], kind="stable")
        idx = np.asarray(keep)[order]
        return cls(
            np.asarray(profile.frequencies)[idx],
            profile.time[idx].copy(),
            profile.energy[idx] - p2p_power * profile.time[idx],
        )

    def cheapest_within(self, duration: float) -> int:
        """Index of the cheapest option that takes at most ``duration`` (the fastest if none fits)."""
        return max(bisect_right(self.time_list, duration) - 1, 0)

    @cached_property
    def time_list(self) -> list[float]:
        """:attr:`time` as Python floats, for per-node loops (numpy scalars are slow there)."""
        return self.time.tolist()

    @cached_property
    def cost_list(self) -> list[float]:
        """:attr:`cost` as Python floats."""
        return self.cost.tolist()

    @cached_property
    def hull_time_list(self) -> list[float]:
        """Times of the :attr:`hull` vertices as Python floats, fastest first."""
        return self.time[self.hull].tolist()

    def lower_hull(self) -> tuple[np.ndarray, np.ndarray]:
        """Vertices ``(time, cost)`` of the lower convex hull, fastest first."""
        return self.time[self.hull], self.cost[self.hull]

    @cached_property
    def hull(self) -> list[int]:
        """Option indices of the lower hull's vertices, fastest first."""
        return lower_hull_indices(self.time, self.cost)


def lower_hull_indices(time: np.ndarray, cost: np.ndarray) -> list[int]:
    """Indices of the vertices of the lower convex hull of points ``(time, cost)`` sorted by time
    (rising), left to right."""
    hull: list[int] = []
    for i in range(len(time)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (time[b] - time[a]) * (cost[i] - cost[a]) - (cost[b] - cost[a]) * (time[i] - time[a]) > 0:
                break
            hull.pop()
        hull.append(i)
    return hull


def clock_options(dag: InstructionDAG, stage_profile: Profile, p2p_power: float) -> list[ClockOptions]:
    """Options of every node of ``dag``; nodes of the same stage and kind share one object."""
    shared: dict[tuple[int, str], ClockOptions] = {}
    result = []
    for ins in dag.instructions:
        key = (ins.stage, ins.kind)
        if key not in shared:
            shared[key] = ClockOptions.from_profile(stage_profile.get(*key), p2p_power)
        result.append(shared[key])
    return result


def frequency_plan(options: list[ClockOptions], choice: np.ndarray) -> FrequencyPlan:
    """The plan (one clock in MHz per node) of option indices ``choice``."""
    return FrequencyPlan(tuple(int(opt.frequencies[k]) for opt, k in zip(options, choice.tolist())))
