"""Detect a straggling data-parallel pipeline (extrinsic energy bloat).

Every iteration, each pipeline reports its *slowdown*: its own compute time divided by the time
its deployed plan is expected to take. A throttled pipeline reports, say, 1.3; a pipeline that
deliberately runs a slower plan to match the straggler still reports about 1.0. The detector turns
these noisy reports into straggler *episodes* with hysteresis, so that the job re-plans only when
the straggler really appears, changes or goes away:

- an episode starts when one pipeline reports more than ``1 + threshold`` for ``patience``
  consecutive iterations; its slowdown is the median of that pipeline's last ``patience`` reports;
- during an episode the slowdown follows the slowest pipeline's median, changing only when that
  moves by more than ``threshold / 2``;
- the episode ends when the median of every pipeline's last ``patience`` reports is below
  ``1 + recovery``, so one noisy report neither ends an episode nor keeps it going.

The infrastructure may also :meth:`~StragglerDetector.announce` a straggler, which overrides
detection until cleared.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from typing import Any

from perseus_lightning.core.errors import PerseusInputError


class StragglerDetector:
    """Straggler episodes from per-iteration pipeline slowdowns (see the module docstring)."""

    def __init__(self, threshold: float = 0.05, patience: int = 3, recovery: float = 0.02) -> None:
        if not threshold > 0:
            raise PerseusInputError(f"straggler threshold is {threshold}. Fix: give a positive fraction, e.g. 0.05.")
        if not 0 <= recovery < threshold:
            raise PerseusInputError(
                f"straggler recovery is {recovery}, threshold {threshold}. Fix: give 0 <= recovery < threshold, e.g. 0.02."
            )
        if patience < 1:
            raise PerseusInputError(f"straggler patience is {patience}. Fix: give at least 1 iteration.")
        self.threshold = threshold
        self.patience = patience
        self.recovery = recovery
        self._history: list[deque[float]] = []
        self._streaks: list[int] = []
        self._straggler: int | None = None
        self._value: float | None = None
        self._announced: float | None = None

    @property
    def active(self) -> bool:
        """Whether a straggler episode is on (detected or announced)."""
        return self.slowdown is not None

    @property
    def slowdown(self) -> float | None:
        """The straggler slowdown to follow, or ``None`` when there is no straggler."""
        return self._announced if self._announced is not None else self._value

    @property
    def straggler(self) -> int | None:
        """The straggling pipeline's index; ``None`` when there is none or it was announced."""
        return None if self._announced is not None else self._straggler

    def update(self, slowdowns: Sequence[float]) -> float | None:
        """Record one iteration's slowdown of every pipeline; returns :attr:`slowdown`: the
        straggler slowdown to follow (at least 1), or ``None`` outside a straggler episode.

        A non-finite slowdown (NaN: not measured) is skipped: it neither extends nor breaks that
        pipeline's run. A single pipeline never counts as a straggler.
        """
        if not self._history:
            if not slowdowns:
                raise PerseusInputError("no slowdowns given. Fix: pass one slowdown per data-parallel pipeline.")
            self._history = [deque(maxlen=self.patience) for _ in slowdowns]
            self._streaks = [0] * len(slowdowns)
        elif len(slowdowns) != len(self._history):
            raise PerseusInputError(
                f"{len(slowdowns)} slowdowns given, earlier {len(self._history)}. "
                f"Fix: pass one slowdown per data-parallel pipeline, every iteration."
            )
        measured = {i: float(s) for i, s in enumerate(slowdowns) if math.isfinite(s)}
        for i, slowdown in measured.items():
            self._history[i].append(slowdown)
            self._streaks[i] = self._streaks[i] + 1 if slowdown > 1 + self.threshold else 0
        if len(slowdowns) > 1 and measured:
            if self._value is None:
                self._start_episode()
            else:
                self._follow_episode()
        return self.slowdown

    def announce(self, slowdown: float | None) -> None:
        """The infrastructure reports a straggler ``slowdown`` times slower (``None``: clear the report)."""
        if slowdown is not None and not (math.isfinite(slowdown) and slowdown >= 1):
            raise PerseusInputError(f"announced straggler slowdown is {slowdown}. Fix: give a number >= 1, or None to clear.")
        self._announced = None if slowdown is None else float(slowdown)

    def state_dict(self) -> dict[str, Any]:
        """The detector's state (JSON-ready), for checkpoints."""
        return {
            "history": [list(h) for h in self._history],
            "streaks": list(self._streaks),
            "straggler": self._straggler,
            "slowdown": self._value,
            "announced": self._announced,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        self._history = [deque(map(float, h), maxlen=self.patience) for h in state["history"]]
        self._streaks = [int(s) for s in state["streaks"]]
        self._straggler = state["straggler"]
        self._value = state["slowdown"]
        self._announced = state["announced"]

    def _median(self, pipeline: int) -> float:
        return statistics.median(self._history[pipeline])

    def _start_episode(self) -> None:
        due = [i for i, streak in enumerate(self._streaks) if streak >= self.patience]
        if due:
            self._straggler = max(due, key=self._median)
            self._value = self._median(self._straggler)

    def _follow_episode(self) -> None:
        medians = {i: self._median(i) for i, h in enumerate(self._history) if h}
        if all(m < 1 + self.recovery for m in medians.values()):
            self._straggler = self._value = None
            return
        slowest = max(medians, key=medians.__getitem__)
        target = max(medians[slowest], 1.0)
        if abs(target - self._value) > self.threshold / 2:
            self._straggler, self._value = slowest, target
