"""ClockGuard and its watchdog: no exit path of a training process leaves a GPU clock locked."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.gpu import selection
from perseus_lightning.gpu.device import GPUDevice
from perseus_lightning.gpu.emulated import ENV_DIR, ENV_UPDATE_PERIOD, EmulatedGPU
from perseus_lightning.gpu.safety import ClockGuard
from perseus_lightning.gpu.watchdog import describe_device, reopen_device

WORKER = Path(__file__).resolve().parent / "clock_locking_worker.py"
LOW = min(A100_LIKE.frequencies)
WATCHDOG_RESET_MESSAGE = "ended without resetting its GPU clocks"


@pytest.fixture(autouse=True)
def sigint_as_from_a_terminal() -> Iterator[None]:
    """Let SIGINT through even when pytest was started with it ignored (in the background, under
    nohup), where a guard rightly leaves it alone and these tests could not send Ctrl-C."""
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(autouse=True)
def gpu_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private emulated-GPU directory, inherited by the worker and its watchdog."""
    for name in (selection.ENV_COUNT, selection.ENV_MODEL, selection.ENV_BLOCKING_POWER):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(selection.ENV_BACKEND, "emulated")
    monkeypatch.setenv(ENV_UPDATE_PERIOD, "0.01")
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "gpus"))
    return tmp_path / "gpus"


def locked_clocks(gpu_dir: Path) -> list[int | None]:
    """``locked_clock_mhz`` of the worker's two GPUs, from their state files."""
    return [json.loads((gpu_dir / f"gpu-{i}.json").read_text())["locked_clock_mhz"] for i in range(2)]


def process_gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie waiting for its new parent to reap it counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def wait_until(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


class Worker:
    """tests/clock_locking_worker.py in a session of its own (so that a Ctrl-C can go to its group)."""

    def __init__(self, mode: str, tmp_path: Path) -> None:
        self.ready_file = tmp_path / f"ready-{mode}.json"
        self.stderr_path = tmp_path / f"stderr-{mode}.txt"
        with open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, str(WORKER), mode, str(self.ready_file)],
                stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True,
            )
        if not wait_until(lambda: self.ready_file.exists() or self.process.poll() is not None, 30):
            self.process.kill()
        if not self.ready_file.exists():
            self.process.wait()
            pytest.fail(f"worker {mode} never got ready:\n{self.stderr}")
        ready = json.loads(self.ready_file.read_text())
        self.pid: int = ready["pid"]
        self.watchdog_pid: int | None = ready["watchdog_pid"]

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=20)
        finally:
            if self.process.poll() is None:
                self.process.kill()


ENDINGS = {
    # name: (worker mode, how the test ends it, expected exit code)
    "normal end": ("normal", None, 0),
    "exception in with": ("exception", None, 1),
    "exception, guard left open (atexit)": ("exception-atexit", None, 1),
    "Ctrl-C (SIGINT to the process group)": ("wait", lambda w: os.killpg(w.pid, signal.SIGINT), -signal.SIGINT),
    "SIGTERM": ("wait", lambda w: os.kill(w.pid, signal.SIGTERM), -signal.SIGTERM),
    "SIGTERM inside a device call": ("wait-holding", lambda w: os.kill(w.pid, signal.SIGTERM), -signal.SIGTERM),
    "Ctrl-C inside a device call": ("wait-holding", lambda w: os.killpg(w.pid, signal.SIGINT), -signal.SIGINT),
    # The handler returns into code that never runs a handler again: the guard's last resort.
    "SIGTERM, main thread stuck": ("wait-stuck", lambda w: os.kill(w.pid, signal.SIGTERM), -signal.SIGKILL),
    "SIGKILL": ("wait", lambda w: os.kill(w.pid, signal.SIGKILL), -signal.SIGKILL),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_every_exit_path_resets_the_clocks(ending: str, tmp_path: Path, gpu_dir: Path) -> None:
    mode, end, expected_code = ENDINGS[ending]
    worker = Worker(mode, tmp_path)
    assert worker.watchdog_pid is not None
    if end is not None:
        assert locked_clocks(gpu_dir) == [LOW, LOW]
        time.sleep(0.1)  # let it compute a little: the signal may land while it holds a device's file lock
        sent = time.monotonic()
        end(worker)
    assert worker.wait() == expected_code, worker.stderr
    if end is not None and ending != "SIGKILL":
        # Never the 5 s a reset may take before the signal is acted on regardless (1 s when stuck).
        assert time.monotonic() - sent < 4, worker.stderr
    if mode == "exception" or mode == "exception-atexit":
        assert "RuntimeError: training failed" in worker.stderr
    if mode == "wait-stuck":
        assert "did not act on signal SIGTERM: killing the process" in worker.stderr
    if ending == "SIGKILL":
        # Only the watchdog is left to reset: it sees the pipe close, resets and exits.
        assert wait_until(lambda: locked_clocks(gpu_dir) == [None, None], 10), worker.stderr
        assert wait_until(lambda: process_gone(worker.watchdog_pid), 10)
        assert WATCHDOG_RESET_MESSAGE in worker.stderr
    else:
        # The process reset its clocks itself and stood its watchdog down before exiting.
        assert locked_clocks(gpu_dir) == [None, None], worker.stderr
        assert wait_until(lambda: process_gone(worker.watchdog_pid), 10)  # it exits on its own, soon after
        assert WATCHDOG_RESET_MESSAGE not in worker.stderr


def test_without_a_guard_sigkill_leaves_the_clock_locked(tmp_path: Path, gpu_dir: Path) -> None:
    worker = Worker("unguarded", tmp_path)
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait() == -signal.SIGKILL
    time.sleep(0.5)
    assert locked_clocks(gpu_dir) == [LOW, LOW]  # as on a real GPU: the lock outlives the process


def test_sigint_handler_resets_then_raises_keyboard_interrupt_and_close_restores_it() -> None:
    device = EmulatedGPU(0)
    before = signal.getsignal(signal.SIGINT)
    guard = ClockGuard([device], watchdog=False)
    assert signal.getsignal(signal.SIGINT) != before
    device.lock_clock(LOW)
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert device.locked_clock() is None
    assert not guard.closed  # KeyboardInterrupt may be caught: the guard stays armed
    guard.close()
    guard.close()
    assert signal.getsignal(signal.SIGINT) == before


class StuckGPU(GPUDevice):
    """A device whose reset blocks until released, or fails."""

    index, name, uuid = 7, "stuck", "GPU-stuck"

    def __init__(self, fail: bool = False) -> None:
        self.release = threading.Event()
        self.fail = fail
        self.resets = 0

    observe_only = False  # type: ignore[assignment]

    def supported_clocks(self) -> tuple[int, ...]:
        return (LOW,)

    def locked_clock(self) -> int | None:
        return None

    def lock_clock(self, mhz: int) -> None:
        pass

    def reset_clock(self) -> None:
        self.resets += 1
        if self.fail:
            raise RuntimeError("driver went away")
        self.release.wait()

    def energy_j(self) -> float:
        return 0.0

    def power_w(self) -> float:
        return 0.0


def test_a_stuck_reset_delays_the_signal_only_so_long(caplog: pytest.LogCaptureFixture) -> None:
    device = StuckGPU()
    guard = ClockGuard([device], watchdog=False, signal_reset_timeout=0.2)
    try:
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # the handler lets this code go on ...
            time.sleep(5)  # ... and the signal comes back once the reset has timed out
        assert 0.2 <= time.monotonic() - started < 2
        assert "not reset within 0.2 s of signal SIGINT" in caplog.text
    finally:
        device.release.set()
        guard.close()


def test_a_failed_reset_does_not_delay_the_signal(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    def deferred(*args: object) -> None:
        raise AssertionError("a reset that has ended, if failed, is no reason to defer the signal")

    monkeypatch.setattr(ClockGuard, "_defer", deferred)
    guard = ClockGuard([StuckGPU(fail=True)], watchdog=False)
    try:
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # acted on in this handler
        assert "not reset within" in caplog.text and "driver went away" in caplog.text
    finally:
        guard.close()


def test_reset_failures_never_raise_and_are_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    device = StuckGPU(fail=True)
    with caplog.at_level(logging.WARNING, logger="perseus_lightning.gpu.safety"):
        guard = ClockGuard([device])  # the watchdog cannot re-open this device: said once
        assert guard.watchdog_pid is None
        assert guard.reset() is False
        guard.close()
    assert device.resets == 2
    messages = [r.getMessage() for r in caplog.records]
    assert sum("driver went away" in m for m in messages) == 1
    assert sum("cannot re-open" in m for m in messages) == 1
    assert "perseus reset --all" in caplog.text


def test_a_closed_guard_stands_its_watchdog_down() -> None:
    device = EmulatedGPU(0)
    guard = ClockGuard([device])
    watchdog = guard.watchdog_pid
    assert watchdog is not None
    device.lock_clock(LOW)
    guard.close()
    assert device.locked_clock() is None and process_gone(watchdog)
    device.lock_clock(LOW)  # e.g. the next run in this process: the old watchdog must not undo it
    time.sleep(0.2)
    assert device.locked_clock() == LOW


def test_a_forked_child_neither_resets_nor_holds_the_watchdog_pipe() -> None:
    device = EmulatedGPU(0)
    with ClockGuard([device]) as guard:
        device.lock_clock(LOW)
        child = os.fork()
        if child == 0:  # pragma: no cover - runs in the child
            guard.close()
            os._exit(0 if guard._pipe is None else 1)
        assert os.waitpid(child, 0)[1] == 0
        assert device.locked_clock() == LOW
        assert not process_gone(guard.watchdog_pid)
    assert device.locked_clock() is None


def test_observe_only_devices_need_no_watchdog() -> None:
    with ClockGuard([EmulatedGPU(0, observe_only=True)]) as guard:
        assert guard.watchdog_pid is None


def test_watchdog_reopens_the_same_emulated_gpu(tmp_path: Path) -> None:
    device = EmulatedGPU(3, state_dir=tmp_path / "elsewhere")
    description = json.loads(json.dumps(describe_device(device)))
    again = reopen_device(description)
    assert isinstance(again, EmulatedGPU)
    assert (again.uuid, again.state_path, again.model) == (device.uuid, device.state_path, device.model)
    assert describe_device(StuckGPU()) is None


def test_watchdog_reopens_nvml_devices_by_nvml_index(fake_nvml, monkeypatch: pytest.MonkeyPatch) -> None:
    from perseus_lightning.gpu.nvml import nvml_devices

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    (device,) = nvml_devices()
    again = reopen_device(json.loads(json.dumps(describe_device(device))))
    assert (again.index, again.nvml_index, again.uuid) == (0, 2, device.uuid)


def test_watchdog_that_cannot_open_its_devices_is_reported(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    device = EmulatedGPU(0)
    (tmp_path / "gpus" / "gpu-0.json").write_text("{}")  # the watchdog re-opens the device and fails
    with caplog.at_level(logging.WARNING, logger="perseus_lightning.gpu.safety"):
        guard = ClockGuard([device], ready_timeout=20)
    assert guard.watchdog_pid is None
    assert "the clock watchdog failed (exited with code 2)" in caplog.text
    guard.close()


def test_a_closed_guards_handler_reinstalled_later_still_chains() -> None:
    before = signal.getsignal(signal.SIGINT)
    guard = ClockGuard([EmulatedGPU(0)], watchdog=False)
    ours = signal.getsignal(signal.SIGINT)
    guard.close()
    signal.signal(signal.SIGINT, ours)  # as Lightning's signal connector does at teardown, after on_exception closed us
    try:
        with pytest.raises(KeyboardInterrupt):  # not SIG_DFL, which would kill the process
            signal.raise_signal(signal.SIGINT)
    finally:
        signal.signal(signal.SIGINT, before)
