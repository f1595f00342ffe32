"""AsyncClockSetter: coalescing, events, flush, close, worker errors, observe-only devices."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from perseus_lightning.gpu.clock_setter import AsyncClockSetter
from perseus_lightning.gpu.device import GPUControlError, GPUDevice
from perseus_lightning.gpu.emulated import EmulatedGPU

CLOCKS = (1410, 1200, 1000, 900)


class ScriptedGPU(GPUDevice):
    """Records clock calls; ``hold`` makes the next lock/reset block until ``release``; ``failing`` clocks raise."""

    index = 0
    name = "scripted"
    uuid = "GPU-scripted"

    def __init__(self, locked: int | None = None, observe_only: bool = False) -> None:
        self.calls: list[int | None] = []
        self.locked = locked
        self.failing: set[int | None] = set()
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()
        self._observe_only = observe_only

    def hold(self) -> None:
        self.entered.clear()
        self.gate.clear()

    def release(self) -> None:
        self.gate.set()

    @property
    def observe_only(self) -> bool:
        return self._observe_only

    def supported_clocks(self) -> tuple[int, ...]:
        return CLOCKS

    def locked_clock(self) -> int | None:
        return self.locked

    def lock_clock(self, mhz: int) -> None:
        self._set(mhz)

    def reset_clock(self) -> None:
        self._set(None)

    def _set(self, mhz: int | None) -> None:
        self.entered.set()
        assert self.gate.wait(5)
        self.calls.append(mhz)
        if mhz in self.failing:
            raise GPUControlError(f"cannot set {mhz}")
        self.locked = mhz

    def energy_j(self) -> float:
        return 0.0

    def power_w(self) -> float:
        return 0.0


def busy_worker(gpu: ScriptedGPU, setter: AsyncClockSetter, first: int) -> None:
    """Leave the worker blocked inside the device call for ``first``."""
    gpu.hold()
    setter.request(first)
    assert gpu.entered.wait(5)


def test_obsolete_requests_coalesce_and_the_newest_wins() -> None:
    gpu = ScriptedGPU()
    with AsyncClockSetter(gpu) as setter:
        busy_worker(gpu, setter, 1410)
        for _ in range(100):
            for mhz in CLOCKS:
                setter.request(mhz)
        gpu.release()
        assert setter.flush(5)
        assert gpu.calls == [1410, 900]
        assert [event.mhz for event in setter.events] == [1410, 900]


def test_requests_for_the_current_clock_are_skipped() -> None:
    gpu = ScriptedGPU(locked=1200)
    with AsyncClockSetter(gpu) as setter:
        setter.request(1200)  # the device is already there
        assert setter.flush(5) and gpu.calls == []
        busy_worker(gpu, setter, 1000)
        setter.request(900)
        setter.request(1000)  # back to the clock being applied: nothing left to do
        gpu.release()
        assert setter.flush(5)
        assert gpu.calls == [1000]


def test_events_record_applied_clocks_in_order_with_timestamps() -> None:
    gpu = ScriptedGPU()
    with AsyncClockSetter(gpu) as setter:
        before = time.perf_counter()
        for mhz in (1410, 1000, None):
            setter.request(mhz)
            assert setter.flush(5)
        events = setter.events
    assert [event.mhz for event in events] == [1410, 1000, None]
    times = [event.time for event in events]
    assert before <= times[0] <= times[1] <= times[2] <= time.perf_counter()


def test_flush_times_out_while_the_device_is_stuck() -> None:
    gpu = ScriptedGPU()
    setter = AsyncClockSetter(gpu)
    busy_worker(gpu, setter, 1410)
    assert setter.flush(0.05) is False
    gpu.release()
    assert setter.flush(5) is True
    setter.close()


def test_close_resets_the_clock_by_default_and_stops_the_worker() -> None:
    gpu = ScriptedGPU()
    setter = AsyncClockSetter(gpu)
    setter.request(1000)
    assert setter.flush(5)
    setter.close()
    assert gpu.calls[-1] is None and gpu.locked is None
    assert setter.events[-1].mhz is None
    assert not any(thread.name == "perseus-clock-setter-0" for thread in threading.enumerate())
    setter.request(900)  # ignored after close
    setter.close()  # idempotent
    assert gpu.calls == [1000, None] and setter.flush(0.1)


def test_close_without_reset_applies_the_pending_request() -> None:
    gpu = ScriptedGPU()
    setter = AsyncClockSetter(gpu)
    busy_worker(gpu, setter, 1410)
    setter.request(900)
    gpu.release()
    setter.close(reset_clock=False)
    assert gpu.calls == [1410, 900] and gpu.locked == 900


def test_worker_errors_are_recorded_and_logged_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    gpu = ScriptedGPU()
    gpu.failing.add(900)
    with caplog.at_level(logging.WARNING, logger="perseus_lightning.gpu.clock_setter"):
        with AsyncClockSetter(gpu) as setter:
            setter.request(900)
            assert setter.flush(5)
            setter.request(1000)  # the worker survived
            assert setter.flush(5)
    assert [(error.mhz, type(error.error)) for error in setter.errors] == [(900, GPUControlError)]
    assert [event.mhz for event in setter.events] == [1000, None]
    assert "900" in caplog.text and "cannot set" in caplog.text


def test_observe_only_device_is_a_no_op() -> None:
    gpu = ScriptedGPU(observe_only=True)
    with AsyncClockSetter(gpu) as setter:
        setter.request(900)
        assert setter.flush(0.1)
    assert gpu.calls == [] and setter.events == () and setter.errors == ()


def test_locks_the_emulated_gpu(tmp_path) -> None:
    gpu = EmulatedGPU(0, state_dir=tmp_path)
    with AsyncClockSetter(gpu) as setter:
        setter.request(1050)
        assert setter.flush(5)
        assert gpu.locked_clock() == 1050
    assert gpu.locked_clock() is None
