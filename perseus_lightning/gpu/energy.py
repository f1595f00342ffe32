"""Energy measurement: named windows over the energy counter, and per-instruction attribution.

:class:`EnergyMeter` follows Zeus's ``ZeusMonitor``: ``begin_window(name)`` / ``end_window(name)``
read the counters at both ends. The counter updates only every ~100 ms on current GPUs and one read
costs ~4 ms (H200), so windows are for spans of seconds, never for single instructions.

:class:`EnergyAttributor` estimates the energy of instructions far shorter than the counter's
update period. A sampler thread polls the counter and keeps the estimated time of every update
(a "tick"); the training side only records each instruction's interval under a label such as
``(stage, kind, frequency)``. The energy between two ticks is modelled as::

    delta_E[k] = sum_label power[label] * overlap(label's intervals, tick interval k)
                 + idle_power * (time in tick interval k not covered by any instruction)

and solved for non-negative powers by least squares (``scipy.optimize.nnls``). A label's energy
per instruction is its power times its median recorded duration: an interval stretched by a host
stall (a preempted process, a garbage collection) inflates a mean, not the median. The regression
alone is :func:`attribute_energy`, for any counter's updates (a benchmark's virtual-time counter,
say).

Profiling budget: an update's instant is known only to within the gap between two reads (one
poll interval plus one read: ~1 ms on the emulator, ~5 ms with an H200's 4 ms reads), so each
counter interval's energy is off by up to ``power * gap``; the regression averages this over the
updates a label spans, and the error shrinks as 1 / sqrt(updates). Measured against the emulator's
truth (``bench/gpu_control.py``, 100 ms counter, 4 labels of different clocks interleaved with
idle gaps, two runs): 10 s of profiling, i.e. ~100 counter updates and ~2 s of instruction time
per label, puts every label's energy per instruction within 0.7 % of the truth for 20-300 ms
instructions with fast reads, and within 1.7 % with 4 ms reads; 3 s (~30 updates) missed 3 % with
4 ms reads. Budget ~2.5 s of instruction time per label (more when more labels share the counter
intervals), and use ``power_stderr_w`` to tell when a label has seen enough.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict, deque
from collections.abc import Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from scipy.optimize import nnls

from perseus_lightning.gpu.device import GPUDevice

logger = logging.getLogger(__name__)


UPDATE_DUE_MARGIN = 0.1
"""The sampler polls from this fraction of the counter's period before its next expected update."""
WIDE_BRACKET_FACTOR = 3.0
"""Counter updates bracketed by reads wider apart than this times the median are not used."""


class MeasurementWindowError(ValueError):
    """A measurement window was begun twice, or ended without being begun."""


@dataclass(frozen=True)
class Measurement:
    """One window: wall time, and energy per device (keyed by device index)."""

    time_s: float
    energy_j: dict[int, float]

    @property
    def total_energy_j(self) -> float:
        """Energy of all devices together."""
        return sum(self.energy_j.values())


class EnergyMeter:
    """Named measurement windows over the energy counters of ``devices``.

    Windows may nest or overlap as long as their names differ.
    """

    def __init__(self, devices: Sequence[GPUDevice]) -> None:
        self.devices = tuple(devices)
        self._open: dict[str, tuple[float, list[float]]] = {}

    def begin_window(self, name: str) -> None:
        """Start window ``name``; raises :class:`MeasurementWindowError` if it is already open."""
        if name in self._open:
            raise MeasurementWindowError(f"measurement window {name!r} is already open")
        self._open[name] = (time.perf_counter(), [device.energy_j() for device in self.devices])

    def end_window(self, name: str) -> Measurement:
        """End window ``name`` and return its measurement; raises :class:`MeasurementWindowError` if it is not open."""
        if name not in self._open:
            open_names = ", ".join(map(repr, self._open)) or "none"
            raise MeasurementWindowError(f"no open measurement window {name!r} (open: {open_names})")
        start, start_energy = self._open.pop(name)
        energy = [device.energy_j() for device in self.devices]
        elapsed = time.perf_counter() - start
        return Measurement(
            elapsed, {device.index: end - begin for device, begin, end in zip(self.devices, start_energy, energy)}
        )


@dataclass(frozen=True)
class LabelEnergy:
    """The attributed power and energy of one instruction label."""

    power_w: float
    """Average power while an instruction of this label runs (``nan`` if no counter interval saw one)."""
    power_stderr_w: float
    """Standard error of ``power_w`` from the regression residuals (``inf`` when undetermined)."""
    duration_s: float
    """Median recorded duration of one instruction (s): the typical one, whatever a few stalled
    intervals took."""
    count: int
    """How many instruction intervals were recorded under this label."""

    @property
    def energy_j(self) -> float:
        """Energy of one instruction of typical (median) duration."""
        return self.power_w * self.duration_s

    @property
    def energy_stderr_j(self) -> float:
        return self.power_stderr_w * self.duration_s


@dataclass(frozen=True)
class EnergyAttribution:
    """The regression's result: per-label power and energy, and the power when no instruction runs."""

    labels: dict[Hashable, LabelEnergy]
    idle_power_w: float
    """``nan`` when the recorded instructions left no idle time."""
    idle_power_stderr_w: float
    """Standard error of ``idle_power_w`` from the regression residuals (``inf`` when undetermined)."""
    counter_intervals: int
    """Intervals between counter updates that the regression used."""
    residual_rms_j: float
    """Root-mean-square misfit of one counter interval's energy."""


class EnergyAttributor:
    """Attributes one GPU's energy counter to labelled instruction intervals.

    Record every interval in which the GPU works (``time.perf_counter()`` timestamps of when the
    GPU, not the CPU, ran it, e.g. after a synchronisation or from CUDA events); intervals must not
    overlap, and unrecorded time counts as idle. Use it as a context manager, or :meth:`start` and
    :meth:`stop` the sampler thread around the profiled work.

    The sampler reads the counter every ``poll_interval_s`` until it has seen a few updates; then
    it sleeps through most of each update period and reads every ``poll_interval_s`` only from
    shortly before the next update is due, so each update is timed to about one poll interval
    plus one read at a few hundred reads per second.
    """

    def __init__(self, device: GPUDevice, poll_interval_s: float = 0.001) -> None:
        self.device = device
        self.poll_interval_s = poll_interval_s
        self._records: list[tuple[Hashable, float, float]] = []
        self._brackets: list[tuple[float, float, float]] = []  # (last read before an update, first read after, value)
        self._stop = threading.Event()
        self._sampler: threading.Thread | None = None

    def start(self) -> None:
        """Start polling the energy counter in a daemon thread (once per attributor)."""
        if self._sampler is not None:
            raise RuntimeError("this EnergyAttributor has already sampled; make a new one")
        self._sampler = threading.Thread(target=self._poll, name=f"perseus-energy-sampler-{self.device.index}", daemon=True)
        self._sampler.start()

    def stop(self) -> None:
        """Stop the sampler; the ticks seen so far stay available to :meth:`estimate`."""
        if self._sampler is not None:
            self._stop.set()
            self._sampler.join()

    def __enter__(self) -> EnergyAttributor:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def record(self, label: Hashable, start: float, end: float) -> None:
        """Record that the GPU ran an instruction of ``label`` from ``start`` to ``end`` (perf_counter s)."""
        self._records.append((label, start, end))

    @contextmanager
    def track(self, label: Hashable) -> Iterator[None]:
        """Record the body's wall-clock interval under ``label`` (for work that blocks until the GPU is done)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.record(label, start, time.perf_counter())

    @property
    def ticks(self) -> tuple[np.ndarray, np.ndarray]:
        """The estimated times (perf_counter s) of the counter's updates, and its values then (J).

        An update's time is the middle of the two reads around it. Updates whose reads lie more
        than ``WIDE_BRACKET_FACTOR`` times the median gap apart (the sampler was held up) are
        left out; their energy then falls into the neighbouring interval.
        """
        brackets = np.array(self._brackets, dtype=float).reshape(-1, 3)
        widths = brackets[:, 1] - brackets[:, 0]
        narrow = brackets[widths <= WIDE_BRACKET_FACTOR * np.median(widths)] if len(brackets) else brackets
        return narrow[:, :2].mean(axis=1), narrow[:, 2]

    def estimate(self) -> EnergyAttribution:
        """Solve the regression over all ticks and records so far (raises ``ValueError`` without enough data)."""
        tick_times, values = self.ticks
        return attribute_energy(tick_times, values, list(self._records))

    def _poll(self) -> None:
        try:
            self._sample_until_stopped()
        except Exception as error:  # sampling stops; estimate() uses the updates seen so far
            logger.warning("GPU %d: reading the energy counter failed, energy sampling stops: %s", self.device.index, error)

    def _sample_until_stopped(self) -> None:
        """Read the counter every ``poll_interval_s`` while an update is due, and sleep between updates."""
        previous_time, previous_value = self._read()
        periods: deque[float] = deque(maxlen=9)
        while True:
            delay = self.poll_interval_s
            if len(periods) >= 3:  # the counter's period is known: sleep until the next update is near
                period = float(np.median(periods))
                due = self._brackets[-1][1] + period - max(UPDATE_DUE_MARGIN * period, 4 * self.poll_interval_s)
                delay = max(delay, due - time.perf_counter())
            if self._stop.wait(delay):
                return
            read_time, value = self._read()
            if value != previous_value:  # the counter updated between the two reads
                if self._brackets:
                    periods.append(read_time - self._brackets[-1][1])
                self._brackets.append((previous_time, read_time, value))
            previous_time, previous_value = read_time, value

    def _read(self) -> tuple[float, float]:
        """The counter and the midpoint time of the call that read it (a read can take milliseconds)."""
        before = time.perf_counter()
        value = self.device.energy_j()
        return (before + time.perf_counter()) / 2, value


def attribute_energy(
    tick_times: np.ndarray, tick_values: np.ndarray, records: Sequence[tuple[Hashable, float, float]]
) -> EnergyAttribution:
    """Attribute an energy counter to labelled instruction intervals (see the module docstring).

    ``tick_times`` are the times of the counter's updates (ascending) and ``tick_values`` its
    readings then (J); ``records`` are ``(label, start, end)`` intervals on the same clock, not
    overlapping, with unrecorded time counted as idle. Raises ``ValueError`` with too few updates
    for the labels, or for an interval that ends before it starts.
    """
    intervals_by_label: dict[Hashable, list[tuple[float, float]]] = defaultdict(list)
    for label, start, end in records:
        intervals_by_label[label].append((start, end))
    labels = list(intervals_by_label)
    if len(tick_times) < len(labels) + 2:
        raise ValueError(f"{len(tick_times)} counter updates seen; need more than {len(labels) + 1} for {len(labels)} labels")
    origin = tick_times[0]  # keeps the coverage sums exact in float64
    boundaries = tick_times - origin
    columns = []
    durations: dict[Hashable, np.ndarray] = {}
    for label in labels:
        intervals = np.array(intervals_by_label[label]) - origin
        if np.any(intervals[:, 1] < intervals[:, 0]):
            raise ValueError(f"an interval of label {label!r} ends before it starts")
        durations[label] = intervals[:, 1] - intervals[:, 0]
        columns.append(np.diff(_coverage(intervals[:, 0], intervals[:, 1], boundaries)))
    busy = np.column_stack(columns) if columns else np.empty((len(boundaries) - 1, 0))
    idle = np.clip(np.diff(boundaries) - busy.sum(axis=1), 0.0, None)
    design = np.column_stack([busy, idle])
    energy = np.diff(tick_values)
    seen = design.sum(axis=0) > 0  # a label (or idle time) no counter interval saw stays undetermined
    powers, stderr = np.full(design.shape[1], np.nan), np.full(design.shape[1], np.inf)
    powers[seen], residual_norm = nnls(design[:, seen], energy)
    stderr[seen] = _standard_errors(design[:, seen], residual_norm)
    return EnergyAttribution(
        labels={
            label: LabelEnergy(float(powers[i]), float(stderr[i]), float(np.median(durations[label])), len(durations[label]))
            for i, label in enumerate(labels)
        },
        idle_power_w=float(powers[-1]),
        idle_power_stderr_w=float(stderr[-1]),
        counter_intervals=len(energy),
        residual_rms_j=float(residual_norm / np.sqrt(len(energy))),
    )


def _coverage(starts: np.ndarray, ends: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Total time covered by the intervals up to each time in ``at``.

    Each interval contributes ``clip(t - start, 0, end - start)``, that is
    ``max(0, t - start) - max(0, t - end)``, summed with sorted prefix sums.
    """

    def ramp_sum(points: np.ndarray) -> np.ndarray:  # sum over points p < t of (t - p)
        points = np.sort(points)
        prefix = np.concatenate([[0.0], np.cumsum(points)])
        below = np.searchsorted(points, at, side="left")
        return below * at - prefix[below]

    return ramp_sum(starts) - ramp_sum(ends)


def _standard_errors(design: np.ndarray, residual_norm: float) -> np.ndarray:
    """Ordinary least-squares standard errors of the coefficients (``inf`` when undetermined)."""
    rows, unknowns = design.shape
    if rows <= unknowns:
        return np.full(unknowns, np.inf)
    variance = residual_norm**2 / (rows - unknowns)
    gram = design.T @ design
    if np.linalg.matrix_rank(gram) < unknowns:
        return np.full(unknowns, np.inf)
    return np.sqrt(variance * np.diag(np.linalg.inv(gram)))
