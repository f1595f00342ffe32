"""An emulated GPU for CPU machines, tests, demos and benchmarks.

It is driven by a :class:`~perseus_lightning.core.gpu_model.GPUModel`. Code marks its GPU work
with :meth:`EmulatedGPU.computing`: the block's host work (its wall time less the time its
thread waited for a CPU, see :class:`RunQueueWait`), times ``time_scale``, counts as the work at
max clock, and the emulator really sleeps until the block has lasted what the locked clock (and a
straggler's slowdown) make of that work, so a plan that slows a stage makes the CPU run slower too.
Measuring work rather than wall time keeps other processes' contention for the CPU out of the
emulated GPU's timing. Blocks that name a ``kernel`` (the runtime names each instruction's stage
and kind) run a fixed amount of work, as a GPU kernel does: once ``2 * kernel_samples`` blocks of
that kernel have run, its work is the median of the last ``kernel_samples`` of them (the first are
a fresh process's warm-up), so the host's own pace (which swings by ±15 % on a shared VM) no longer
moves the emulated GPU's timing. Energy accrues at the model's power while computing and at its
blocking power otherwise; :meth:`EmulatedGPU.energy_j` reads it like NVML's counter (updated every
``update_period`` seconds, with a little noise).

State lives in one JSON file per device, ``<dir>/gpu-<index>.json``, where ``<dir>`` is
``$PERSEUS_EMULATED_GPU_DIR`` or ``<tmp>/perseus-emulated-gpus-<uid>``::

    {"format": "perseus-emulated-gpu", "version": 1, "index": 0, "uuid": "GPU-emulated-0000-...",
     "name": "Emulated A100-like", "locked_clock_mhz": null,
     "energy_j": 1234.5, "power_w": 83.64, "updated_at": 1718000000.0}

so every process sees the same GPU: a clock locked by one process stays locked (as on a real
GPU, it outlives the process) until any process resets it. Updates are read-modify-write
under an ``flock`` on ``gpu-<index>.lock`` and land atomically (temporary file + ``os.replace``).
The energy fields are the counter as of its last publication (``updated_at``, Unix time), written
at a counter update at most every ``publish_period`` seconds (default 0.5) by the instance that
computes on the device (one computing process per device). Other instances follow that counter,
adding blocking power for the time since.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
import threading
import time
import uuid
from collections import deque
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from perseus_lightning.core.gpu_model import A100_LIKE, GPUModel
from perseus_lightning.gpu.device import GPUControlError, GPUDevice

ENV_DIR = "PERSEUS_EMULATED_GPU_DIR"
ENV_UPDATE_PERIOD = "PERSEUS_EMULATED_GPU_UPDATE_PERIOD"
DEFAULT_UPDATE_PERIOD = 0.1
DEFAULT_NOISE = 0.005
PUBLISH_PERIOD = 0.5
"""Seconds between the computing instance's writes of its counter to the state file (others follow it)."""
KERNEL_SAMPLES = 16
"""A kernel's work is fixed at the median host work of its blocks ``KERNEL_SAMPLES + 1`` to ``2 * KERNEL_SAMPLES``."""
STATE_FORMAT = "perseus-emulated-gpu"
STATE_VERSION = 1


def emulated_gpu_dir() -> Path:
    """Where emulated GPUs keep their state: ``$PERSEUS_EMULATED_GPU_DIR`` or a per-user temp dir."""
    configured = os.environ.get(ENV_DIR)
    return Path(configured) if configured else Path(tempfile.gettempdir()) / f"perseus-emulated-gpus-{os.getuid()}"


def _update_period_from_env() -> float:
    raw = os.environ.get(ENV_UPDATE_PERIOD)
    if raw is None:
        return DEFAULT_UPDATE_PERIOD
    try:
        return float(raw)
    except ValueError:
        raise GPUControlError(f"{ENV_UPDATE_PERIOD}={raw!r} is not a number. Fix: give seconds, e.g. 0.1.") from None


class RunQueueWait:
    """This thread's time spent runnable but waiting for a CPU, from Linux's ``/proc/thread-self/schedstat``.

    A block's host work is its wall time less this wait: its CPU time when it computes, its wall
    time when it sleeps or waits for I/O. Each thread keeps its file open (a read is a ~1 us
    ``pread``). Without schedstat (not Linux, or a kernel without ``CONFIG_SCHED_INFO``),
    :meth:`seconds` is 0 and work is wall time.
    """

    def __init__(self) -> None:
        self._per_thread = threading.local()
        self.available = self._file() is not None

    def seconds(self) -> float:
        """The calling thread's run-queue wait so far (s); 0 without schedstat."""
        file = self._file()
        return 0.0 if file is None else file.read_wait()

    def _file(self) -> _Schedstat | None:
        holder = self._per_thread
        if getattr(holder, "pid", None) != os.getpid():  # new thread, or a forked child: its parent's file is not its own
            try:
                holder.file = _Schedstat()
            except OSError:
                holder.file = None
            holder.pid = os.getpid()
        return holder.file


class _Schedstat:
    """The calling thread's schedstat file, open until this object goes (with its thread's local state)."""

    def __init__(self) -> None:
        self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)

    def read_wait(self) -> float:
        return int(os.pread(self.fd, 64, 0).split()[1]) * 1e-9  # fields: on-CPU ns, run-queue wait ns, timeslices

    def __del__(self) -> None:
        os.close(self.fd)


class ComputeBlock(NamedTuple):
    """One :meth:`EmulatedGPU.computing` block: ``time.perf_counter()`` times and the clock it ran at."""

    start: float
    end: float
    clock_mhz: int


COMPUTE_LOG_LENGTH = 100_000


class EmulatedGPU(GPUDevice):
    """A GPU emulated from a :class:`GPUModel`, with its state shared across processes by a file.

    ``slowdown`` (>= 1) stretches every compute block further, at the same power, to emulate a
    thermally throttled straggler. ``time_scale`` (>= 1) is the emulated GPU's seconds at max
    clock per second of host work: above 1, the emulated time rather than the host's pace sets
    each block's duration even when processes share too few cores (the recipes' CPU config
    uses 1.5). ``update_period`` (seconds; default ``$PERSEUS_EMULATED_GPU_UPDATE_PERIOD`` or
    0.1) is how often the energy counter advances; each advance's increment is off by a
    relative error drawn from N(0, ``noise``), seeded by ``seed`` (default: the index).
    ``publish_period`` (s) spaces the writes of the counter to the state file.
    ``kernel_samples`` is how many blocks of a named kernel are left out, then set its fixed work
    (see :meth:`computing`).
    ``observe_only=True`` makes :meth:`lock_clock` and :meth:`reset_clock` do nothing, like a GPU
    without clock permissions. ``state_dir`` overrides :func:`emulated_gpu_dir`.
    """

    def __init__(
        self,
        index: int = 0,
        model: GPUModel = A100_LIKE,
        *,
        slowdown: float = 1.0,
        time_scale: float = 1.0,
        update_period: float | None = None,
        noise: float = DEFAULT_NOISE,
        seed: int | None = None,
        state_dir: str | Path | None = None,
        observe_only: bool = False,
        publish_period: float = PUBLISH_PERIOD,
        kernel_samples: int = KERNEL_SAMPLES,
    ) -> None:
        period = _update_period_from_env() if update_period is None else float(update_period)
        if index < 0:
            raise ValueError(f"GPU index must be >= 0, got {index}")
        if slowdown < 1.0:
            raise ValueError(f"slowdown must be >= 1 (1 = a healthy GPU), got {slowdown}")
        if time_scale < 1.0:
            raise ValueError(f"time_scale must be >= 1 (1 = the host's own pace), got {time_scale}")
        if not period > 0:
            raise GPUControlError(
                f"the energy counter's update period must be > 0 s, got {period}. Fix: {ENV_UPDATE_PERIOD}=0.1."
            )
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if kernel_samples < 1:
            raise ValueError(f"kernel_samples must be >= 1, got {kernel_samples}")
        self.index = index
        self.model = model
        self.slowdown = float(slowdown)
        self.time_scale = float(time_scale)
        self.update_period = period
        self.noise = float(noise)
        self.name = f"Emulated {model.name}"
        stable = uuid.uuid5(uuid.NAMESPACE_OID, f"perseus-lightning.emulated-gpu.{index}")
        self.uuid = f"GPU-emulated-{index:04d}-{stable.hex[:12]}"
        self.state_path = Path(state_dir or emulated_gpu_dir()) / f"gpu-{index}.json"
        self._lock_path = self.state_path.with_suffix(".lock")
        self._observe_only = observe_only
        self._clocks = tuple(sorted(model.frequencies, reverse=True))
        self._rng = np.random.default_rng(index if seed is None else seed)
        self._mutex = threading.Lock()
        self._run_queue = RunQueueWait()
        self.kernel_samples = int(kernel_samples)
        self._kernel_work: dict[Hashable, float] = {}  # each calibrated kernel's fixed work (s)
        self._kernel_samples: dict[Hashable, list[float]] = {}  # the host work of each other kernel's blocks so far
        self._clock_version: tuple[int, int, int] | None = None  # of the state file whose clock is cached
        self._clock: int | None = None

        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        with self._file_lock():
            state = self._read_state()
            if state is None:
                state = self._fresh_state()
                self._write_state(state)
        now = time.monotonic()
        start_j = self._followed_energy(state)
        # Exact energy: _true_j at monotonic time _true_t, accruing at _power since.
        self._power = model.blocking_power
        self._true_j, self._true_t = start_j, now
        # Counter: last advanced at tick number _tick (ticks are every update_period from _t0).
        self._t0, self._tick = now, 0
        self._counter_j = self._tick_true_j = start_j
        self._active = 0
        self._computed = False
        self._open_blocks: list[list[tuple[float, int]]] = []  # (time, clock) changes of each running block
        self._published_at = -math.inf
        self.publish_period = float(publish_period)
        self.compute_log: deque[ComputeBlock] = deque(maxlen=COMPUTE_LOG_LENGTH)
        """This process's latest compute blocks on the device, oldest first: the emulator's event log."""

    def __repr__(self) -> str:
        return f"EmulatedGPU(index={self.index}, model={self.model.name!r}, state={str(self.state_path)!r})"

    # ------------------------------------------------------------------ clocks
    @property
    def observe_only(self) -> bool:
        return self._observe_only

    def supported_clocks(self) -> tuple[int, ...]:
        return self._clocks

    def locked_clock(self) -> int | None:
        """The state file's locked clock; the file is re-read only when it was replaced (one ``stat``)."""
        try:
            stat = self.state_path.stat()
        except FileNotFoundError:
            return None
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        if version != self._clock_version:
            state = self._read_state()
            self._clock_version, self._clock = version, None if state is None else state.get("locked_clock_mhz")
        return self._clock

    def lock_clock(self, mhz: int) -> None:
        if self._observe_only:
            return
        if mhz not in self._clocks:
            raise GPUControlError(
                f"{self.name} {self.index}: {mhz} MHz is not a supported SM clock. Fix: choose one of "
                f"{self._clocks[-1]}-{self._clocks[0]} MHz ({len(self._clocks)} clocks, see supported_clocks())."
            )
        self._update_state(locked_clock_mhz=int(mhz))
        self._clock_changed(int(mhz))

    def reset_clock(self) -> None:
        if self._observe_only:
            return
        self._update_state(locked_clock_mhz=None)
        self._clock_changed(self.model.max_frequency)

    def _clock_changed(self, clock: int) -> None:
        """The new clock takes effect at once, also for the compute blocks running now (as on a GPU)."""
        with self._mutex:
            now = time.monotonic()
            self._advance(now)
            for segments in self._open_blocks:
                segments.append((now, clock))
            if self._active:
                self._power = self.model.power(clock)

    # --------------------------------------------------------------- compute
    @contextmanager
    def computing(self, kernel: Hashable | None = None) -> Iterator[None]:
        """Mark the enclosed block as GPU work at the current clock (the locked one, else max).

        The block's host work is its wall time less its thread's run-queue wait
        (:class:`RunQueueWait`). With a ``kernel`` key, the work is that kernel's fixed work instead,
        once ``2 * kernel_samples`` of its blocks have run: the median host work of the last
        ``kernel_samples`` of them. On exit, sleeps until the block has lasted its emulated duration,
        ``work * time_scale * time_factor(clock) * slowdown`` (no sleep when the host took longer).
        Power is the model's at that clock from entry until the sleep ends. A clock this instance
        locks while the block runs takes effect at once: the work is then split by clock in
        proportion to host time (as a real GPU changes clock mid-kernel), and the block is logged
        with the clock it spent most of its host time at. Blocks may overlap from several threads.
        """
        clock = self.locked_clock() or self.model.max_frequency
        logged_start = time.perf_counter()
        waited = self._run_queue.seconds()
        start = time.monotonic()
        segments = [(start, clock)]
        with self._mutex:
            self._advance(start)
            self._power = self.model.power(clock)
            self._active += 1
            self._computed = True
            self._open_blocks.append(segments)
        try:
            yield
        finally:
            host_end = time.monotonic()
            host = host_end - start
            work = max(0.0, host - (self._run_queue.seconds() - waited))
            with self._mutex:
                self._open_blocks.remove(segments)
                spans = [(b - a, c) for (a, c), (b, _) in zip(segments, [*segments[1:], (host_end, 0)])]
                work = self._fixed_work(kernel, work)
            factor = (
                sum(span * self.model.time_factor(c) for span, c in spans) / host if host > 0 else self.model.time_factor(clock)
            )
            extra = work * self.time_scale * factor * self.slowdown - host
            if extra > 0:  # sleep(0) would still cost the kernel's timer slack (~50 us)
                time.sleep(extra)
            with self._mutex:
                self._advance(time.monotonic())
                self._active -= 1
                if self._active == 0:
                    self._power = self.model.blocking_power
            dominant = max(spans, key=lambda span: span[0])[1]
            self.compute_log.append(ComputeBlock(logged_start, time.perf_counter(), dominant))

    def _fixed_work(self, kernel: Hashable | None, work: float) -> float:
        """``kernel``'s fixed work once calibrated, else ``work`` (recorded as a sample; mutex held)."""
        if kernel is None:
            return work
        if kernel in self._kernel_work:
            return self._kernel_work[kernel]
        samples = self._kernel_samples.setdefault(kernel, [])
        samples.append(work)
        if len(samples) == 2 * self.kernel_samples:
            self._kernel_work[kernel] = float(np.median(samples[self.kernel_samples:]))
            del self._kernel_samples[kernel]
        return work

    def compute_window(self, host_seconds: float) -> float:
        """Emulate work that takes ``host_seconds`` at max clock; returns its emulated duration (s)."""
        start = time.monotonic()
        with self.computing():
            time.sleep(host_seconds)
        return time.monotonic() - start

    # ---------------------------------------------------------------- energy
    def energy_j(self) -> float:
        with self._mutex:
            self._advance(time.monotonic())
            return self._counter_j

    def true_energy_j(self) -> float:
        """Ground truth: the exact energy integral (J), without the counter's update period or noise."""
        with self._mutex:
            self._advance(time.monotonic())
            return self._true_j

    def power_w(self) -> float:
        with self._mutex:
            return self._power

    def _advance(self, now: float) -> None:
        """Accrue exact energy up to ``now``; step the counter if an update tick has passed (mutex held)."""
        tick = int((now - self._t0) / self.update_period)
        if tick > self._tick:
            # _true_t is never later than the tick: _advance runs at every power change.
            true_at_tick = self._true_j + self._power * (self._t0 + tick * self.update_period - self._true_t)
            error = 1.0 + self.noise * float(self._rng.standard_normal())
            self._counter_j += max(0.0, error) * (true_at_tick - self._tick_true_j)
            self._tick, self._tick_true_j = tick, true_at_tick
            self._sync_counter()
        self._true_j += self._power * (now - self._true_t)
        self._true_t = now

    def _sync_counter(self) -> None:
        """At a counter update: publish it if this instance computes (at most every ``publish_period``
        seconds: a write costs the computing thread ~0.5 ms), else follow the file's."""
        if self._computed:
            now = time.monotonic()
            if now - self._published_at >= self.publish_period:
                self._published_at = now
                self._update_state(energy_j=self._counter_j, power_w=self._power, updated_at=time.time())
        else:
            state = self._read_state()
            if state is not None:
                self._counter_j = max(self._counter_j, self._followed_energy(state))

    def _followed_energy(self, state: dict[str, Any]) -> float:
        """The file's counter, plus blocking power for the time since it was written."""
        return float(state["energy_j"]) + self.model.blocking_power * max(0.0, time.time() - float(state["updated_at"]))

    # ------------------------------------------------------------ state file
    @contextmanager
    def _file_lock(self) -> Iterator[None]:
        with open(self._lock_path, "a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def _read_state(self) -> dict[str, Any] | None:
        """The state file's contents, or ``None`` when it does not exist."""
        try:
            doc = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise GPUControlError(f"{self.state_path}: unreadable emulated-GPU state ({exc}). Fix: delete the file.") from None
        if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or doc.get("version") != STATE_VERSION:
            raise GPUControlError(
                f"{self.state_path}: not an emulated-GPU state file (format {STATE_FORMAT!r} version {STATE_VERSION}). "
                f"Fix: delete the file, or point {ENV_DIR} to another directory."
            )
        return doc

    def _fresh_state(self) -> dict[str, Any]:
        return {"locked_clock_mhz": None, "energy_j": 0.0, "power_w": self.model.blocking_power, "updated_at": time.time()}

    def _update_state(self, **changes: Any) -> None:
        with self._file_lock():
            state = self._read_state() or self._fresh_state()
            if any(state.get(key, object()) != value for key, value in changes.items()):
                self._write_state({**state, **changes})

    def _write_state(self, state: dict[str, Any]) -> None:
        doc = {
            "format": STATE_FORMAT, "version": STATE_VERSION, "index": self.index, "uuid": self.uuid, "name": self.name,
            **{key: state[key] for key in ("locked_clock_mhz", "energy_j", "power_w", "updated_at")},
        }
        fd, tmp = tempfile.mkstemp(dir=self.state_path.parent, prefix=f".{self.state_path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(doc, fh, indent=1)
                fh.write("\n")
            os.replace(tmp, self.state_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
