"""Never leave a GPU locked at a low clock: reset locked clocks on every way out of the process.

A locked SM clock outlives the process that set it, so a crashed run would leave its GPUs slow
until someone resets them. :class:`ClockGuard` resets the clocks of the devices it guards

- when it is closed: explicitly, or on leaving its ``with`` block, exception or not;
- at interpreter exit (``atexit``), which also follows an uncaught exception in the main thread
  (so ``sys.excepthook`` is left alone; an uncaught exception in another thread does not end
  the process, and must not unlock its clocks);
- on SIGINT and SIGTERM (handlers installed from the main thread), before the previous
  handler's behaviour: ``KeyboardInterrupt`` for SIGINT, termination for SIGTERM;
- when the process dies in any other way (SIGKILL, a fatal signal, ``os._exit``), from a
  watchdog process (:mod:`perseus_lightning.gpu.watchdog`) that outlives it.

Resetting is idempotent, and the guard never raises into training: a failure is logged once
per distinct message, on the ``perseus_lightning.gpu.safety`` logger.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from perseus_lightning.gpu.device import GPUDevice
from perseus_lightning.gpu.watchdog import DISARM, READY, describe_device

logger = logging.getLogger(__name__)

SIGNAL_GRACE = 0.1
"""Seconds a signal handler waits for the reset before it lets the interrupted code go on."""
RECOVERY = "Fix: `perseus reset --all`, or `nvidia-smi -rgc` as root."
GUARDED_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)

_Handler = Callable[[int, FrameType | None], Any] | int | None
_live_guards: weakref.WeakSet[ClockGuard] = weakref.WeakSet()


class ClockGuard:
    """Resets the clocks of ``devices`` on every exit path of this process (see the module docstring).

    It is armed on construction: atexit hook, signal handlers (only when constructed in the main
    thread; ``signals=False`` skips them) and, with ``watchdog=True``, the watchdog process, which
    the constructor waits for (at most ``ready_timeout`` seconds) so that protection is real
    before a clock is locked. :meth:`close` resets the clocks and disarms everything; it is
    idempotent. A signal is acted on once the reset has ended, or after ``signal_reset_timeout``
    seconds regardless (see :meth:`_on_signal`).

    A process forked from the guarded one (e.g. a ``fork`` DataLoader worker) inherits a
    disowned copy: it neither resets clocks nor keeps the watchdog's pipe open.
    """

    def __init__(
        self,
        devices: Iterable[GPUDevice],
        *,
        watchdog: bool = True,
        signals: bool = True,
        ready_timeout: float = 10.0,
        signal_reset_timeout: float = 5.0,
    ) -> None:
        self.devices: tuple[GPUDevice, ...] = tuple(devices)
        self.signal_reset_timeout = signal_reset_timeout
        self._pid = os.getpid()
        self._closed = False
        self._close_lock = threading.RLock()
        self._reported: set[str] = set()
        self._previous_handlers: dict[signal.Signals, _Handler] = {}
        self._deferred_signals: dict[int, _DeferredSignal] = {}
        self._pipe: int | None = None
        self._watchdog: subprocess.Popen[bytes] | None = None
        _live_guards.add(self)
        atexit.register(self.close)
        if signals:
            self._install_signal_handlers()
        if watchdog:
            try:
                self._start_watchdog(ready_timeout)
            except Exception as exc:  # noqa: BLE001 - the guard must never crash training
                self._report(f"could not start the clock watchdog ({exc}): clocks are not reset if this process is killed")

    def __enter__(self) -> ClockGuard:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has run."""
        return self._closed

    @property
    def watchdog_pid(self) -> int | None:
        """The watchdog's process id, or ``None`` when none is running for this guard."""
        return self._watchdog.pid if self._watchdog is not None else None

    def reset(self) -> bool:
        """Reset every guarded device's clock now; whether all resets succeeded. Never raises."""
        ok = True
        for device in self.devices:
            try:
                device.reset_clock()
            except Exception as exc:  # noqa: BLE001 - the guard must never crash training
                ok = False
                self._report(f"could not reset the clock of GPU {device.index} ({device.uuid}): {exc}. {RECOVERY}")
        return ok

    def close(self) -> None:
        """Reset the clocks, stop the watchdog and restore the signal handlers. Idempotent; never raises."""
        if self._closed or os.getpid() != self._pid:  # checked first: a forked child never takes the lock
            return
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            self._disarm(reset_done=self.reset())

    def _disarm(self, reset_done: bool) -> None:
        """Stop the watchdog (telling it to stand down when ``reset_done``), restore the handlers."""
        self._closed = True
        self._stop_watchdog(disarm=reset_done)
        self._restore_signal_handlers()
        atexit.unregister(self.close)

    # ------------------------------------------------------------------ signals
    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            logger.debug("ClockGuard created outside the main thread: no signal handlers (atexit and watchdog remain)")
            return
        for signum in GUARDED_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is None or previous == signal.SIG_IGN:
                continue  # a handler not set from Python cannot be chained; an ignored signal ends nothing
            self._previous_handlers[signum] = previous  # first: the handler may run at once
            signal.signal(signum, self._on_signal)

    def _restore_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # restored handlers chain through a closed guard, which only passes signals on
        for signum, previous in self._previous_handlers.items():
            if signal.getsignal(signum) == self._on_signal:  # another handler installed since stays
                signal.signal(signum, previous)
        # _previous_handlers is kept: a framework that saved this guard's handler may reinstall it
        # later (Lightning restores its saved handlers at teardown), and it must still chain.

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Reset the clocks, then act as the previous handler would have.

        The handler runs on the main thread between two bytecodes, maybe inside a device call that
        holds a lock the reset needs. So the reset runs in a thread; if it has not ended within
        :data:`SIGNAL_GRACE` seconds, the handler returns and lets the interrupted code go on, and
        the signal is sent again to the main thread once the reset has ended, or after
        ``signal_reset_timeout`` seconds.
        """
        previous = self._previous_handlers.get(signal.Signals(signum), signal.SIG_DFL)
        if not self._closed and os.getpid() == self._pid:
            deferred = self._deferred_signals.get(signum)
            grace = min(SIGNAL_GRACE, self.signal_reset_timeout)
            if deferred is None:
                reset = _Reset(self)
                if not reset.wait(grace):
                    self._defer(signum, reset)
                    return
                reset_done = reset.succeeded
            elif not deferred.sent_again.is_set():
                return  # sent again while its reset runs: the deferred delivery follows
            else:
                del self._deferred_signals[signum]
                deferred.handled.set()
                # The code that went on meanwhile may have locked a clock again.
                again = _Reset(self) if deferred.reset.succeeded and self._any_clock_locked() else None
                reset_done = deferred.reset.succeeded and (again is None or (again.wait(grace) and again.succeeded))
            if not reset_done:
                self._report(
                    f"clocks not reset within {self.signal_reset_timeout} s of signal {signal.Signals(signum).name}; "
                    "the exit hooks and the watchdog will retry"
                )
            if previous == signal.SIG_DFL:
                # The process ends now. Without a confirmed reset, the watchdog resets after it.
                self._disarm(reset_done=reset_done)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _defer(self, signum: int, reset: _Reset) -> None:
        """Send ``signum`` to the main thread again once ``reset`` has ended (or timed out).

        A main thread stuck in native code (a collective whose peers are gone) never runs the
        handler again: a signal that would end the process then ends it with SIGKILL, after
        ``signal_reset_timeout`` more seconds, leaving the watchdog armed unless the clocks are reset.
        """
        deferred = _DeferredSignal(reset)
        self._deferred_signals[signum] = deferred
        main_thread = threading.main_thread().ident
        assert main_thread is not None  # a signal handler runs on the main thread

        def send_again() -> None:
            reset.wait(self.signal_reset_timeout)
            deferred.sent_again.set()
            try:
                signal.pthread_kill(main_thread, signum)
            except OSError:  # the main thread has ended: so does the process, past the exit hooks
                return
            if deferred.handled.wait(self.signal_reset_timeout) or self._closed:
                return
            if self._previous_handlers.get(signal.Signals(signum), signal.SIG_DFL) == signal.SIG_DFL:
                self._report(f"the main thread did not act on signal {signal.Signals(signum).name}: killing the process")
                self._stop_watchdog(disarm=reset.succeeded and not self._any_clock_locked())
                os.kill(os.getpid(), signal.SIGKILL)

        threading.Thread(target=send_again, name="perseus-deferred-signal", daemon=True).start()

    def _any_clock_locked(self) -> bool:
        """Whether a guarded device reports a locked clock (or cannot say)."""
        for device in self.devices:
            try:
                if device.locked_clock() is not None:
                    return True
            except Exception:  # noqa: BLE001 - unknown counts as locked
                return True
        return False

    # ----------------------------------------------------------------- watchdog
    def _start_watchdog(self, ready_timeout: float) -> None:
        watched = [d for d in self.devices if not d.observe_only]
        descriptions = [describe_device(d) for d in watched]
        for device, description in zip(watched, descriptions):
            if description is None:
                self._report(f"the watchdog cannot re-open {device!r}: its clock is not reset if this process is killed")
        descriptions = [d for d in descriptions if d is not None]
        if not descriptions:
            return
        package_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        command = [
            sys.executable, "-m", "perseus_lightning.gpu.watchdog",
            "--parent-pid", str(self._pid), json.dumps(descriptions),
        ]
        _install_fork_hook()
        pipe_read, pipe_write = os.pipe()
        ready_read, ready_write = os.pipe()
        try:
            self._watchdog = subprocess.Popen(
                command, stdin=pipe_read, stdout=ready_write, env=env, start_new_session=True
            )
        except BaseException:
            os.close(pipe_write)
            os.close(ready_read)
            raise
        finally:
            os.close(pipe_read)
            os.close(ready_write)
        self._pipe = pipe_write
        try:
            ready = _read_line(ready_read, ready_timeout)
        finally:
            os.close(ready_read)
        if ready != READY:
            try:
                state = f"exited with code {self._watchdog.wait(timeout=1.0)}"
            except subprocess.TimeoutExpired:
                self._watchdog.kill()
                state = f"not ready within {ready_timeout} s"
            self._report(f"the clock watchdog failed ({state}): clocks are not reset if this process is killed")
            self._stop_watchdog(disarm=True)

    def _stop_watchdog(self, disarm: bool) -> None:
        """Close the pipe. After ``disarm`` the watchdog exits without resetting, and is reaped;
        otherwise it resets the clocks on its own time (this process may be about to die)."""
        if self._pipe is not None:
            try:
                if disarm:
                    os.write(self._pipe, DISARM)
            except OSError:
                pass  # the watchdog is gone: nothing to disarm
            finally:
                os.close(self._pipe)
                self._pipe = None
        if self._watchdog is not None and disarm:
            try:
                self._watchdog.wait(timeout=self.signal_reset_timeout)
            except subprocess.TimeoutExpired:
                self._report(f"the clock watchdog (pid {self._watchdog.pid}) did not exit; left running")
        self._watchdog = None

    def _disown(self) -> None:
        """In a forked child: drop this copy's end of the watchdog pipe and never act."""
        if self._pipe is not None:
            try:
                os.close(self._pipe)
            except OSError:
                pass
            self._pipe = None
        self._watchdog = None
        self._closed = True

    # ------------------------------------------------------------------ helpers
    def _report(self, message: str) -> None:
        if message not in self._reported:
            self._reported.add(message)
            logger.warning("ClockGuard: %s", message)


class _Reset:
    """One :meth:`ClockGuard.reset` in a daemon thread of its own (it may block, even for good)."""

    def __init__(self, guard: ClockGuard) -> None:
        self._ended = threading.Event()
        self._succeeded = False
        threading.Thread(target=self._run, args=(guard,), name="perseus-clock-reset", daemon=True).start()

    def _run(self, guard: ClockGuard) -> None:
        self._succeeded = guard.reset()
        self._ended.set()

    def wait(self, seconds: float) -> bool:
        """Whether the reset ended (succeeded or not) within ``seconds``."""
        return self._ended.wait(seconds)

    @property
    def succeeded(self) -> bool:
        """Whether the reset has ended and reset every device."""
        return self._ended.is_set() and self._succeeded


class _DeferredSignal:
    """A signal whose handler returned before its reset ended."""

    def __init__(self, reset: _Reset) -> None:
        self.reset = reset
        self.sent_again = threading.Event()
        self.handled = threading.Event()


_fork_hook_installed = False


def _install_fork_hook() -> None:
    global _fork_hook_installed
    if not _fork_hook_installed:
        os.register_at_fork(after_in_child=_disown_in_child)
        _fork_hook_installed = True


def _disown_in_child() -> None:
    for guard in list(_live_guards):
        guard._disown()


def _read_line(fd: int, timeout: float) -> str | None:
    """The first line written to ``fd`` within ``timeout`` seconds, or ``None``."""
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        chunk = os.read(fd, 256) if readable else b""
        if not chunk:
            return None
        data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")
