"""Rounding one deadline's LP solution to a plan: the per-deadline work of the frontier sweep.

:class:`Rounder` turns the relaxation's durations at a deadline into the cheapest plan it finds
that finishes by it: every instruction at its cheapest clock no slower than its relaxed duration,
and relax-and-fix's mix of hull vertices (:mod:`perseus_lightning.core.relax_and_fix`), each with
its slack reclaimed backward and by value (:mod:`perseus_lightning.core.slack`). Where the best of
them is still more than ``JUMP_ABOVE`` above the LP bound, hull jumps move instructions off clocks
above their convex hull (:mod:`perseus_lightning.core.hull_jumps`), and a plan then within
``SEARCH_BELOW`` of the bound gets neighbourhood search (:mod:`perseus_lightning.core.neighbourhood`).

A plan still above its target may then get *restarts*: the LP is degenerate, its optimum at a deadline
is a whole face, and roundings of different vertices of that face end up far apart (A40, 8 x 12,
1.004 ``T_min``: the warm-started vertex rounds to 0.43 % above the bound, the one solved afresh to
0.35 %). :class:`Rounder` rounds the job's ``restarts`` more of them (:meth:`~perseus_lightning.core.relaxation.SegmentLP.other_optima`)
the same way, and the optimum of the LP with window floors
(:func:`~perseus_lightning.core.strengthened_bound.window_floors`: rows no plan violates, which
rule out some time allocations that no plan can make; at 1.008 ``T_min`` there, 0.28 -> 0.23 %),
and keeps the cheapest plan.

Deadlines round independently of each other once their LP is solved, so :class:`RoundingPool`
can round them on worker processes while the planner solves the next LPs (warm-started, in order).
Results come back in the order the jobs were given, and are the same as in one process.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from types import TracebackType

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.hull_jumps import jump_to_hull
from perseus_lightning.core.neighbourhood import WINDOW as SEARCH_WINDOW
from perseus_lightning.core.neighbourhood import search_neighbourhood
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.relax_and_fix import relax_and_fix
from perseus_lightning.core.relaxation import HullRelaxation
from perseus_lightning.core.simulator import earliest_schedule
from perseus_lightning.core.slack import CHEAPER, option_durations, plan_energy, reclaim_slack, reclaim_slack_by_value
from perseus_lightning.core.strengthened_bound import window_floors

log = logging.getLogger(__name__)

JUMP_ABOVE = 0.002
"""Relative gap to the LP bound above which a deadline's best plan gets hull jumps
(:mod:`perseus_lightning.core.hull_jumps`): the target for every plan."""
JUMP_ABOVE_AT_T_MIN = 0.001
"""The same for the zero-slowdown deadline, ``T_min``: its own, tighter target."""
RELAX_AND_FIX_MAX_NODES = 8192
"""Pipelines of up to this many instructions get relax-and-fix's rounding too (say 8 x 512 or
16 x 256). At 32 x 256 (16,384) it cost 0.37 s a deadline, 13 s of the frontier's 37 s on 2
workers, for plans 0.09 % cheaper on average: too much of the 60 s budget on a slow day."""
ROUNDING_TOLERANCE = 1e-9
"""Relative float noise by which a plan may end past a deadline (or an LP duration) and still count as meeting it."""
SEARCH_BELOW = 0.003
"""Relative gap to the LP bound up to which a plan still above ``JUMP_ABOVE`` gets neighbourhood
search (further above, on non-convex profiles, the relaxation is loose and local moves gain little)."""
SEARCH_PASSES = 4
"""Most neighbourhood-search passes per plan; they stop earlier once the plan is within ``JUMP_ABOVE``
of the bound, or after a pass that saved less than ``SEARCH_GAIN``."""
SEARCH_GAIN = 1e-5
"""Relative energy a neighbourhood-search pass must save for another to follow (0.001 points of gap:
on the A40 profile, passes after the first saved 0.0000-0.0007 points each)."""


@dataclass(frozen=True)
class RoundingJob:
    """One deadline's LP solution, to be rounded to a plan."""

    deadline: float
    durations: np.ndarray
    """The relaxation's per-node durations at ``deadline``."""
    lower_bound: float | None
    """The LP bound at ``deadline`` (``None`` for the periodic LP: then no search or restarts, and
    hull jumps only for the zero-slowdown plan)."""
    starts: tuple[np.ndarray, ...] = ()
    """More starting plans (option indices), e.g. a faster neighbour's plan."""
    zero_slowdown: bool = False
    """Whether ``deadline`` is ``T_min``: the zero-slowdown plan, held to a tighter target (``JUMP_ABOVE_AT_T_MIN``)."""
    restarts: int = 0
    """Vertices of the LP's optimal face to round too if the plan stays above its target
    (:meth:`~perseus_lightning.core.relaxation.SegmentLP.other_optima`)."""


class Rounder:
    """Rounds LP solutions of one DAG to plans (option indices per node)."""

    def __init__(self, dag: InstructionDAG, options: list[ClockOptions], idle_power: float) -> None:
        self.dag, self.options, self.idle_power = dag, options, idle_power
        self.fastest = np.zeros(dag.num_nodes, dtype=np.int64)
        self._relaxation: HullRelaxation | None = None
        """This process's own LP, for the restarts (built on first use, never pickled)."""
        self._floored: HullRelaxation | None = None
        """The same LP with window floors, for the restarts (built on first use, never pickled)."""

    def __getstate__(self) -> dict[str, object]:
        return {**self.__dict__, "_relaxation": None, "_floored": None}

    def round(self, job: RoundingJob) -> np.ndarray:
        """The cheapest plan found for ``job`` that finishes by its deadline (all-max-clock's
        reclaimed plan if no start does: the LP's durations end past it by float noise)."""
        plan, energy = self._rounded(job.durations, job.deadline, job.starts)
        if job.lower_bound is None:  # the periodic LP bounds nothing: only the zero-slowdown plan gets jumps
            return self._jumped(plan, energy, job.deadline)[0] if job.zero_slowdown else plan
        plan, energy = self._improved(plan, energy, job)
        if job.restarts and energy > self._target(job):
            plan, energy = self._restarted(plan, energy, job)
        return plan

    def _target(self, job: RoundingJob) -> float:
        """The energy above which the job's plan gets hull jumps (and restarts)."""
        assert job.lower_bound is not None
        return job.lower_bound * (1 + (JUMP_ABOVE_AT_T_MIN if job.zero_slowdown else JUMP_ABOVE))

    def _rounded(self, durations: np.ndarray, deadline: float, starts: Sequence[np.ndarray] = ()) -> tuple[np.ndarray, float]:
        """The cheapest of ``starts`` and the roundings of ``durations``, reclaimed, with its energy."""
        limits = (durations * (1 + ROUNDING_TOLERANCE)).tolist()
        starts = [np.array([opt.cheapest_within(d) for opt, d in zip(self.options, limits)]), *starts]
        if self.dag.num_nodes <= RELAX_AND_FIX_MAX_NODES:
            starts.append(relax_and_fix(self.dag, self.options, durations, deadline))
        reclaimed = [r for c in starts for r in self.reclaimed(c, deadline)]
        if not reclaimed:
            reclaimed = self.reclaimed(self.fastest, deadline)
        energies = [self.energy(c) for c in reclaimed]
        best = int(np.argmin(energies))
        return reclaimed[best], energies[best]

    def _improved(self, plan: np.ndarray, energy: float, job: RoundingJob) -> tuple[np.ndarray, float]:
        """``plan`` after hull jumps, if above its target, then search, if within ``SEARCH_BELOW``."""
        assert job.lower_bound is not None
        if energy > self._target(job):
            plan, energy = self._jumped(plan, energy, job.deadline)
        if job.lower_bound * (1 + JUMP_ABOVE) < energy <= job.lower_bound * (1 + SEARCH_BELOW):
            plan, energy = self._searched(plan, energy, job.deadline, job.lower_bound)
        return plan, energy

    def _restarted(self, plan: np.ndarray, energy: float, job: RoundingJob) -> tuple[np.ndarray, float]:
        """The cheapest of ``plan`` and the roundings of the LP with window floors' optimum and of the
        job's ``restarts`` vertices of the LP's optimal face at its deadline (the first solved afresh),
        each improved as ``plan`` was."""
        if self._relaxation is None or self._floored is None:
            p2p_power = self.idle_power / self.dag.num_ranks
            self._relaxation = HullRelaxation(self.dag, self.options, p2p_power)
            self._floored = HullRelaxation(self.dag, self.options, p2p_power)
            self._floored.add_window_floors(window_floors(self.dag, self.options))
        seed = int(np.float64(job.deadline).view(np.uint64))  # the same plans with workers or without
        # The same durations round to the same plan: skip those rounded already (at T_min, the first
        # vertex is the sweep's own, whose LP solve there was not warm-started either).
        rounded = set() if job.starts else {job.durations.tobytes()}
        try:
            floored = [self._floored.solve_afresh(job.deadline).durations]
        except ValueError:  # not solved to optimality (HiGHS's tolerances): the restarts go on without it
            floored = []
        for durations in [*floored, *self._relaxation.other_optima(job.deadline, job.restarts, seed)]:
            if durations.tobytes() in rounded:
                continue
            rounded.add(durations.tobytes())
            other, other_energy = self._improved(*self._rounded(durations, job.deadline), job)
            if other_energy < energy * (1 - CHEAPER):
                plan, energy = other, other_energy
        return plan, energy

    def energy(self, choice: np.ndarray) -> float:
        """The iteration energy of option indices ``choice`` (what :func:`simulate` computes, from the options)."""
        _, end = earliest_schedule(self.dag, option_durations(self.options, choice))
        return plan_energy(self.options, choice, self.idle_power, end)

    def reclaimed(self, choice: np.ndarray, deadline: float) -> list[np.ndarray]:
        """``choice`` with its slack reclaimed backward (latest instructions first) and by value
        (where it saves the most per second); none if ``choice`` misses ``deadline``."""
        backward = reclaim_slack(self.dag, self.options, choice, deadline)
        if backward is None:
            return []
        by_value = reclaim_slack_by_value(self.dag, self.options, choice, deadline)
        return [backward] if by_value is None else [backward, by_value]

    def _jumped(self, plan: np.ndarray, energy: float, deadline: float) -> tuple[np.ndarray, float]:
        """``plan`` after hull jumps (:func:`~perseus_lightning.core.hull_jumps.jump_to_hull`), and
        reclaimed: the cheapest of them, with its energy (``plan`` if none is cheaper)."""
        jumped = jump_to_hull(self.dag, self.options, plan, deadline, self.idle_power)
        for candidate in (jumped, *self.reclaimed(jumped, deadline)):
            candidate_energy = self.energy(candidate)
            if candidate_energy < energy * (1 - CHEAPER):
                plan, energy = candidate, candidate_energy
        return plan, energy

    def _searched(self, plan: np.ndarray, energy: float, deadline: float, lower_bound: float) -> tuple[np.ndarray, float]:
        """``plan`` after neighbourhood-search passes (windows aligned, then shifted by half a
        window, in turn), each reclaimed; the cheapest plan seen."""
        for number in range(SEARCH_PASSES):
            if energy <= lower_bound * (1 + JUMP_ABOVE):
                break
            offset = SEARCH_WINDOW // 2 if number % 2 else 0
            searched = search_neighbourhood(self.dag, self.options, plan, deadline, self.idle_power, offset=offset)
            candidates = [searched, *self.reclaimed(searched, deadline)]
            energies = [self.energy(c) for c in candidates]
            best = int(np.argmin(energies))
            gain = 1 - energies[best] / energy
            if gain > CHEAPER:
                plan, energy = candidates[best], energies[best]
            if gain < SEARCH_GAIN:
                break
        return plan, energy



def available_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class RoundingPool:
    """Rounds jobs with ``rounder`` on ``workers`` processes (in this process if ``workers`` is 1).

    Workers are spawned (fresh interpreters, so a parent with threads, e.g. torch's, is safe) and
    receive the rounder once; a script that plans with workers needs the usual ``if __name__ ==
    "__main__":`` guard. If the pool cannot start or a worker dies, the rest is rounded in this
    process, with one warning. Use it as a context manager: leaving stops the workers.
    """

    def __init__(self, rounder: Rounder, workers: int = 1) -> None:
        self.rounder = rounder
        self._executor: ProcessPoolExecutor | None = None
        self._failed = False
        if workers > 1:
            try:
                self._executor = ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context("spawn"), initializer=_adopt, initargs=(rounder,)
                )
            except (OSError, ImportError) as error:  # e.g. no semaphores (/dev/shm) in a sandbox
                self._fall_back(error)

    def map(self, jobs: Iterable[RoundingJob]) -> Iterator[tuple[RoundingJob, np.ndarray]]:
        """Each job with its plan, in order. Every job is taken from ``jobs`` (and submitted to a
        worker as it comes) before the first plan is handed out, with workers or without."""
        if self._executor is None:
            for job in list(jobs):
                yield job, self.rounder.round(job)
            return
        submitted = [(job, self._submit(job)) for job in jobs]
        for job, future in submitted:
            yield job, self._result(job, future)

    def _submit(self, job: RoundingJob) -> Future[np.ndarray] | None:
        if self._executor is None:
            return None
        try:
            return self._executor.submit(_round, job)
        except (BrokenProcessPool, RuntimeError) as error:
            self._fall_back(error)
            return None

    def _result(self, job: RoundingJob, future: Future[np.ndarray] | None) -> np.ndarray:
        if future is not None:
            try:
                return future.result()
            except BrokenProcessPool as error:
                self._fall_back(error)
        return self.rounder.round(job)

    def _fall_back(self, error: BaseException) -> None:
        """Warn (once) and round everything left in this process."""
        if not self._failed:
            log.warning("planner worker processes failed (%s: %s); planning in this process instead", type(error).__name__, error)
            self._failed = True
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def close(self, wait: bool = True) -> None:
        """Stop the workers; without ``wait``, return at once (a worker ends its job, then exits)."""
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> RoundingPool:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close(wait=kind is None)  # e.g. Ctrl-C: leave now


_worker_rounder: Rounder | None = None
"""The rounder of this worker process (set once, when the pool starts it)."""


def _adopt(rounder: Rounder) -> None:
    """Start a worker: keep ``rounder``, leave Ctrl-C to the parent (which stops the pool), and
    exit as soon as the parent does, however it ends (its pool's queues would keep us waiting)."""
    global _worker_rounder
    _worker_rounder = rounder
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, name="perseus-parent-watch", daemon=True).start()


def _exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is not None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(1)


def _round(job: RoundingJob) -> np.ndarray:
    assert _worker_rounder is not None, "worker started without a rounder"
    return _worker_rounder.round(job)
