"""A training-like process for tests/test_safety.py: lock a low clock on emulated GPUs, then end.

Usage: ``python clock_locking_worker.py MODE READY_FILE`` with MODE one of

- ``normal``: leave the guard's ``with`` block and exit 0;
- ``exception``: raise inside the ``with`` block (exit code 1);
- ``exception-atexit``: raise with the guard never closed (only its atexit hook resets);
- ``wait``: keep computing until a signal (SIGINT, SIGTERM or SIGKILL) from the test ends it;
- ``wait-holding``: like ``wait``, but the loop holds, nearly all the time, a lock that resetting
  a clock also takes (as a training loop inside a device call holds the device's lock), so a
  signal lands while the reset it starts cannot proceed;
- ``wait-stuck``: like ``wait-holding``, but the main thread never runs a signal handler again
  once the first one returns (as when it blocks in native code); SIGTERM is then acted on by the
  guard's last resort, SIGKILL;
- ``unguarded``: like ``wait``, without a guard.

Once the clocks are locked it writes ``{"pid": ..., "watchdog_pid": ...}`` to READY_FILE.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from perseus_lightning.gpu.emulated import EmulatedGPU  # noqa: E402
from perseus_lightning.gpu.safety import ClockGuard  # noqa: E402

MODES = ("normal", "exception", "exception-atexit", "wait", "wait-holding", "wait-stuck", "unguarded")
DEVICE_CALL = threading.Lock()
"""Held by ``wait-holding``'s loop, and taken by :meth:`HeldGPU.reset_clock`."""


class HeldGPU(EmulatedGPU):
    """An emulated GPU whose reset waits for the loop's device call to end."""

    def reset_clock(self) -> None:
        with DEVICE_CALL:
            super().reset_clock()


def lock_and_report(devices: list[EmulatedGPU], ready_file: Path, guard: ClockGuard | None) -> None:
    for device in devices:
        device.lock_clock(min(device.supported_clocks()))
    ready = {"pid": os.getpid(), "watchdog_pid": guard.watchdog_pid if guard else None}
    partial = ready_file.with_suffix(".partial")
    partial.write_text(json.dumps(ready))
    partial.replace(ready_file)


def train_until_killed(devices: list[EmulatedGPU]) -> None:
    """Compute and read the energy counter on the main thread, as a training loop does."""
    while True:
        for device in devices:
            with device.computing():
                time.sleep(0.002)
            device.energy_j()


def train_holding_the_device_lock(devices: list[EmulatedGPU], stuck: bool = False) -> None:
    """Like :func:`train_until_killed`, inside :data:`DEVICE_CALL` but for a moment per round.

    ``stuck``: from the first round on, the main thread blocks SIGTERM and SIGINT, and a signal
    sent to the process wakes its handler through another thread; a signal sent to the main
    thread alone stays pending."""
    if stuck:
        threading.Thread(target=threading.Event().wait, daemon=True).start()  # takes process-wide signals
    while True:
        with DEVICE_CALL:
            if stuck:
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
            for device in devices:
                with device.computing():
                    time.sleep(0.02)
                device.energy_j()


def main(mode: str, ready_file: Path) -> None:
    devices = [HeldGPU(0), HeldGPU(1)]  # in $PERSEUS_EMULATED_GPU_DIR
    if mode == "unguarded":
        lock_and_report(devices, ready_file, None)
        train_until_killed(devices)
    if mode == "exception-atexit":
        guard = ClockGuard(devices)
        lock_and_report(devices, ready_file, guard)
        raise RuntimeError("training failed, guard left open")
    with ClockGuard(devices, signal_reset_timeout=1.0 if mode == "wait-stuck" else 5.0) as guard:
        lock_and_report(devices, ready_file, guard)
        if mode == "exception":
            raise RuntimeError("training failed")
        if mode == "wait":
            train_until_killed(devices)
        if mode in ("wait-holding", "wait-stuck"):
            train_holding_the_device_lock(devices, stuck=mode == "wait-stuck")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in MODES:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(MODES)}}} READY_FILE")
    main(sys.argv[1], Path(sys.argv[2]))
