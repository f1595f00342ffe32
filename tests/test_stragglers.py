"""Straggler detection: episodes with patience and hysteresis, value updates, recovery, announcements."""

from __future__ import annotations

import json
import math
import random

import pytest

from perseus_lightning.core.errors import PerseusInputError
from perseus_lightning.runtime.stragglers import StragglerDetector

NAN = float("nan")


def feed(detector: StragglerDetector, rows: list[list[float]]) -> list[float | None]:
    return [detector.update(row) for row in rows]


def test_episode_starts_after_patience_consecutive_slow_iterations() -> None:
    detector = StragglerDetector(threshold=0.05, patience=3)
    assert feed(detector, [[1.0, 1.3, 1.0]] * 2) == [None, None]
    assert not detector.active and detector.straggler is None
    assert detector.update([1.0, 1.3, 1.0]) == pytest.approx(1.3)
    assert detector.active and detector.straggler == 1 and detector.slowdown == pytest.approx(1.3)


def test_interrupted_run_restarts_the_count() -> None:
    detector = StragglerDetector(threshold=0.05, patience=3)
    assert feed(detector, [[1.2, 1.0], [1.2, 1.0], [1.04, 1.0], [1.2, 1.0], [1.2, 1.0]]) == [None] * 5
    assert detector.update([1.2, 1.0]) == pytest.approx(1.2)


def test_value_is_the_median_of_the_last_patience_reports() -> None:
    detector = StragglerDetector(threshold=0.05, patience=3)
    assert feed(detector, [[1.0, 1.1], [1.0, 1.5], [1.0, 1.2]])[-1] == pytest.approx(1.2)


def test_the_slowest_due_pipeline_is_followed() -> None:
    detector = StragglerDetector(threshold=0.05, patience=2)
    assert feed(detector, [[1.1, 1.0, 1.4], [1.1, 1.0, 1.4]])[-1] == pytest.approx(1.4)
    assert detector.straggler == 2


def test_just_at_the_threshold_is_not_a_straggler() -> None:
    detector = StragglerDetector(threshold=0.05, patience=2)
    assert feed(detector, [[1.0, 1.05]] * 10) == [None] * 10


def test_hysteresis_keeps_the_episode_between_recovery_and_threshold() -> None:
    detector = StragglerDetector(threshold=0.05, patience=3, recovery=0.02)
    feed(detector, [[1.0, 1.3]] * 3)
    # The straggler eases to 1.03: below the start threshold, above recovery: the episode goes on,
    # following the new pace once the median moves.
    values = feed(detector, [[1.0, 1.03]] * 10)
    assert all(v is not None for v in values)
    assert values[0] == pytest.approx(1.3) and values[-1] == pytest.approx(1.03)
    assert detector.active and detector.straggler == 1


def test_value_updates_only_beyond_half_the_threshold() -> None:
    detector = StragglerDetector(threshold=0.1, patience=3)
    feed(detector, [[1.0, 1.3]] * 3)
    assert feed(detector, [[1.0, 1.34]] * 5)[-1] == pytest.approx(1.3)  # moved 0.04 < 0.05: kept
    assert feed(detector, [[1.0, 1.4]] * 2)[-1] == pytest.approx(1.4)  # median moved 0.1: updated
    assert feed(detector, [[1.0, 1.2]] * 2)[-1] == pytest.approx(1.2)  # and back down


def test_a_new_slowest_pipeline_takes_over() -> None:
    detector = StragglerDetector(threshold=0.05, patience=2)
    feed(detector, [[1.0, 1.2, 1.0]] * 2)
    assert feed(detector, [[1.5, 1.2, 1.0]] * 2)[-1] == pytest.approx(1.5)
    assert detector.straggler == 0


def test_recovery_needs_every_pipelines_median_below_recovery() -> None:
    detector = StragglerDetector(threshold=0.05, patience=3, recovery=0.02)
    feed(detector, [[1.0, 1.0, 1.3]] * 3)
    # The straggler recovers; the others, running the slower plan, still report ~1.0. One calm
    # report is not enough (the straggler's median is still 1.3) ...
    assert detector.update([1.0, 1.0, 1.01]) == pytest.approx(1.3)
    # ... and one noisy spike neither ends the episode nor restarts a count.
    assert detector.update([1.0, 1.0, 1.4]) == pytest.approx(1.3)
    assert detector.update([1.0, 1.0, 1.0]) is None  # the straggler's median is 1.0 now
    assert not detector.active and detector.straggler is None and detector.slowdown is None


def test_a_pipeline_above_recovery_keeps_the_episode_on() -> None:
    detector = StragglerDetector(threshold=0.05, patience=3, recovery=0.02)
    feed(detector, [[1.0, 1.0, 1.3]] * 3)
    # The straggler recovers but another pipeline's median stays at 1.03 >= 1 + recovery.
    values = feed(detector, [[1.0, 1.03, 1.0]] * 5)
    assert all(v is not None for v in values) and values[-1] == pytest.approx(1.03)
    assert detector.straggler == 1
    assert feed(detector, [[1.0, 1.0, 1.0]] * 2)[-1] is None


def test_a_new_episode_can_follow_a_finished_one() -> None:
    detector = StragglerDetector(threshold=0.05, patience=2)
    feed(detector, [[1.3, 1.0]] * 2 + [[1.0, 1.0]] * 2)
    assert not detector.active
    assert feed(detector, [[1.0, 1.25]] * 2) == [None, pytest.approx(1.25)]
    assert detector.straggler == 1


def test_noise_neither_starts_nor_re_plans() -> None:
    rng = random.Random(0)
    detector = StragglerDetector(threshold=0.05, patience=3)
    # Healthy pipelines with +-3 % noise and occasional single spikes never start an episode.
    for i in range(500):
        row = [1.0 + rng.uniform(-0.03, 0.03) for _ in range(4)]
        if i % 37 == 0:
            row[rng.randrange(4)] = 1.4
        assert detector.update(row) is None
    # A real 1.3x straggler whose reports wander less than threshold / 2: one start, and the
    # value stays put (no re-planning on noise).
    values = []
    for _ in range(300):
        row = [1.0 + rng.uniform(-0.03, 0.03) for _ in range(4)]
        row[2] = 1.3 + rng.uniform(-0.012, 0.012)
        values.append(detector.update(row))
    followed = [v for v in values if v is not None]
    assert len(followed) >= 297 and len(set(followed)) == 1 and abs(followed[0] - 1.3) < 0.02


def test_nan_reports_are_skipped() -> None:
    detector = StragglerDetector(threshold=0.05, patience=3)
    assert feed(detector, [[1.0, 1.3], [1.0, NAN], [NAN, NAN], [1.0, 1.3]]) == [None] * 4
    assert detector.update([1.0, 1.3]) == pytest.approx(1.3)  # NaNs neither broke nor extended the run
    # During an episode an all-NaN iteration does not count as calm.
    assert detector.update([1.0, 1.0]) is not None
    assert detector.update([NAN, NAN]) is not None
    assert detector.update([1.0, 1.0]) is None


def test_single_pipeline_never_straggles() -> None:
    detector = StragglerDetector(patience=1)
    assert feed(detector, [[2.0]] * 10) == [None] * 10


def test_announcement_overrides_detection_until_cleared() -> None:
    detector = StragglerDetector(threshold=0.05, patience=2)
    detector.announce(1.25)
    assert detector.active and detector.slowdown == 1.25 and detector.straggler is None
    assert detector.update([1.0, 1.0]) == 1.25
    assert feed(detector, [[1.0, 1.6]] * 2) == [1.25, 1.25]  # detection keeps running underneath
    detector.announce(None)
    assert detector.slowdown == pytest.approx(1.6) and detector.straggler == 1
    assert feed(detector, [[1.0, 1.0]] * 2)[-1] is None
    detector.announce(1.1)
    assert StragglerDetector().update([1.0]) is None
    single = StragglerDetector()
    single.announce(1.1)
    assert single.update([1.0]) == 1.1  # the infrastructure's word holds even for one pipeline


@pytest.mark.parametrize("value", [0.9, NAN, math.inf])
def test_bad_announcements(value: float) -> None:
    with pytest.raises(PerseusInputError, match="announced straggler slowdown"):
        StragglerDetector().announce(value)


def test_state_dict_round_trip_mid_episode() -> None:
    rows = [[1.0, 1.3, 1.0]] * 3 + [[1.0, 1.02, 1.0]] * 2
    original = StragglerDetector(threshold=0.05, patience=3)
    feed(original, rows)
    original.announce(1.4)
    state = json.loads(json.dumps(original.state_dict()))  # JSON-ready, as in a checkpoint
    restored = StragglerDetector(threshold=0.05, patience=3)
    restored.load_state_dict(state)
    assert restored.state_dict() == original.state_dict()
    for detector in (original, restored):
        detector.announce(None)
    continuation = [[1.0, 1.0, 1.0]] * 3 + [[1.2, 1.0, 1.0]] * 4
    assert feed(restored, continuation) == feed(original, continuation)
    assert restored.straggler == original.straggler == 0


def test_invalid_arguments() -> None:
    with pytest.raises(PerseusInputError, match="threshold"):
        StragglerDetector(threshold=0)
    with pytest.raises(PerseusInputError, match="recovery"):
        StragglerDetector(threshold=0.05, recovery=0.05)
    with pytest.raises(PerseusInputError, match="patience"):
        StragglerDetector(patience=0)
    detector = StragglerDetector()
    with pytest.raises(PerseusInputError, match="no slowdowns"):
        detector.update([])
    detector.update([1.0, 1.0])
    with pytest.raises(PerseusInputError, match="3 slowdowns given, earlier 2"):
        detector.update([1.0, 1.0, 1.0])
