"""EnergyMeter windows, and attribution of a coarse energy counter to instructions (EmulatedGPU truth)."""

from __future__ import annotations

import logging
import math
import random
import time

import numpy as np
import pytest

from perseus_lightning.gpu.device import GPUControlError, GPUDevice
from perseus_lightning.gpu.emulated import EmulatedGPU
from perseus_lightning.gpu.energy import EnergyAttributor, EnergyMeter, MeasurementWindowError, attribute_energy


class CounterGPU(GPUDevice):
    """An energy counter the test sets by hand."""

    name = "counter"
    uuid = "GPU-counter"

    def __init__(self, index: int) -> None:
        self.index = index
        self.counter_j = 0.0

    @property
    def observe_only(self) -> bool:
        return True

    def supported_clocks(self) -> tuple[int, ...]:
        return (1410,)

    def locked_clock(self) -> int | None:
        return None

    def lock_clock(self, mhz: int) -> None:
        pass

    def reset_clock(self) -> None:
        pass

    def energy_j(self) -> float:
        return self.counter_j

    def power_w(self) -> float:
        return 0.0


def test_windows_nest_and_overlap_by_name() -> None:
    gpus = [CounterGPU(0), CounterGPU(3)]
    meter = EnergyMeter(gpus)
    meter.begin_window("outer")
    gpus[0].counter_j, gpus[1].counter_j = 10.0, 1.0
    meter.begin_window("inner")
    gpus[0].counter_j, gpus[1].counter_j = 15.0, 3.0
    inner = meter.end_window("inner")
    meter.begin_window("overlapping")
    gpus[0].counter_j = 20.0
    outer = meter.end_window("outer")
    gpus[1].counter_j = 7.0
    overlapping = meter.end_window("overlapping")
    assert inner.energy_j == {0: 5.0, 3: 2.0} and inner.total_energy_j == 7.0
    assert outer.energy_j == {0: 20.0, 3: 3.0}
    assert overlapping.energy_j == {0: 5.0, 3: 4.0}
    assert 0 < inner.time_s < outer.time_s
    meter.begin_window("inner")  # an ended name can be opened again
    assert meter.end_window("inner").total_energy_j == 0.0


def test_window_name_errors_are_clear() -> None:
    meter = EnergyMeter([CounterGPU(0)])
    meter.begin_window("step")
    with pytest.raises(MeasurementWindowError, match="'step' is already open"):
        meter.begin_window("step")
    with pytest.raises(MeasurementWindowError, match=r"no open measurement window 'epoch' \(open: 'step'\)"):
        meter.end_window("epoch")
    meter.end_window("step")
    with pytest.raises(MeasurementWindowError, match=r"'step' \(open: none\)"):
        meter.end_window("step")


def test_meter_measures_the_emulated_gpu(tmp_path) -> None:
    gpu = EmulatedGPU(0, state_dir=tmp_path, update_period=0.01, noise=0.0)
    meter = EnergyMeter([gpu])
    meter.begin_window("idle")
    time.sleep(0.2)
    idle = meter.end_window("idle")
    assert idle.energy_j[0] == pytest.approx(gpu.model.blocking_power * idle.time_s, rel=0.15)


def profile_on_emulator(gpu: EmulatedGPU, attributor: EnergyAttributor, clocks: tuple[int, ...], host_s: float,
                        seconds: float, seed: int = 0) -> dict[int, list[tuple[float, float]]]:
    """Run rounds of every clock once, in random order with idle gaps; return each run's true energy and duration."""
    rng = random.Random(seed)
    truth: dict[int, list[tuple[float, float]]] = {clock: [] for clock in clocks}
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        for clock in rng.sample(clocks, len(clocks)):
            gpu.lock_clock(clock)
            time.sleep(rng.uniform(host_s / 2, host_s))  # idle gaps long enough to pin down the idle power
            before, start = gpu.true_energy_j(), time.perf_counter()
            with attributor.track(clock), gpu.computing():
                time.sleep(host_s)
            truth[clock].append((gpu.true_energy_j() - before, time.perf_counter() - start))
    return truth


def test_attribution_matches_the_emulators_truth(tmp_path) -> None:
    clocks = (1410, 1155, 900)
    gpu = EmulatedGPU(0, state_dir=tmp_path, update_period=0.02)
    with EnergyAttributor(gpu) as attributor:
        truth = profile_on_emulator(gpu, attributor, clocks, host_s=0.008, seconds=4.0)
    result = attributor.estimate()
    assert result.counter_intervals >= 100
    for clock in clocks:
        estimate = result.labels[clock]
        energies, durations = np.array(truth[clock]).T
        # The tracked interval's average power: a CPU stall between track() and computing() (a CI run once:
        # 406 W against the clock's 475 W) adds idle time to the interval, and the label's power honestly falls.
        true_power = float(np.sum(energies) / np.sum(durations))
        true_energy = true_power * float(np.median(durations))  # of an instruction of typical duration
        assert estimate.count == len(truth[clock])
        # Typical error ~0.5 % on 200 counter updates (~2 % with the cores oversubscribed). A stalled sampler
        # thread (a CI run once: +7 %) widens the reported standard error too, so the error is judged by it.
        assert 0 < estimate.energy_stderr_j < 0.1 * true_energy
        tolerance = max(0.03 * true_energy, 5 * estimate.energy_stderr_j)
        assert estimate.energy_j == pytest.approx(true_energy, abs=tolerance), clock
        assert estimate.power_w == pytest.approx(true_power, abs=tolerance / estimate.duration_s)
    # Idle time is a small share of the intervals, so the idle power is the least certain estimate (a CI run
    # once: 55.4 W against 83.64 W): judged by its standard error too.
    idle = gpu.model.blocking_power
    assert 0 < result.idle_power_stderr_w < 0.15 * idle  # typically 3-4 W
    assert result.idle_power_w == pytest.approx(idle, abs=max(0.25 * idle, 5 * result.idle_power_stderr_w))


def test_a_few_stalled_intervals_do_not_change_the_typical_instruction() -> None:
    """A host stall inside an instruction (here 3 of 60 intervals take 0.5 s instead of 50 ms, at the
    same power) must not make the instruction look slower or costlier: its energy per instruction
    comes from the median duration (the mean would put it 22 % too high)."""
    busy_power, idle_power = 300.0, 80.0
    records, cursor = [], 0.0
    for k in range(60):
        duration = 0.5 if k in (10, 30, 50) else 0.05
        records.append(("forward", cursor, cursor + duration))
        cursor += duration + 0.15
    ticks = np.arange(0.0, cursor, 0.1)
    starts, ends = np.array([r[1:] for r in records]).T
    busy = np.clip(ticks[:, None] - starts, 0.0, ends - starts).sum(axis=1)
    result = attribute_energy(ticks, busy_power * busy + idle_power * (ticks - busy), records)
    label = result.labels["forward"]
    assert label.count == 60
    assert label.duration_s == pytest.approx(0.05)
    assert label.power_w == pytest.approx(busy_power, rel=1e-6)
    assert label.energy_j == pytest.approx(busy_power * 0.05, rel=1e-6)
    assert result.idle_power_w == pytest.approx(idle_power, rel=1e-6)


def test_estimate_reports_unseen_labels_and_needs_counter_updates(tmp_path) -> None:
    gpu = EmulatedGPU(0, state_dir=tmp_path, update_period=0.01)
    attributor = EnergyAttributor(gpu)
    attributor.record("before", time.perf_counter() - 1.0, time.perf_counter() - 0.9)
    with pytest.raises(ValueError, match="counter updates seen"):
        attributor.estimate()
    with attributor:
        time.sleep(0.3)
        with attributor.track("busy"), gpu.computing():
            time.sleep(0.05)
        time.sleep(0.1)
    with pytest.raises(RuntimeError, match="already sampled"):
        attributor.start()
    result = attributor.estimate()
    assert math.isnan(result.labels["before"].power_w) and result.labels["before"].power_stderr_w == math.inf
    assert result.labels["busy"].count == 1 and result.labels["busy"].duration_s >= 0.05
    assert result.labels["busy"].power_w == pytest.approx(gpu.model.power(gpu.model.max_frequency), rel=0.1)
    times, values = attributor.ticks
    assert np.all(np.diff(times) > 0) and np.all(np.diff(values) > 0)


def test_sampler_stops_with_a_warning_when_the_counter_fails(caplog: pytest.LogCaptureFixture) -> None:
    class LostGPU(CounterGPU):
        def energy_j(self) -> float:
            raise GPUControlError("GPU is lost")

    with caplog.at_level(logging.WARNING, logger="perseus_lightning.gpu.energy"):
        with EnergyAttributor(LostGPU(0)) as attributor:
            time.sleep(0.02)
    assert "energy sampling stops: GPU is lost" in caplog.text
    with pytest.raises(ValueError, match="0 counter updates seen"):
        attributor.estimate()
