"""In-situ clock profiling: which clocks to measure during training, and the profile they give.

Each rank runs whole training iterations with its GPU locked at one clock, another component
measures every instruction kind's typical (median) time and energy there, and
:class:`ClockProfiler` turns these sparse measurements into a full
:class:`~perseus_lightning.core.profile.Profile`.

Which clocks (``next_clock``):

- The maximum clock first: every plan's baseline, and the top of every instruction's options.
- Then downwards, each next clock spread evenly over what is left of the range with what is left
  of the budget (``max_clocks``, a quarter of the supported clocks by default). Clocks are re-planned
  after every measurement, so they stay even if the caller measured another clock in between.
  Nothing tells in advance where a GPU's curves bend (voltage floor, power cap), so even spacing
  bounds the interpolation error everywhere. On the measured GPT-3 profiles, measuring the
  clocks a hindsight search picks instead would gain only ~0.2 percentage points of saving.
- Descending lets the sweep stop early: once the blocking power is known, effective energy
  ``E - P_block * t`` of one iteration's worth of a stage's instructions (kinds weighted by how many
  ran) falls as the clock drops towards its minimum, then rises. When it has risen by more than
  ``RISE_MARGIN`` for ``EARLY_STOP_RISES`` consecutive clocks on every stage, the lower clocks
  are slower *and* costlier (Pareto-dominated) and are not measured. Raw energy has its minimum
  at a higher clock than effective energy, so without the blocking power the sweep never stops
  early.

Which curves (``profile``), per (stage, kind), over the supported clocks from the maximum down to
the lowest clock that every instruction was measured at (nothing is extrapolated; lower clocks are
either unmeasured or past the early-stop minimum):

- Time is non-increasing in the clock: measured times are made monotone by isotonic regression
  (noise only), then interpolated piecewise-linearly in ``1 / f``. Each segment is then exactly
  ``t = a + b / f`` (a memory-bound part plus a part that scales with the clock), the time model of
  :mod:`perseus_lightning.core.gpu_model`, yet the curve follows a real GPU's bends (a power-capped
  top, where the clock no longer speeds anything up) that one global ``a + b / f`` misses.
- Power is fitted with ``static + dynamic * r * max(floor, r)**2`` (``r = f / f_max``) by bounded
  least squares on relative errors. The fit is used only where it explains every measured point
  to within ``FIT_TOLERANCE`` of its effective energy (the quantity the planner trades off, so the
  tolerance needs the blocking power) and at least ``MIN_FIT_POINTS`` points were measured; it then
  smooths measurement noise. Otherwise (the measured GPT-3 profiles miss the model by up to 5-8 %:
  power caps, a noisy top) power is interpolated piecewise-linearly through the measurements, within
  ~0.7 % of the model itself on nine clocks spread over A100_LIKE's range. Energy is time times power.
  (Global time and power models fitted through nine clocks of the measured A100 profile, instead of
  honouring the measured points, lose 2.7 of its 16 percentage points of saving.)

Measured on the GPT-3 175B A100 profile (8 stages x 12 microbatches, ``bench/profiling.py``): 9 of 38
clocks give a zero-slowdown plan within ~0.3 percentage points of the saving the full profile gives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import isotonic_regression, least_squares

from perseus_lightning.core.errors import ProfileError
from perseus_lightning.core.profile import INSTRUCTION_KINDS, Profile

EARLY_STOP_RISES = 2
"""Consecutive clocks whose effective energy must rise (on every stage) to stop the sweep early."""
RISE_MARGIN = 0.005
"""A rise counts when it exceeds this fraction of the effective energy (measurement noise is below)."""
FIT_TOLERANCE = 0.01
"""The power fit is used only if it misses no measured point by more than this fraction of its effective energy."""
MIN_FIT_POINTS = 5
"""Fewest measured clocks for the three-parameter power fit (two degrees of freedom to judge it)."""
_FLOOR_STARTS = (0.5, 0.75, 0.95)
"""Initial voltage floors of the power fit (the floor has no gradient where it is below every clock ratio)."""

MeasurementKey = tuple[int, str]
"""``(stage, kind)``."""


@dataclass(frozen=True)
class KindMeasurement:
    """One instruction kind of one stage, measured at one clock."""

    time_s: float
    """Typical (median) duration of one instruction (s)."""
    energy_j: float
    """Energy of one instruction of that duration (J)."""
    count: int
    """How many instructions were measured."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.time_s) and self.time_s > 0):
            raise ProfileError(f"measured time is {self.time_s} s. Fix: give the typical duration of the instructions, > 0.")
        if not (math.isfinite(self.energy_j) and self.energy_j >= 0):
            raise ProfileError(
                f"measured energy is {self.energy_j} J. Fix: measure longer, so that the energy counter updates "
                f"while these instructions run (a finite energy >= 0 is needed)."
            )
        if self.count < 1:
            raise ProfileError(f"measured count is {self.count}. Fix: record a kind only after at least one instruction ran.")


class ClockProfiler:
    """Chooses the clocks to measure during training and builds a profile from the measurements.

    ``supported_clocks`` are the GPU's lockable SM clocks (MHz). At most ``max_clocks`` distinct
    clocks are measured (default: a quarter of the supported ones, at least 3). ``p2p_power`` is
    the blocking power (W), needed to stop early and to judge fits; see :meth:`set_p2p_power`.
    """

    def __init__(self, supported_clocks: Sequence[int], max_clocks: int | None = None, p2p_power: float | None = None) -> None:
        clocks = sorted({int(c) for c in supported_clocks}, reverse=True)
        if not clocks or clocks[-1] <= 0:
            raise ProfileError(
                f"supported clocks {list(supported_clocks)!r} are empty or not positive. "
                f"Fix: pass the GPU's supported SM clocks in MHz (GPUDevice.supported_clocks())."
            )
        budget = max(len(clocks) // 4, 3) if max_clocks is None else int(max_clocks)
        if budget < 1:
            raise ProfileError(f"max_clocks is {max_clocks}. Fix: allow at least 1 clock (the maximum), or None for the default.")
        self._clocks = tuple(clocks)
        self._max_clocks = min(budget, len(clocks))
        self._p2p_power: float | None = None
        if p2p_power is not None:
            self.set_p2p_power(p2p_power)
        self._measured: dict[int, dict[MeasurementKey, KindMeasurement]] = {}

    # ------------------------------------------------------------------ sweep
    @property
    def supported_clocks(self) -> tuple[int, ...]:
        """The supported clocks, highest first."""
        return self._clocks

    @property
    def max_clocks(self) -> int:
        """The budget: most distinct clocks measured."""
        return self._max_clocks

    @property
    def measured_clocks(self) -> tuple[int, ...]:
        """Clocks recorded so far, in the order they were first recorded."""
        return tuple(self._measured)

    @property
    def done(self) -> bool:
        """Whether profiling is over: budget spent, no lower clock left, or effective energy rising."""
        if len(self._measured) >= self._max_clocks:
            return True
        if self._clocks[0] not in self._measured:
            return False
        return min(self._measured) == self._clocks[-1] or self._energy_rising()

    def next_clock(self) -> int | None:
        """The clock to measure next, or ``None`` when done."""
        if self.done:
            return None
        if self._clocks[0] not in self._measured:
            return self._clocks[0]
        lowest = min(self._measured)
        below = np.array([c for c in self._clocks if c < lowest])
        target = lowest - (lowest - below[-1]) / (self._max_clocks - len(self._measured))
        return int(below[np.argmin(np.abs(below - target))])

    def record(self, clock: int, measurements: Mapping[MeasurementKey, KindMeasurement]) -> None:
        """Store ``(stage, kind) -> measurement`` at ``clock``, replacing what was recorded there before."""
        if clock not in self._clocks:
            raise ProfileError(
                f"{clock} MHz is not a supported clock ({self._clocks[-1]}-{self._clocks[0]} MHz, {len(self._clocks)} clocks). "
                f"Fix: record the clock the GPU was locked at, one returned by next_clock()."
            )
        if clock not in self._measured and len(self._measured) >= self._max_clocks:
            raise ProfileError(
                f"{clock} MHz would be clock {len(self._measured) + 1}, over the budget of {self._max_clocks} "
                f"(measured: {', '.join(map(str, self._measured))} MHz). Fix: stop measuring once next_clock() returns None, "
                f"or raise max_clocks."
            )
        if not measurements:
            raise ProfileError(f"no measurements given for {clock} MHz. Fix: pass at least one (stage, kind) measurement.")
        for key, value in measurements.items():
            if not (
                isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], (int, np.integer)) and key[0] >= 0
                and key[1] in INSTRUCTION_KINDS
            ):
                raise ProfileError(
                    f"measurement key {key!r} at {clock} MHz is not (stage, kind). "
                    f"Fix: key by (stage index >= 0, one of {', '.join(INSTRUCTION_KINDS)})."
                )
            if not isinstance(value, KindMeasurement):
                raise ProfileError(f"measurement of {key!r} at {clock} MHz is a {type(value).__name__}. Fix: pass a KindMeasurement.")
        self._measured[int(clock)] = {(int(stage), kind): value for (stage, kind), value in measurements.items()}

    def set_p2p_power(self, watts: float) -> None:
        """Set the blocking power (W): idling costs it, so instructions cost ``E - watts * t`` on top."""
        if not (math.isfinite(watts) and watts >= 0):
            raise ProfileError(f"blocking power is {watts} W. Fix: give the GPU's power while waiting on P2P, in watts (>= 0).")
        self._p2p_power = float(watts)

    def _energy_rising(self) -> bool:
        """Whether every stage's effective energy rose on each of the last ``EARLY_STOP_RISES`` clocks."""
        if self._p2p_power is None or len(self._measured) <= EARLY_STOP_RISES:
            return False
        lowest = sorted(self._measured, reverse=True)[-(EARLY_STOP_RISES + 1):]
        stages = set.intersection(*({stage for stage, _ in self._measured[c]} for c in lowest))
        if not stages:
            return False
        cost = np.array([[self._iteration_cost(self._measured[c], stage) for c in lowest] for stage in sorted(stages)])
        return bool(np.all(np.diff(cost, axis=1) > RISE_MARGIN * np.abs(cost[:, :-1])))

    def _iteration_cost(self, measurements: Mapping[MeasurementKey, KindMeasurement], stage: int) -> float:
        """Effective energy of one instruction of ``stage``, its kinds weighted by how many ran."""
        assert self._p2p_power is not None
        mine = [m for (s, _), m in measurements.items() if s == stage]
        return sum(m.count * (m.energy_j - self._p2p_power * m.time_s) for m in mine) / sum(m.count for m in mine)

    # ---------------------------------------------------------------- profile
    def rows(self) -> list[tuple[int, str, int, float, float]]:
        """The fitted ``(stage, kind, frequency, time, energy)`` of every recorded (stage, kind).

        Frequencies are the supported clocks from the maximum down to the lowest clock at which
        every (stage, kind) was measured. Unlike :meth:`profile`, the stages need not be complete,
        so a rank can share the rows of its own stages.
        """
        if not self._measured:
            raise ProfileError("no clock has been measured yet. Fix: run iterations at next_clock() and record() them first.")
        top = self._clocks[0]
        if top not in self._measured:
            raise ProfileError(
                f"the maximum clock {top} MHz was not measured (measured: {', '.join(map(str, self._measured))} MHz). "
                f"Fix: measure it first (next_clock() returns it first); every plan's baseline runs there."
            )
        series: dict[MeasurementKey, list[tuple[int, KindMeasurement]]] = {}
        for clock in sorted(self._measured):
            for key, measurement in self._measured[clock].items():
                series.setdefault(key, []).append((clock, measurement))
        missing = sorted(key for key in series if series[key][-1][0] != top)
        if missing:
            raise ProfileError(
                f"{', '.join(f'stage {s} {k}' for s, k in missing)} not measured at the maximum clock {top} MHz. "
                f"Fix: record every (stage, kind) at {top} MHz."
            )
        lowest = max(points[0][0] for points in series.values())
        grid = np.array(sorted(c for c in self._clocks if c >= lowest), dtype=float)
        rows = []
        in_order = sorted(series.items(), key=lambda item: (item[0][0], INSTRUCTION_KINDS.index(item[0][1])))
        for (stage, kind), points in in_order:
            clocks = np.array([c for c, _ in points], dtype=float)
            time = np.array([m.time_s for _, m in points])
            energy = np.array([m.energy_j for _, m in points])
            grid_time = _time_curve(clocks, time, grid)
            grid_energy = grid_time * self._power_curve(clocks, time, energy, grid)
            rows += [(stage, kind, int(f), float(t), float(e)) for f, t, e in zip(grid, grid_time, grid_energy)]
        return rows

    def profile(self, source: str = "<in-situ profile>") -> Profile:
        """The profile of every recorded stage over the clocks of :meth:`rows`.

        Needs stages ``0..N-1`` each with a forward and a backward (a complete pipeline); a rank
        holding only some stages shares :meth:`rows` instead.
        """
        return Profile.from_rows(self.rows(), source=source)

    def _power_curve(self, clocks: np.ndarray, time: np.ndarray, energy: np.ndarray, grid: np.ndarray) -> np.ndarray:
        """Power on ``grid``: the fitted model where it explains the points, else piecewise-linear (``clocks`` ascending)."""
        power = energy / time
        params = _fit_power(clocks / clocks[-1], power) if len(clocks) >= MIN_FIT_POINTS else None
        if params is not None:
            misfit = np.abs(_power_model(clocks / clocks[-1], *params) - power) * time
            if np.all(misfit <= FIT_TOLERANCE * np.abs(energy - (self._p2p_power or 0.0) * time)):
                return _power_model(grid / clocks[-1], *params)
        return np.interp(grid, clocks, power)


def _time_curve(clocks: np.ndarray, time: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Time on ``grid``: monotone (non-increasing in the clock), piecewise-linear in ``1 / f`` (``clocks`` ascending)."""
    monotone = isotonic_regression(time, increasing=False).x
    return np.interp(1.0 / grid, 1.0 / clocks[::-1], monotone[::-1])


def _power_model(ratio: np.ndarray, static: float, dynamic: float, floor: float) -> np.ndarray:
    """``static + dynamic * r * max(floor, r)**2``: dynamic power ~ f V^2, the voltage held at ``floor`` below it."""
    return static + dynamic * ratio * np.maximum(floor, ratio) ** 2


def _fit_power(ratio: np.ndarray, power: np.ndarray) -> tuple[float, float, float] | None:
    """``(static, dynamic, floor)`` of :func:`_power_model` through ``(clock ratio, power)`` by relative
    least squares, or ``None`` if no start converges."""
    best = None
    for floor in _FLOOR_STARTS:
        start = (0.5 * power.min(), power.max() - 0.5 * power.min(), floor)
        result = least_squares(
            lambda p: _power_model(ratio, *p) / power - 1.0, start, bounds=([0.0, 0.0, 0.0], [np.inf, np.inf, 1.0])
        )
        if result.success and (best is None or result.cost < best.cost):
            best = result
    return None if best is None else (float(best.x[0]), float(best.x[1]), float(best.x[2]))
