"""Set GPU clocks off the training thread.

Locking a clock through NVML takes 10-20 ms, far too long for the training loop. The training
thread only records the clock it wants (:meth:`AsyncClockSetter.request`, a few microseconds);
a daemon worker applies it. Requests the worker has not reached yet are obsolete once a newer one
arrives, so only the newest pending request is applied, and one equal to the clock already set is
skipped. Nothing here synchronises the device.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import NamedTuple

from perseus_lightning.gpu.device import GPUDevice

logger = logging.getLogger(__name__)

_UNKNOWN = object()
"""The applied clock after a failed call: whatever comes next must be applied."""


class ClockChange(NamedTuple):
    """A clock the worker applied: ``time`` is ``time.perf_counter()`` when the call returned."""

    time: float
    mhz: int | None
    """The locked SM clock, or ``None`` for a reset (unlocked)."""


class FailedClockChange(NamedTuple):
    """A failed clock change, recorded by the worker instead of being raised into training."""

    time: float
    mhz: int | None
    error: Exception


class AsyncClockSetter:
    """Applies the newest requested SM clock of one GPU from a daemon worker thread.

    :meth:`request` may be called from any thread. On an observe-only device nothing is started
    and every method is a no-op. :meth:`close` resets the clock by default: a locked clock
    outlives the process, and a GPU left slow after training is the worse failure. Use it as a
    context manager to close it on the way out, exceptions included.
    """

    def __init__(self, device: GPUDevice) -> None:
        self.device = device
        self._condition = threading.Condition()
        self._newest_request: int | None = None
        self._requests = 0  # serial number of the newest request
        self._handled = 0  # serial number of the newest request the worker has dealt with
        self._stopping = False
        self._events: list[ClockChange] = []
        self._errors: list[FailedClockChange] = []
        self._worker: threading.Thread | None = None
        if not device.observe_only:
            current = device.locked_clock()
            self._applied: object = current
            self._newest_request = current  # a request for the current clock is skipped at once
            self._worker = threading.Thread(target=self._run, name=f"perseus-clock-setter-{device.index}", daemon=True)
            self._worker.start()

    def request(self, mhz: int | None) -> None:
        """Ask for SM clock ``mhz`` (``None``: unlock) and return at once; ignored after :meth:`close`.

        A request equal to the newest one is dropped here, so a clock whose setting failed is
        retried only when a different clock was requested in between.
        """
        if mhz == self._newest_request or self._worker is None or self._stopping:
            return
        with self._condition:
            self._newest_request = mhz
            self._requests += 1
            self._condition.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every request made so far is applied (or skipped); ``False`` on timeout."""
        if self._worker is None:
            return True
        with self._condition:
            target = self._requests
            return self._condition.wait_for(lambda: self._handled >= target, timeout)

    def close(self, reset_clock: bool = True, timeout: float | None = 5.0) -> None:
        """Apply the pending request (or, with ``reset_clock``, unlock instead) and stop the worker.

        Waits up to ``timeout`` seconds for the worker; idempotent.
        """
        if self._worker is None or self._stopping:
            return
        if reset_clock:
            self.request(None)
        with self._condition:
            self._stopping = True
            self._condition.notify()
        self._worker.join(timeout)

    @property
    def events(self) -> tuple[ClockChange, ...]:
        """Every clock change applied so far, oldest first."""
        return tuple(self._events)

    @property
    def errors(self) -> tuple[FailedClockChange, ...]:
        """Every failed clock change so far, oldest first (each is also logged as a warning)."""
        return tuple(self._errors)

    def __enter__(self) -> AsyncClockSetter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._requests > self._handled or self._stopping)
                if self._requests == self._handled:  # stopping, nothing pending
                    return
                mhz, serial = self._newest_request, self._requests
            if mhz != self._applied:
                self._apply(mhz)
            with self._condition:
                self._handled = serial
                self._condition.notify_all()

    def _apply(self, mhz: int | None) -> None:
        try:
            if mhz is None:
                self.device.reset_clock()
            else:
                self.device.lock_clock(mhz)
        except Exception as error:  # never let a device failure stop training
            self._applied = _UNKNOWN
            self._errors.append(FailedClockChange(time.perf_counter(), mhz, error))
            logger.warning("GPU %d: setting the SM clock to %s failed: %s", self.device.index, mhz, error)
        else:
            self._applied = mhz
            self._events.append(ClockChange(time.perf_counter(), mhz))
