"""The framework-free Perseus runtime: one per training process, driven by framework hooks.

An integration (the Lightning callback, the Accelerate plugin) forwards four events:
:meth:`PerseusRuntime.iteration_begin`, :meth:`~PerseusRuntime.instruction_begin`,
:meth:`~PerseusRuntime.instruction_end` and :meth:`~PerseusRuntime.iteration_end`. The runtime
goes through its phases on its own:

``warmup``
    Clocks untouched; the instruction order of each rank is observed.
``baseline``
    Every GPU locked at its maximum clock; iteration time and energy are measured.
``profile``
    In situ: each rank locks the clocks its :class:`~perseus_lightning.runtime.profiler.ClockProfiler`
    asks for, one clock for a few whole iterations, and the energy counter is attributed to the
    instruction kinds (:class:`~perseus_lightning.gpu.energy.EnergyAttributor`). The blocking
    power comes from the same regression (the power while no instruction runs).
``plan``
    Rank 0 gathers the profiles and the observed orders, computes the frontier and broadcasts it.
``deploy``
    Each instruction runs at its planned clock, requested at the end of the previous instruction so
    that the clock setter can apply it in the communication gap; a change that takes longer lands
    while the instruction runs (the training thread never waits for one). The deployed iteration
    time and energy are measured against the baseline.
``monitor``
    Every iteration, each rank's compute pace is shared (one small all-gather; see
    :meth:`PerseusRuntime._pipeline_slowdowns`); a straggler makes the other pipelines deploy the
    frontier plan for ``min(T', T*)``.

Every rank passes through the same phases at the same iterations, so the collectives line up.
Nothing here raises into training: a failure is reported once and the runtime turns itself off
(on every rank, at the same iteration) after restoring the clocks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from perseus_lightning.core.errors import PerseusInputError
from perseus_lightning.core.planner import Frontier, FrontierPlan
from perseus_lightning.core.profile import FORWARD, Profile
from perseus_lightning.core.schedules import Instruction, parse_action
from perseus_lightning.gpu.device import GPUDevice, PerseusGPUWarning
from perseus_lightning.runtime.collectives import Collectives, LocalCollectives
from perseus_lightning.runtime.config import PerseusConfig
from perseus_lightning.runtime.stragglers import StragglerDetector

logger = logging.getLogger(__name__)

PHASES: tuple[str, ...] = ("off", "warmup", "baseline", "profile", "plan", "deploy", "monitor")
"""Phase names; ``perseus/phase`` logs a phase's position in this tuple."""
STATE_VERSION = 1
PROFILE_CLOCK_ITERATION_CAP = 2
"""A clock is measured for at most this many times ``iterations_per_clock`` iterations."""
PROFILE_STDERR_TARGET = 0.03
"""A clock's measurement is complete once every kind's energy has this relative standard error."""
METRIC_PERIOD_S = 1.0
"""The energy metric reads the counter about this often (s): several counter updates per reading."""


@dataclass(frozen=True)
class Measured:
    """Measured mean iteration time (s) and energy per iteration summed over every GPU (J)."""

    iteration_time_s: float
    energy_j: float

    def to_dict(self) -> dict[str, float]:
        return {"iteration_time_s": self.iteration_time_s, "energy_j": self.energy_j}


@dataclass
class StragglerEpisode:
    """One straggler episode: iterations ``[start, end)`` (``end`` is ``None`` while it lasts)."""

    start_iteration: int
    pipeline: int | None
    """The straggling pipeline (``None``: announced by :meth:`PerseusRuntime.announce_straggler`)."""
    slowdown: float
    plan_iteration_time_s: float
    """The planned iteration time of the other pipelines' plan, ``min(T', T*)``."""
    end_iteration: int | None = None
    peak_slowdown: float = 1.0
    """The largest slowdown followed during the episode (``slowdown`` is the latest)."""
    predicted_saving_pct: float | None = None
    """Model: the other pipelines' saving against running their fastest plan and waiting."""
    iteration_time_s: float | None = None
    """Measured over the episode: median iteration time, and energy per iteration of every GPU."""
    energy_j: float | None = None


@dataclass
class _Window:
    """An energy and time measurement over whole iterations (counter read at both ends)."""

    start_time: float
    start_energy: float
    ends: list[float] = field(default_factory=list)
    """``time.perf_counter()`` at each iteration's end."""

    @property
    def iterations(self) -> int:
        return len(self.ends)

    def median_iteration_time(self) -> float:
        """Median time from one iteration's end to the next (the first from the window's start):
        robust to the odd stall (garbage collection, a checkpoint) that a mean would absorb."""
        return float(np.median(np.diff([self.start_time, *self.ends])))


@dataclass
class _Layout:
    """Who is who: pipelines, and the ranks of each pipeline in pipeline-rank order."""

    pipelines: list[list[int]]
    pipeline: int
    pipeline_rank: int
    actions: list[list[str]]
    signature: str = ""
    labels: list[str] = field(default_factory=list)
    """The metric label of each rank's GPU, e.g. ``stage0`` or ``pipeline1/stage0+2``."""


class PerseusRuntime:
    """Perseus for one training process (one GPU). See the module docstring for the phases.

    ``device`` is this process's GPU (opened from ``config.gpu_backend`` by :meth:`start` when
    ``None``). ``synchronize`` waits for the device's queued work; it is called only while
    measuring instruction times (profile phase) and at iteration ends, never while deployed.
    ``schedule_name`` and ``model_signature`` key the cache. ``warn`` reports problems to the
    user (default: :func:`warnings.warn` on rank 0).
    """

    def __init__(
        self,
        config: PerseusConfig,
        collectives: Collectives | None = None,
        device: GPUDevice | None = None,
        *,
        device_index: int = 0,
        synchronize: Callable[[], None] | None = None,
        schedule_name: str = "observed",
        model_signature: str = "",
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self.collectives = collectives or LocalCollectives()
        self.device = device
        self.device_index = device_index
        self.schedule_name = schedule_name
        self.model_signature = model_signature
        self._synchronize = synchronize or (lambda: None)
        self._warn_callback = warn
        self.phase = "off" if config.mode == "off" else "warmup"
        self.iteration = 0
        self.baseline: Measured | None = None
        self.deployed: Measured | None = None
        self.frontier: Frontier | None = None
        self.profile: Profile | None = None
        """The profile the frontier was planned on (in situ, or from the cache)."""
        self.plan: FrontierPlan | None = None
        self.profiling_iterations = 0
        self.straggler_episodes: list[StragglerEpisode] = []
        self.detector = StragglerDetector(config.straggler.threshold, config.straggler.patience, config.straggler.recovery)
        self._started = False
        self._closed = False
        self._failed = False
        self._guard: Any = None
        self._setter: Any = None
        self._attributor: Any = None
        self._profiler: Any = None
        self._layout: _Layout | None = None
        self._restored: dict[str, Any] | None = None
        self._in_phase = 0
        self._order: list[Instruction] = []
        self._observed: list[Instruction] | None = None
        self._iteration_start = 0.0
        self._instruction_start = 0.0
        self._clock: int | None = None  # the clock this rank runs at, outside deployment
        self._clock_time: dict[int, float] = {}  # busy seconds by requested clock, this iteration
        self._planned: dict[Instruction, int] = {}
        self._next_clock: dict[Instruction, int] = {}
        self._profile_clock: int | None = None
        self._at_clock = 0
        self._profile_done = False
        self._window: _Window | None = None
        self._metric_window: _Window | None = None
        self._forward_busy = 0.0  # seconds of forward instructions this iteration
        self._expected_forward = math.nan  # the deployed plan's forward seconds per iteration, by the profile
        self._pace_samples: list[np.ndarray] = []  # every rank's forward pace while deploying, to calibrate
        self._calibration: np.ndarray | None = None  # every rank's measured / profiled forward time, fastest plan
        self._straggler_slowdown: float | None = None
        self._episode_window: _Window | None = None
        self._last_metrics: dict[str, float] = {}
        self._controlling = False  # every rank controls its clocks (decided after warm-up)
        self._progress: Any = None  # rank 0's profiling progress bar: (rich Progress, task id)
        self._computing: Any = None  # the open emulated-compute block of the running instruction
        self._idle_power = math.nan
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ lifecycle
    @property
    def active(self) -> bool:
        """Whether the runtime still handles events (not ``off``, not closed)."""
        return self.phase != "off" and not self._closed

    @property
    def controls_clocks(self) -> bool:
        return self.config.mode == "apply" and self.device is not None and not self.device.observe_only

    def start(self) -> None:
        """Open the GPU, arm the clock guard and start the clock setter (idempotent)."""
        if self._started or self.phase == "off":
            return
        self._started = True
        try:
            from perseus_lightning.gpu.clock_setter import AsyncClockSetter
            from perseus_lightning.gpu.safety import ClockGuard
            from perseus_lightning.gpu.selection import open_device

            if self.device is None:
                self.device = open_device(self.config.gpu_backend, index=self.device_index)
            if hasattr(self.device, "time_scale"):  # an emulated GPU: its pace against the host's work
                self.device.time_scale = self.config.emulation.time_scale
            if self.config.mode == "apply" and self.device.observe_only:
                self._warn(
                    f"GPU {self.device.index} ({self.device.name}) does not allow clock changes: Perseus only measures "
                    f"(observe mode). Fix: run with clock permissions (see `perseus doctor`)."
                )
            if self.controls_clocks:
                self._guard = ClockGuard([self.device])
                self._setter = AsyncClockSetter(self.device)
        except Exception as error:  # never crash training
            self._fail(f"could not open the GPU: {error}")

    def close(self) -> None:
        """Restore the clocks and stop the helper threads (idempotent; never raises)."""
        if self._closed:
            return
        self._closed = True
        self._stop_progress()
        if self._computing is not None:  # an instruction was interrupted (an exception in training)
            self._computing.__exit__(None, None, None)
            self._computing = None
        for closer in (self._setter, self._guard):
            if closer is not None:
                try:
                    closer.close()
                except Exception as error:  # noqa: BLE001 - restoring clocks must not raise
                    logger.warning("Perseus: closing %s failed: %s", type(closer).__name__, error)
        if self._attributor is not None:
            self._attributor.stop()

    # --------------------------------------------------------------------- events
    def iteration_begin(self) -> None:
        """A training iteration (one optimizer step) starts."""
        if not self.active:
            return
        self._order = []
        self._clock_time = {}
        self._forward_busy = 0.0
        self._iteration_start = time.perf_counter()
        if self._failed:
            return
        try:
            self._apply_emulated_straggler()
            if self._window is None and self.phase in ("baseline", "deploy"):
                self._window = self._open_window()
            if self._metric_window is None:
                self._metric_window = self._open_window()
        except Exception as error:  # noqa: BLE001
            self._fail(f"reading the GPU failed: {error}")

    def instruction_begin(self, instruction: Instruction) -> None:
        """An instruction (forward, backward, ... of one microbatch on one stage) starts on this rank."""
        if not self.active or self._failed:
            return
        try:
            if self.phase in ("deploy", "monitor") and self._planned:
                clock = self._planned.get(instruction)
                if clock is not None and self._setter is not None:
                    self._setter.request(clock)
            self._computing = self.device.computing((instruction.stage, instruction.kind)) if self.device is not None else None
            if self._computing is not None:
                self._computing.__enter__()
            self._instruction_start = time.perf_counter()
        except Exception as error:  # noqa: BLE001
            self._fail(f"instruction hook failed: {error}")

    def instruction_end(self, instruction: Instruction) -> None:
        """The instruction that :meth:`instruction_begin` announced has finished."""
        if not self.active or self._failed:
            return
        try:
            if self.phase == "profile":  # instruction times are measured: wait for the device
                self._synchronize()
            if self._computing is not None:
                self._computing.__exit__(None, None, None)
                self._computing = None
            end = time.perf_counter()
            self._order.append(instruction)
            if instruction.kind == FORWARD:
                self._forward_busy += end - self._instruction_start
            clock = self._planned.get(instruction) if self.phase in ("deploy", "monitor") and self._planned else self._clock
            if clock is not None:
                self._clock_time[clock] = self._clock_time.get(clock, 0.0) + end - self._instruction_start
            if self._attributor is not None and self.phase == "profile" and self._clock is not None:
                self._attributor.record((instruction.stage, instruction.kind, self._clock), self._instruction_start, end)
            if self.phase in ("deploy", "monitor") and self._setter is not None and instruction in self._next_clock:
                self._setter.request(self._next_clock[instruction])
        except Exception as error:  # noqa: BLE001
            self._fail(f"instruction hook failed: {error}")

    def iteration_end(self) -> dict[str, float]:
        """The iteration ended (after the optimizer step); returns the metrics to log for it.

        Every rank must call this once per iteration: it runs the per-iteration exchange and,
        at phase ends, the phase's collectives.
        """
        if self.phase == "off" or self._closed:
            return {}
        try:
            self._synchronize()
        except Exception as error:  # noqa: BLE001
            self._fail(f"synchronising the device failed: {error}")
        now = time.perf_counter()
        pace = self._forward_busy / self._expected_forward if self._expected_forward > 0 else math.nan
        mean_clock = (
            sum(c * t for c, t in self._clock_time.items()) / sum(self._clock_time.values()) if self._clock_time else math.nan
        )
        energy = self._close_metric_window(now)
        row = [pace, float(self._profile_done), float(self._failed), energy, mean_clock, now - self._iteration_start]
        try:
            table = self.collectives.all_gather_floats(row)
        except Exception as error:  # noqa: BLE001 - a broken process group is not ours to raise
            self._fail(f"the per-iteration exchange failed: {error}", collective=False)
            return {}
        if np.any(table[:, 2] > 0):  # this rank already reported its own failure; the others learn of it here
            if self._failed:
                self.phase = "off"
                self.close()
            else:
                self._fail("another rank reported a failure; Perseus turns off on every rank", collective=False)
            return {}
        self._in_phase += 1
        self.iteration += 1
        try:
            self._advance(table, now)
        except PerseusInputError:  # the user's to fix (e.g. a cache file from another model): raised on every rank
            self.phase = "off"
            self.close()
            raise
        except Exception as error:  # noqa: BLE001
            logger.exception("Perseus runtime error")
            self._fail(f"{type(error).__name__}: {error}", collective=False)
            return {}
        self._last_metrics = self._metrics(table)
        return self._last_metrics

    def epoch_end(self) -> None:
        """An epoch ended (nothing to do: phases count iterations, not epochs)."""

    def announce_straggler(self, slowdown: float | None) -> None:
        """Infrastructure reports a straggler ``slowdown`` times slower (``None``: it recovered).

        Call it on every rank at the same iteration; it takes effect at the next iteration end.
        """
        self.detector.announce(slowdown)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to skip profiling and planning (JSON-compatible)."""
        return {
            "version": STATE_VERSION,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "deployed": self.deployed.to_dict() if self.deployed else None,
            "frontier": self.frontier.to_dict() if self.frontier else None,
            "profile_rows": self.profile.rows() if self.profile else None,
            "profiling_iterations": self.profiling_iterations,
            "straggler_episodes": [vars(e).copy() for e in self.straggler_episodes],
            "calibration": self._calibration.tolist() if self._calibration is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a restored frontier is deployed right after warm-up."""
        if state.get("version") != STATE_VERSION:
            self._warn(f"ignoring Perseus state of version {state.get('version')} (this release writes {STATE_VERSION})")
            return
        self._restored = state
        self.baseline = Measured(**state["baseline"]) if state.get("baseline") else None
        self.deployed = Measured(**state["deployed"]) if state.get("deployed") else None
        self.profiling_iterations = int(state.get("profiling_iterations", 0))
        self.straggler_episodes = [StragglerEpisode(**e) for e in state.get("straggler_episodes", [])]
        if state.get("calibration") is not None:
            self._calibration = np.asarray(state["calibration"], dtype=float)

    def summary(self) -> dict[str, Any]:
        """Baseline vs deployed (measured), the saving, the profiling cost and the plan."""
        plan = None
        if self.plan is not None and self.frontier is not None:
            plan = {
                "iteration_time_s": self.plan.iteration_time,
                "energy_j": self.plan.energy,
                "frequencies": self.plan.plan.rank_lists(self.frontier.dag),
            }
        return {
            "mode": self.config.mode,
            "phase": self.phase,
            "iterations": self.iteration,
            "baseline": self.baseline.to_dict() if self.baseline else None,
            "deployed": self.deployed.to_dict() if self.deployed else None,
            "saving_pct": self.saving_pct,
            "profiling_iterations": self.profiling_iterations,
            "planned_saving_pct": (
                100.0 * (1.0 - self.frontier.fastest.energy / self.frontier.baseline_energy) if self.frontier else None
            ),
            "plan": plan,
            "frontier_plans": len(self.frontier.plans) if self.frontier else 0,
            "fastest_iteration_time_s": self.frontier.fastest.iteration_time if self.frontier else None,
            "straggler_episodes": [vars(e).copy() for e in self.straggler_episodes],
            "metrics": dict(self._last_metrics),
        }

    @property
    def saving_pct(self) -> float | None:
        """Measured energy saving of the deployed plan against the measured baseline (%)."""
        if self.baseline is None or self.deployed is None:
            return None
        return 100.0 * (1.0 - self.deployed.energy_j / self.baseline.energy_j)

    # ------------------------------------------------------------ phase machine
    def _advance(self, table: np.ndarray, now: float) -> None:
        for window in (self._window, self._episode_window):
            if window is not None:
                window.ends.append(now)
        if self.phase == "warmup":
            self._observe_order()
            if self._in_phase >= max(1, self.config.warmup_iterations):
                self._end_warmup()
        elif self.phase == "baseline":
            if self._in_phase >= max(1, self.config.baseline_iterations):
                self.baseline, self._window = self._measure(self._window), None
                if self.frontier is not None:
                    self._deploy(self.frontier.fastest)
                elif self._controlling:
                    self._start_profile()
                else:
                    self._enter("monitor")
        elif self.phase == "profile":
            self.profiling_iterations += 1
            self._profile_step()
            if bool(np.all(table[:, 1] > 0)):
                self._plan()
        elif self.phase == "deploy":
            self._pace_samples.append(table[:, 0].copy())
            if self._in_phase >= max(1, self.config.deploy_iterations):
                self.deployed, self._window = self._measure(self._window), None
                self._calibration = np.median(np.array(self._pace_samples), axis=0)
                self._enter("monitor")
        elif self.phase == "monitor":
            self._follow_stragglers(table)

    def _enter(self, phase: str) -> None:
        logger.info("Perseus rank %d: %s -> %s at iteration %d", self.collectives.rank, self.phase, phase, self.iteration)
        self.phase = phase
        self._in_phase = 0

    def _observe_order(self) -> None:
        if self._observed is not None and self._order != self._observed:
            self._warn_once("order", "the instruction order changed between warm-up iterations; the last one is used")
        self._observed = list(self._order)

    def _end_warmup(self) -> None:
        """Exchange the observed orders, find the pipelines, and look for a cached or restored frontier."""
        local = {
            "actions": [ins.action for ins in self._observed or []],
            "stages": sorted({ins.stage for ins in self._observed or []}),
            "signature": self.model_signature,
            "gpu": self.device.name if self.device is not None else "unknown",
            "controls": self.controls_clocks,
        }
        everyone = self.collectives.all_gather_object(local)
        self._layout = _layout_of(everyone, self.collectives.rank)
        if not self._observed:
            raise RuntimeError(
                "no instruction was observed during warm-up. Fix: attach Perseus to the pipeline stages "
                "(Lightning: set `self.pipeline_schedule` in the LightningModule)."
            )
        self._controlling = all(entry["controls"] for entry in everyone)
        if self.config.mode == "apply" and not self._controlling:
            self._warn_once("observe", "some GPU does not allow clock changes, so no rank changes clocks (observe mode)")
        payload = None
        if self.config.mode == "apply":  # the same decision on every rank: the lookup is collective
            restored = (self._restored or {}).get("frontier")
            payload = {"frontier": restored, "profile_rows": self._restored.get("profile_rows")} if restored else self._cache_lookup()
        if not self._controlling:
            payload = None
        if payload is not None:
            frontier = Frontier.from_dict(payload["frontier"], "<cached frontier>")
            if frontier.dag.schedule.actions() == self._layout.actions:
                self.frontier = frontier
                if payload.get("profile_rows"):
                    self.profile = Profile.from_rows(payload["profile_rows"], source="<cached profile>")
            else:
                self._warn("the cached or restored plan was made for another instruction order; profiling again")
        self._clock = self._max_clock() if self._controlling else None
        self._lock(self._clock)
        if self.frontier is not None and self.baseline is not None:  # resumed: nothing left to measure first
            self._deploy(self.frontier.fastest)
            return
        self._enter("baseline")

    # --------------------------------------------------------------- profiling
    def _start_profile(self) -> None:
        from perseus_lightning.gpu.energy import EnergyAttributor
        from perseus_lightning.runtime.profiler import ClockProfiler

        self._profiler = ClockProfiler(self.device.supported_clocks(), self.config.profiling.max_clocks, self.config.blocking_power)
        self._attributor = EnergyAttributor(self.device)  # not during the baseline: it would not measure as deployed
        self._attributor.start()
        self._enter("profile")
        if self.collectives.rank == 0:
            self._progress = _profile_progress(self._profiler.max_clocks)
        self._next_profile_clock()

    def _next_profile_clock(self) -> None:
        clock = self._profiler.next_clock()
        self._at_clock = 0
        if self._progress is not None:
            progress, task = self._progress
            measured = len(self._profiler.measured_clocks)
            progress.update(task, completed=measured, description=f"Perseus: profiling at {clock} MHz" if clock else
                            f"Perseus: profiled {measured} clocks")
        if clock is None:
            self._profile_done = True
            self._profile_clock = None
            self._clock = self._max_clock()
        else:
            self._profile_clock = self._clock = clock
        self._lock(self._clock)

    def _profile_step(self) -> None:
        if self._profile_done:
            return
        self._at_clock += 1
        per_clock = self.config.profiling.iterations_per_clock
        if self._at_clock < per_clock:
            return
        complete = self._record_profile()
        if complete or self._at_clock >= PROFILE_CLOCK_ITERATION_CAP * per_clock:
            self._next_profile_clock()

    def _record_profile(self) -> bool:
        """Feed the regression's estimates to the profiler; whether the current clock is measured well."""
        from perseus_lightning.runtime.profiler import KindMeasurement

        try:
            attribution = self._attributor.estimate()
        except ValueError:  # too few counter updates yet
            return False
        by_clock: dict[int, dict[tuple[int, str], KindMeasurement]] = {}
        for (stage, kind, clock), label in attribution.labels.items():
            if math.isfinite(label.power_w):
                by_clock.setdefault(clock, {})[(stage, kind)] = KindMeasurement(label.duration_s, label.energy_j, label.count)
        if self.config.blocking_power is None and math.isfinite(attribution.idle_power_w) and attribution.idle_power_w > 0:
            self._idle_power = attribution.idle_power_w
            self._profiler.set_p2p_power(attribution.idle_power_w)
        for clock, measurements in sorted(by_clock.items(), reverse=True):
            self._profiler.record(clock, measurements)
        current = [label for (_, _, clock), label in attribution.labels.items() if clock == self._profile_clock]
        return bool(current) and all(
            math.isfinite(label.power_w) and label.energy_stderr_j <= PROFILE_STDERR_TARGET * label.energy_j for label in current
        )

    # ------------------------------------------------------------------ planning
    def _plan(self) -> None:
        """Gather the profiles, plan on rank 0, broadcast the frontier, deploy its fastest plan."""
        self._enter("plan")
        self._stop_progress()
        try:  # a local failure must not skip the collectives below: the other ranks would wait forever
            self._attributor.stop()
            self._record_profile()
            local: dict[str, Any] = {
                "rows": self._profiler.rows(),
                "idle_power": self._idle_power,
                "clocks": list(self._profiler.measured_clocks),
            }
        except Exception as error:  # noqa: BLE001 - reported to every rank below
            local = {"error": f"rank {self.collectives.rank}: {type(error).__name__}: {error}"}
        everyone = self.collectives.all_gather_object(local)
        errors = [entry["error"] for entry in everyone if "error" in entry]
        result: dict[str, Any] = {"error": errors[0]} if errors else {}
        if self.collectives.rank == 0 and not errors:
            try:
                result = self._plan_on_rank_zero(everyone)
            except Exception as error:  # noqa: BLE001 - reported to every rank below
                result = {"error": f"{type(error).__name__}: {error}"}
        result = self.collectives.broadcast_object(result)
        if "error" in result:
            raise RuntimeError(f"planning failed: {result['error']}")
        self.frontier = Frontier.from_dict(result["frontier"], "<planned frontier>")
        self.profile = Profile.from_rows(result["profile_rows"], source="<in-situ profile>")
        self._deploy(self.frontier.fastest)

    def _plan_on_rank_zero(self, everyone: list[dict[str, Any]]) -> dict[str, Any]:
        from perseus_lightning.core.dag import InstructionDAG
        from perseus_lightning.core.planner import plan_frontier
        from perseus_lightning.core.schedules import from_actions

        assert self._layout is not None
        profile = Profile.from_rows(_mean_rows([entry["rows"] for entry in everyone]), source="<in-situ profile>")
        idle = [e["idle_power"] for e in everyone if math.isfinite(e["idle_power"]) and e["idle_power"] > 0]
        p2p_power = self.config.blocking_power or (float(np.median(idle)) if idle else profile_min_power(profile))
        dag = InstructionDAG.from_schedule(from_actions(self._layout.actions, name=self.schedule_name))
        frontier = plan_frontier(profile, dag, p2p_power)
        limit = self.config.max_slowdown * frontier.fastest.iteration_time
        frontier = Frontier(dag, p2p_power, (frontier.baseline_time, frontier.baseline_energy),
                            [p for p in frontier.plans if p.iteration_time <= limit * (1 + 1e-9)])
        payload = {
            "frontier": frontier.to_dict(),
            "profile_rows": profile.rows(),
            "p2p_power": p2p_power,
            "profiling_iterations": self.profiling_iterations,
            "measured_clocks": sorted({c for e in everyone for c in e["clocks"]}, reverse=True),
        }
        self._cache_store(payload)
        return payload

    # ------------------------------------------------------------------ deploying
    def _deploy(self, plan: FrontierPlan) -> None:
        """Deploy ``plan``: this rank's clock for each of its instructions (measured first if new)."""
        assert self.frontier is not None and self._layout is not None
        first = self.plan is None
        self.plan = plan
        dag = self.frontier.dag
        nodes = list(dag.rank_nodes(self._layout.pipeline_rank))
        order = [dag.instructions[n] for n in nodes]
        self._planned = {ins: int(plan.plan.frequencies[n]) for ins, n in zip(order, nodes)}
        if self.profile is not None:
            self._expected_forward = sum(
                self.profile.get(ins.stage, ins.kind).at(clock)[0] for ins, clock in self._planned.items() if ins.kind == FORWARD
            )
        self._next_clock = {ins: self._planned[order[(i + 1) % len(order)]] for i, ins in enumerate(order)}
        if self._setter is not None and order:
            self._setter.request(self._planned[order[0]])
        if first:
            self._window = None
            self._pace_samples = []
            self._enter("deploy" if self.deployed is None else "monitor")

    def _follow_stragglers(self, table: np.ndarray) -> None:
        """Share pipelines' slowdowns; deploy the plan for ``min(T', T*)`` while another pipeline straggles.

        Every rank sees the same table, so every rank's detector agrees on the episodes; only the
        straggler's own pipeline keeps its fastest plan.
        """
        if self.frontier is None or self.plan is None or self._calibration is None or self._layout is None:
            return  # nothing deployed (observe mode), so nothing to follow
        slowdown = self.detector.update(list(self._pipeline_slowdowns(table)))
        straggler = self.detector.straggler
        episode = self.straggler_episodes[-1] if self._episode_window is not None else None
        if episode is not None and (slowdown is None or straggler != episode.pipeline):
            self._end_episode(episode)
            episode = None
        target = None if slowdown is None or straggler == self._layout.pipeline else slowdown
        if slowdown is not None:
            plan = self.frontier.for_straggler(min(slowdown, self.config.max_slowdown) * self.frontier.fastest.iteration_time)
            if episode is None:
                self._episode_window = self._open_window()
                episode = StragglerEpisode(self.iteration, straggler, float(slowdown), plan.iteration_time)
                episode.peak_slowdown = float(slowdown)
                episode.predicted_saving_pct = self._predicted_extrinsic_saving(plan, slowdown)
                self.straggler_episodes.append(episode)
            elif slowdown != episode.slowdown:
                episode.slowdown, episode.plan_iteration_time_s = float(slowdown), plan.iteration_time
                episode.peak_slowdown = max(episode.peak_slowdown, float(slowdown))
                episode.predicted_saving_pct = self._predicted_extrinsic_saving(plan, slowdown)
        if target != self._straggler_slowdown:
            self._straggler_slowdown = target
            self._deploy(self.frontier.fastest if target is None else plan)

    def _end_episode(self, episode: StragglerEpisode) -> None:
        """Close the episode's measurement (collective: every rank ends it at the same iteration)."""
        measured, self._episode_window = self._measure(self._episode_window), None
        episode.end_iteration = self.iteration
        episode.iteration_time_s, episode.energy_j = measured.iteration_time_s, measured.energy_j

    def _predicted_extrinsic_saving(self, plan: FrontierPlan, slowdown: float) -> float:
        """The model's saving (%) of a non-straggler pipeline that runs ``plan`` instead of running its
        fastest plan and waiting, at blocking power, for a straggler ``slowdown`` times slower."""
        assert self.frontier is not None
        fastest, ranks = self.frontier.fastest, self.frontier.dag.num_ranks
        straggler_time = max(slowdown * fastest.iteration_time, plan.iteration_time)

        def waiting(point: FrontierPlan) -> float:
            return point.energy + self.frontier.p2p_power * ranks * (straggler_time - point.iteration_time)
        return 100.0 * (1.0 - waiting(plan) / waiting(fastest))

    def _pipeline_slowdowns(self, table: np.ndarray) -> np.ndarray:
        """How much slower each pipeline's GPUs compute than the fastest pipeline's.

        A rank's pace is its forward instructions' measured time over the time the profile gives
        them at the clocks deployed now (calibrated while deploying), so a pipeline that slows down
        on purpose keeps pace 1. Only forwards count: a DDP backward also waits for the gradient
        all-reduce, that is, for the straggler. A pipeline is as slow as its slowest rank. Slowdowns
        are relative to the fastest pipeline: a slowdown every pipeline shares makes nobody wait.
        """
        assert self._layout is not None and self._calibration is not None
        paces = table[:, 0] / self._calibration
        pipelines = np.array([max(paces[r] for r in ranks) for ranks in self._layout.pipelines])
        measured = pipelines[np.isfinite(pipelines)]
        return pipelines / np.min(measured) if measured.size else pipelines

    # -------------------------------------------------------------- measurement
    def _open_window(self) -> _Window:
        energy = self.device.energy_j() if self.device is not None else math.nan
        return _Window(time.perf_counter(), energy)

    def _measure(self, window: _Window | None) -> Measured:
        """Energy per iteration over ``window``, summed over every rank; the slowest rank's median
        iteration time (collective)."""
        assert window is not None and window.iterations > 0
        try:  # the gather below must happen on every rank
            energy = self.device.energy_j() - window.start_energy
        except Exception as error:  # noqa: BLE001
            self._fail(f"reading the GPU failed: {error}")
            energy = math.nan
        per_rank = self.collectives.all_gather_floats([energy / window.iterations, window.median_iteration_time()])
        return Measured(float(np.max(per_rank[:, 1])), float(np.sum(per_rank[:, 0])))

    def _close_metric_window(self, now: float) -> float:
        """Energy per iteration of this GPU over the last ~second of iterations (``nan`` until one closes)."""
        window = self._metric_window
        if window is None or self.device is None:
            return math.nan
        window.ends.append(now)
        if now - window.start_time < METRIC_PERIOD_S:
            return math.nan
        self._metric_window = None
        try:
            return (self.device.energy_j() - window.start_energy) / window.iterations
        except Exception as error:  # noqa: BLE001 - the exchange that follows must still happen
            self._fail(f"reading the GPU failed: {error}")
            return math.nan

    def _metrics(self, table: np.ndarray) -> dict[str, float]:
        metrics = {"perseus/phase": float(PHASES.index(self.phase)), "perseus/iteration_time_s": float(np.max(table[:, 5]))}
        if np.all(np.isfinite(table[:, 3])):
            metrics["perseus/energy_j"] = float(np.sum(table[:, 3]))
        if self.saving_pct is not None:
            metrics["perseus/saving_pct"] = self.saving_pct
        if self._layout is not None:
            for rank, label in enumerate(self._layout.labels):
                if math.isfinite(table[rank, 4]):
                    metrics[f"perseus/clock_mhz/{label}"] = float(table[rank, 4])
        return metrics

    # ------------------------------------------------------------ clocks, cache
    def _max_clock(self) -> int | None:
        return max(self.device.supported_clocks()) if self.device is not None else None

    def _lock(self, clock: int | None) -> None:
        """Request ``clock`` and wait until it is applied (between phases only)."""
        if self._setter is None or clock is None:
            return
        self._setter.request(clock)
        self._setter.flush(timeout=2.0)

    def _apply_emulated_straggler(self) -> None:
        emulation = self.config.emulation
        if self.collectives.rank not in emulation.straggler_ranks or not hasattr(self.device, "slowdown"):
            return
        window = emulation.straggler_iterations
        inside = window is None or window[0] <= self.iteration < window[1]
        self.device.slowdown = emulation.straggler_slowdown if inside else 1.0

    def _cache(self) -> Any:
        if self.config.cache_dir is None:
            return None
        from perseus_lightning.runtime.cache import PlanCache

        return PlanCache(self.config.cache_dir)

    def _cache_key(self) -> Any:
        from perseus_lightning.runtime.cache import CacheKey

        assert self._layout is not None
        actions = hashlib.sha256(json.dumps(self._layout.actions).encode()).hexdigest()[:12]
        return CacheKey(
            model_signature=self._layout.signature,
            gpu_name=self.device.name if self.device is not None else "unknown",
            schedule=f"{self.schedule_name}@{actions}",
            microbatches=1 + max(parse_action(a)[0].microbatch for actions in self._layout.actions for a in actions),
            layout=f"pp{len(self._layout.pipelines[0])}-dp{len(self._layout.pipelines)}",
        )

    def _cache_lookup(self) -> dict[str, Any] | None:
        """Rank 0 reads the cache; every rank gets the payload (or ``None``)."""
        payload: Any = None
        if self.collectives.rank == 0:
            cache = self._cache()
            if cache is not None:
                try:
                    payload = cache.load(self._cache_key())
                except PerseusInputError as error:  # a cache from another model, or a corrupt one
                    payload = error
        payload = self.collectives.broadcast_object(payload)
        if isinstance(payload, PerseusInputError):
            raise payload
        if payload is not None:
            self.profiling_iterations = int(payload.get("profiling_iterations", 0))
        return payload

    def _cache_store(self, payload: dict[str, Any]) -> None:
        cache = self._cache()
        if cache is None:
            return
        try:
            path = cache.store(self._cache_key(), payload)
            logger.info("Perseus: profile and frontier cached in %s", path)
        except Exception as error:  # noqa: BLE001
            self._warn(f"could not write the Perseus cache ({error}); the next run profiles again")

    def _stop_progress(self) -> None:
        if self._progress is not None:
            self._progress[0].stop()
            self._progress = None

    # ----------------------------------------------------------------- failures
    def _warn(self, message: str) -> None:
        if self._warn_callback is not None:
            self._warn_callback(f"Perseus: {message}")
        elif self.collectives.rank == 0:
            warnings.warn(f"Perseus: {message}", PerseusGPUWarning, stacklevel=3)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self._warn(message)

    def _fail(self, message: str, collective: bool = True) -> None:
        """Restore the clocks and turn Perseus off. With ``collective`` (a local failure), this rank
        still takes part in the next per-iteration exchange, where every rank learns of it."""
        logger.warning("Perseus rank %d: %s", self.collectives.rank, message)
        self._warn_once(f"fail:{message}", f"{message}. Training continues without Perseus (clocks restored).")
        self._failed = True
        if self._computing is not None:
            self._computing.__exit__(None, None, None)
            self._computing = None
        if self._setter is not None:
            self._setter.close()
        if not collective:
            self.phase = "off"
            self.close()


def _layout_of(everyone: Sequence[dict[str, Any]], rank: int) -> _Layout:
    """Pipelines from every rank's observed stages: ranks running the same stages are data-parallel
    replicas; the ``k``-th replica of each stage set forms pipeline ``k``."""
    replicas: dict[tuple[int, ...], list[int]] = {}
    for r, entry in enumerate(everyone):
        replicas.setdefault(tuple(entry["stages"]), []).append(r)
    stage_sets = sorted(replicas, key=lambda stages: stages[0] if stages else -1)
    counts = {len(ranks) for ranks in replicas.values()}
    if len(counts) != 1:
        raise RuntimeError(
            f"ranks hold unequal numbers of replicas per stage set ({ {s: len(r) for s, r in replicas.items()} }). "
            f"Fix: use the same pipeline on every data-parallel replica."
        )
    pipelines = [[replicas[stages][k] for stages in stage_sets] for k in range(counts.pop())]
    pipeline = next(k for k, ranks in enumerate(pipelines) if rank in ranks)
    labels = []
    for r in range(len(everyone)):
        k = next(k for k, ranks in enumerate(pipelines) if r in ranks)
        stages = "+".join(str(s) for s in everyone[r]["stages"])
        labels.append(f"stage{stages}" if len(pipelines) == 1 else f"pipeline{k}/stage{stages}")
    signature = hashlib.sha256(json.dumps([e["signature"] for e in everyone]).encode()).hexdigest()[:16]
    return _Layout(
        pipelines=pipelines,
        pipeline=pipeline,
        pipeline_rank=pipelines[pipeline].index(rank),
        actions=[everyone[r]["actions"] for r in pipelines[0]],
        signature=signature,
        labels=labels,
    )


def _mean_rows(per_rank: Sequence[Sequence[Sequence[Any]]]) -> list[tuple[int, str, int, float, float]]:
    """Average the data-parallel replicas' profile rows of each (stage, kind, clock) they all measured."""
    sums: dict[tuple[int, str, int], list[float]] = {}
    counts: dict[tuple[int, str, int], int] = {}
    for rows in per_rank:
        for stage, kind, clock, t, e in rows:
            key = (int(stage), str(kind), int(clock))
            total = sums.setdefault(key, [0.0, 0.0])
            total[0] += float(t)
            total[1] += float(e)
            counts[key] = counts.get(key, 0) + 1
    replicas: dict[tuple[int, str], int] = {}
    for (stage, kind, _), n in counts.items():
        replicas[(stage, kind)] = max(replicas.get((stage, kind), 0), n)
    return [
        (stage, kind, clock, t / counts[(stage, kind, clock)], e / counts[(stage, kind, clock)])
        for (stage, kind, clock), (t, e) in sums.items()
        if counts[(stage, kind, clock)] == replicas[(stage, kind)]
    ]


def profile_min_power(profile: Any) -> float:
    """A conservative blocking power when none was measured: half the lowest compute power."""
    return 0.5 * min(float(np.min(p.energy / p.time)) for _, p in profile.items())


def _profile_progress(clocks: int) -> tuple[Any, Any]:
    """A progress bar of the clocks profiled so far (rank 0 shows it)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    task = progress.add_task("Perseus: profiling", total=clocks)
    progress.start()
    return progress, task
