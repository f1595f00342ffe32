"""Analytic GPU models: how an instruction's time and power scale with the SM clock.

With ``r = f / f_max``::

    time(f)  = time(f_max) * (compute_fraction / r + 1 - compute_fraction)
    power(f) = static_power + dynamic_power * r * v(r)**2,   v(r) = max(voltage_floor, r)

Only the compute-bound fraction of an instruction stretches with the clock. Dynamic power
follows ``f V^2``; below the voltage floor the voltage stops falling, so the lowest clocks
save little power while taking longer, and cost more energy (they are Pareto-dominated).

A GPU that is not computing (pipeline bubbles, waiting on P2P, idle) draws ``blocking_power``:
the model has no separate idle power, because in training a GPU's non-compute time is spent
blocked on communication, and the planner charges it at that power too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perseus_lightning.core.profile import BACKWARD, FORWARD, Profile


@dataclass(frozen=True)
class GPUModel:
    """Clock-to-time and clock-to-power model of one GPU type (watts, MHz)."""

    name: str
    frequencies: tuple[int, ...]
    static_power: float
    dynamic_power: float
    voltage_floor: float
    compute_fraction: float
    blocking_power: float
    """Power (W) while not computing: blocked on P2P communication, in bubbles, or idle."""

    @property
    def max_frequency(self) -> int:
        return max(self.frequencies)

    def time_factor(self, frequency: int) -> float:
        """Time at ``frequency`` relative to time at the maximum clock (>= 1)."""
        r = frequency / self.max_frequency
        return self.compute_fraction / r + 1.0 - self.compute_fraction

    def power(self, frequency: int) -> float:
        """Power (W) while computing at ``frequency``."""
        r = frequency / self.max_frequency
        return self.static_power + self.dynamic_power * r * max(self.voltage_floor, r) ** 2

    def profile(self, stage_times: Sequence[tuple[float, float]], source: str | None = None) -> Profile:
        """A noise-free profile: ``stage_times[s]`` is stage ``s``'s (forward, backward) time at max clock."""
        rows = [
            (stage, kind, f, t * self.time_factor(f), t * self.time_factor(f) * self.power(f))
            for stage, times in enumerate(stage_times)
            for kind, t in zip((FORWARD, BACKWARD), times)
            for f in self.frequencies
        ]
        return Profile.from_rows(rows, source=source or f"<{self.name} model>")

    @classmethod
    def from_profile(cls, profile: Profile, p2p_power: float, name: str | None = None) -> GPUModel:
        """Fit a model to a measured profile, by least squares on relative errors.

        Time: one ``compute_fraction`` shared by every instruction, each instruction's max-clock
        time free. Power (energy / time of every measured point, pooled over instructions):
        ``static_power``, ``dynamic_power`` (both >= 0) and ``voltage_floor``. The frequencies
        are those measured for every instruction; ``p2p_power`` becomes ``blocking_power``.
        The model has no power cap, so profiles whose top clocks are power-limited fit less well.
        """
        f_max = profile.max_frequency
        series = [(np.asarray(p.frequencies, dtype=float) / f_max, p.time, p.energy / p.time) for _, p in profile.items()]
        static, dynamic, floor = _fit_power(np.concatenate([r for r, _, _ in series]), np.concatenate([w for _, _, w in series]))
        return cls(
            name=name or f"fit of {Path(profile.source).stem}",
            frequencies=profile.frequencies,
            static_power=static,
            dynamic_power=dynamic,
            voltage_floor=floor,
            compute_fraction=_fit_compute_fraction([(r, t) for r, t, _ in series]),
            blocking_power=float(p2p_power),
        )


def _fit_compute_fraction(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> float:
    """The compute fraction minimising relative time errors over ``(clock ratio, time)`` series.

    For a given fraction, each series' max-clock time has a closed-form least-squares value,
    so only the fraction is searched (variable projection).
    """
    from scipy.optimize import minimize_scalar

    def sum_of_squares(fraction: float) -> float:
        total = 0.0
        for r, time in series:
            shape = (fraction / r + 1.0 - fraction) / time  # predicted / measured, per unit max-clock time
            total += float(np.sum((np.sum(shape) / np.sum(shape**2) * shape - 1.0) ** 2))
        return total

    return float(minimize_scalar(sum_of_squares, bounds=(0.0, 1.0), method="bounded", options={"xatol": 1e-9}).x)


def _fit_power(r: np.ndarray, power: np.ndarray) -> tuple[float, float, float]:
    """``(static, dynamic, voltage_floor)`` minimising relative power errors at clock ratios ``r``.

    For a given floor the power is linear in (static, dynamic): a bounded linear least squares.
    The floor is searched on a grid, then refined between the best grid point's neighbours.
    """
    from scipy.optimize import OptimizeResult, lsq_linear, minimize_scalar

    def solve(floor: float) -> OptimizeResult:
        basis = np.column_stack([np.ones_like(r), r * np.maximum(floor, r) ** 2]) / power[:, None]
        return lsq_linear(basis, np.ones_like(power), bounds=(0.0, np.inf))

    grid = np.linspace(0.0, 1.0, 101)
    best = int(np.argmin([solve(floor).cost for floor in grid]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)]
    floor = float(minimize_scalar(lambda v: solve(v).cost, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9}).x)
    static, dynamic = solve(floor).x
    return float(static), float(dynamic), floor


A100_LIKE = GPUModel(
    name="A100-like",
    frequencies=tuple(range(855, 1411, 15)),
    # Fitted to stage 0's forward in the Perseus artifact's GPT-3 A100 SXM profile (Zeus,
    # sosp24_data/emulation/stage_profile): 475 W at 1410 MHz, 236 W at 870 MHz, time x1.52.
    static_power=109.0,
    dynamic_power=366.0,
    voltage_floor=0.75,
    compute_fraction=0.84,
    # Measured A100 blocking power (Perseus, SOSP '24).
    blocking_power=83.64,
)

H100_LIKE = GPUModel(
    name="H100-like",
    # Cited: NVIDIA H100 SXM5 (H100 datasheet; Hopper architecture whitepaper): max boost SM clock
    # 1980 MHz, max TDP 700 W. Assumed: clocks lockable from 1200 MHz (the A100 model's lowest/highest
    # ratio, 855/1410 = 0.61) in NVML's 15 MHz steps.
    frequencies=tuple(range(1200, 1981, 15)),
    # Assumed, not measured: a compute-heavy stage draws the full 700 W at max clock, split like the
    # A100 fit (109 / 475 W static), with the same relative voltage floor.
    static_power=161.0,
    dynamic_power=539.0,
    voltage_floor=0.75,
    # Assumed: below the A100's 0.84, because the H100 has ~1.9x the A100's BF16 FLOPs per byte of HBM
    # bandwidth (989 TFLOPS / 3.35 TB/s vs 312 TFLOPS / 2.04 TB/s), so more of a stage is memory-bound.
    compute_fraction=0.80,
    # Assumed: the A100's measured 83.64 W scaled by the static-power ratio (161 / 109).
    blocking_power=123.5,
)


def example_profile() -> Profile:
    """The built-in example pipeline: 4 GPT stages on A100-like GPUs.

    Stage 0 also holds the embedding and stage 3 the LM head, so the stages are imbalanced
    the way real partitions are.
    """
    return A100_LIKE.profile(
        [(0.055, 0.110), (0.050, 0.100), (0.050, 0.100), (0.062, 0.121)], source="<built-in example: 4-stage GPT, A100-like>"
    )
