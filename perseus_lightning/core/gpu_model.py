"""Analytic GPU models: how an instruction's time and power scale with the SM clock.

With ``r = f / f_max``::

    time(f)  = time(f_max) * (compute_fraction / r + 1 - compute_fraction)
    power(f) = static_power + dynamic_power * r * v(r)**2,   v(r) = max(voltage_floor, r)

Only the compute-bound fraction of an instruction stretches with the clock. Dynamic power
follows ``f V^2``; below the voltage floor the voltage stops falling, so the lowest clocks
save little power while taking longer, and cost more energy (they are Pareto-dominated).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

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


def example_profile() -> Profile:
    """The built-in example pipeline: 4 GPT stages on A100-like GPUs.

    Stage 0 also holds the embedding and stage 3 the LM head, so the stages are imbalanced
    the way real partitions are.
    """
    return A100_LIKE.profile(
        [(0.055, 0.110), (0.050, 0.100), (0.050, 0.100), (0.062, 0.121)], source="<built-in example: 4-stage GPT, A100-like>"
    )
