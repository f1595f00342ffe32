"""Benchmark: the training thread's cost of asking for a clock, and energy attribution accuracy.

Run: .venv/bin/python bench/gpu_control.py [--calls 100000] [--seconds 10]

(a) Per-call cost on the calling thread of ``AsyncClockSetter.request`` (median and p99 over
``--calls`` calls, each timed with ``perf_counter_ns``), against a bare ``list.append`` and
``threading.Event.set`` timed the same way in the same process. The device is the emulated GPU
with NVML's ~15 ms per clock change added, so the worker is busy and requests coalesce.

(b) Per-instruction energy from ``EnergyAttributor`` against the emulator's exact energy, with the
default 100 ms counter. Per instruction length (the time at max clock; lower clocks stretch it up to
1.52x), instructions at 4 clocks run in random order with random idle gaps of up to half their
length, in rounds that run every clock once, for at least ``--seconds`` of profiling. Error =
estimated energy per instruction over the mean true energy, minus 1; max and mean over the 4 clocks. Two counter-read costs: the emulator's
(microseconds) and an H200's (~4 ms per ``nvmlDeviceGetTotalEnergyConsumption``, which widens the
window in which each counter update is seen).
"""

from __future__ import annotations

import argparse
import random
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np
from rich.console import Console
from rich.table import Table

from perseus_lightning.gpu.clock_setter import AsyncClockSetter
from perseus_lightning.gpu.emulated import DEFAULT_UPDATE_PERIOD, EmulatedGPU
from perseus_lightning.gpu.energy import EnergyAttributor

CLOCKS = (1410, 1230, 1050, 870)
INSTRUCTION_SECONDS = (0.02, 0.05, 0.1, 0.3)
NVML_SET_CLOCK_S = 0.015
H200_ENERGY_READ_S = 0.004


class NVMLLatencyGPU(EmulatedGPU):
    """The emulated GPU with NVML's call latencies: ``set_clock_s`` per clock change, ``read_s`` per counter read.

    A read sees the counter in the middle of the call.
    """

    def __init__(self, *args: object, set_clock_s: float = 0.0, read_s: float = 0.0, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.set_clock_s, self.read_s = set_clock_s, read_s

    def lock_clock(self, mhz: int) -> None:
        time.sleep(self.set_clock_s)
        super().lock_clock(mhz)

    def energy_j(self) -> float:
        if not self.read_s:
            return super().energy_j()
        time.sleep(self.read_s / 2)
        value = super().energy_j()
        time.sleep(self.read_s / 2)
        return value


def per_call_us(call: Callable[[int], object], calls: int) -> np.ndarray:
    """Wall time of each of ``calls`` calls ``call(i)`` on this thread, in microseconds."""
    timer = time.perf_counter_ns
    elapsed = np.empty(calls)
    for i in range(calls):
        start = timer()
        call(i)
        elapsed[i] = timer() - start
    return elapsed / 1e3


def request_cost_table(calls: int, state_dir: str) -> Table:
    gpu = NVMLLatencyGPU(0, state_dir=state_dir, set_clock_s=NVML_SET_CLOCK_S)
    items: list[int] = []
    event = threading.Event()
    rows = [("list.append (baseline)", per_call_us(items.append, calls)),
            ("threading.Event.set (baseline)", per_call_us(lambda i: event.set(), calls))]
    with AsyncClockSetter(gpu) as setter:
        rows.append(("request, same clock each call", per_call_us(lambda i: setter.request(1410), calls)))
        rows.append(("request, new clock each call", per_call_us(lambda i: setter.request(CLOCKS[i % 2]), calls)))
        setter.flush(1.0)
        applied = len(setter.events)
    baseline = float(np.median(rows[1][1]))
    table = Table(title=f"(a) training-thread cost per call, {calls:,} calls each "
                        f"(emulated GPU, {1e3 * NVML_SET_CLOCK_S:.0f} ms per clock change)")
    for column in ("call", "median µs", "p99 µs", "max µs", "median / Event.set"):
        table.add_column(column, justify="right")
    for name, times in rows:
        median = float(np.median(times))
        table.add_row(name, f"{median:.2f}", f"{np.percentile(times, 99):.2f}", f"{times.max():.0f}", f"{median / baseline:.2f}")
    table.caption = f"clock changes applied for {2 * calls:,} requests: {applied} (requests coalesce while a change is in flight)"
    return table


def attribution_errors(instruction_s: float, read_s: float, seconds: float, state_dir: str, seed: int) -> tuple[list[float], int]:
    """Relative errors of the per-instruction energy of each clock, and the counter intervals the regression used."""
    gpu = NVMLLatencyGPU(0, state_dir=state_dir, update_period=DEFAULT_UPDATE_PERIOD, seed=seed, read_s=read_s)
    rng = random.Random(seed)
    truth: dict[int, list[float]] = {clock: [] for clock in CLOCKS}
    with EnergyAttributor(gpu) as attributor:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            for clock in rng.sample(CLOCKS, len(CLOCKS)):  # every clock once per round, in random order
                gpu.lock_clock(clock)
                time.sleep(rng.uniform(0.0, instruction_s / 2))
                before = gpu.true_energy_j()
                with attributor.track(clock), gpu.computing():
                    time.sleep(instruction_s)
                truth[clock].append(gpu.true_energy_j() - before)
    gpu.reset_clock()
    result = attributor.estimate()
    return [result.labels[clock].energy_j / float(np.mean(truth[clock])) - 1 for clock in CLOCKS], result.counter_intervals


def attribution_table(seconds: float, state_dir: str) -> Table:
    table = Table(title=f"(b) per-instruction energy vs emulator truth, {1e3 * DEFAULT_UPDATE_PERIOD:.0f} ms counter, "
                        f"{seconds:g} s profiling per row, {len(CLOCKS)} clocks interleaved")
    for column in ("length", "counter read", "updates", "max |err|", "mean |err|", "<= 3 %"):
        table.add_column(column, justify="right")
    for read_s, read_name in ((0.0, "emulator, µs"), (H200_ENERGY_READ_S, "H200-like, 4 ms")):
        for seed, instruction_s in enumerate(INSTRUCTION_SECONDS):
            errors, counter_intervals = attribution_errors(instruction_s, read_s, seconds, state_dir, seed)
            worst = max(map(abs, errors))
            table.add_row(f"{1e3 * instruction_s:.0f} ms", read_name, str(counter_intervals), f"{100 * worst:.2f} %",
                          f"{100 * np.mean(np.abs(errors)):.2f} %", "yes" if worst <= 0.03 else "NO")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100_000, help="calls timed per row of table (a)")
    parser.add_argument("--seconds", type=float, default=10.0, help="profiling seconds per row of table (b)")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory() as state_dir:
        console.print(request_cost_table(args.calls, state_dir))
        console.print(attribution_table(args.seconds, state_dir))


if __name__ == "__main__":
    main()
