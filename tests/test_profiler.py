"""The in-situ clock profiler: which clocks it measures, when it stops, and the profile it builds."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import ProfileError
from perseus_lightning.core.gpu_model import A100_LIKE, example_profile
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.runtime.profiler import EARLY_STOP_RISES, RISE_MARGIN, ClockProfiler, KindMeasurement

BLOCKING_POWER = A100_LIKE.blocking_power


def measurements(truth: Profile, clock: int, noise: float = 0.0, rng: np.random.Generator | None = None
                 ) -> dict[tuple[int, str], KindMeasurement]:
    """Every (stage, kind) of ``truth`` at ``clock``, time and energy off by relative noise ``noise``."""
    result = {}
    for key, prof in truth.items():
        time, energy = prof.at(clock)
        if noise:
            assert rng is not None
            time, energy = time * (1 + noise * rng.standard_normal()), energy * (1 + noise * rng.standard_normal())
        result[key] = KindMeasurement(time, energy, 12)
    return result


def sweep(profiler: ClockProfiler, truth: Profile, noise: float = 0.0, seed: int = 0) -> list[int]:
    """Measure every clock the profiler asks for until it is done; the clocks, in order."""
    rng = np.random.default_rng(seed)
    asked = []
    while (clock := profiler.next_clock()) is not None:
        asked.append(clock)
        profiler.record(clock, measurements(truth, clock, noise, rng))
    return asked


@pytest.mark.parametrize("max_clocks", [None, 1, 3, 5, 12])
def test_budget_is_never_exceeded(max_clocks: int | None) -> None:
    truth = example_profile()
    profiler = ClockProfiler(truth.frequencies, max_clocks)
    asked = sweep(profiler, truth)
    budget = max(len(truth.frequencies) // 4, 3) if max_clocks is None else max_clocks
    assert len(asked) == len(set(asked)) == budget == len(profiler.measured_clocks)
    assert profiler.done
    with pytest.raises(ProfileError, match="over the budget.*Fix"):
        profiler.record(next(c for c in truth.frequencies if c not in asked), measurements(truth, truth.frequencies[0]))


def test_clocks_descend_from_the_maximum_spread_over_the_range() -> None:
    truth = example_profile()
    clocks = sweep(ClockProfiler(truth.frequencies, max_clocks=8), truth)  # no blocking power: no early stop
    assert clocks[0] == max(truth.frequencies) and clocks[-1] == min(truth.frequencies)
    steps = -np.diff(clocks)
    assert np.all(steps > 0)
    assert steps.max() - steps.min() <= 15  # evenly spread, up to one 15 MHz clock step of rounding


def test_sweep_stops_once_effective_energy_rises() -> None:
    # More static power than A100_LIKE: below ~1050 MHz each lower clock costs ~1 % more effective energy.
    gpu = replace(A100_LIKE, static_power=180.0)
    truth = gpu.profile([(0.05, 0.1), (0.06, 0.12)])

    profiler = ClockProfiler(gpu.frequencies, max_clocks=12, p2p_power=BLOCKING_POWER)
    clocks = sweep(profiler, truth)
    assert len(clocks) < 12 and clocks[-1] > min(gpu.frequencies)
    effective = np.array([gpu.time_factor(c) * (gpu.power(c) - BLOCKING_POWER) for c in clocks])
    last = effective[-(EARLY_STOP_RISES + 1):]
    assert np.all(np.diff(last) > RISE_MARGIN * last[:-1])  # stopped after clear rises ...
    assert int(np.argmin(effective)) >= len(clocks) - 2 - EARLY_STOP_RISES  # ... soon past the minimum
    assert min(profiler.profile().frequencies) == clocks[-1]  # nothing extrapolated below

    assert len(sweep(ClockProfiler(gpu.frequencies, max_clocks=12), truth)) == 12  # unknown blocking power: no stop


def test_profile_reproduces_a_noise_free_model_profile() -> None:
    truth = example_profile()
    profiler = ClockProfiler(truth.frequencies, p2p_power=BLOCKING_POWER)
    sweep(profiler, truth)
    fitted = profiler.profile()
    assert fitted.frequencies == truth.frequencies
    for key, prof in truth.items():
        estimate = fitted.get(*key)
        np.testing.assert_allclose(estimate.time, prof.time, rtol=0.002)
        np.testing.assert_allclose(estimate.energy, prof.energy, rtol=0.01)
        for clock in profiler.measured_clocks:  # measured points are honoured
            assert estimate.at(clock) == pytest.approx(prof.at(clock), rel=1e-3)


@pytest.mark.parametrize("seed", range(5))
def test_noisy_measurements_give_a_sane_profile(seed: int) -> None:
    truth = example_profile()
    profiler = ClockProfiler(truth.frequencies, p2p_power=BLOCKING_POWER)
    sweep(profiler, truth, noise=0.02, seed=seed)
    fitted = profiler.profile()
    for key, prof in fitted.items():
        assert np.all(np.isfinite(prof.time)) and np.all(np.isfinite(prof.energy))
        assert np.all(prof.time > 0) and np.all(prof.energy > 0)
        assert np.all(np.diff(prof.time) <= 0), key  # never slower at a higher clock
        true_prof = truth.get(*key).restricted(prof.frequencies)
        np.testing.assert_allclose(prof.time, true_prof.time, rtol=0.06)
        np.testing.assert_allclose(prof.energy, true_prof.energy, rtol=0.1)


def test_record_replaces_a_clocks_data() -> None:
    truth = example_profile()
    profiler = ClockProfiler(truth.frequencies, max_clocks=3)
    sweep(profiler, truth)
    top = max(truth.frequencies)
    doubled = {key: KindMeasurement(m.time_s, 2 * m.energy_j, m.count) for key, m in measurements(truth, top).items()}
    profiler.record(top, doubled)
    assert profiler.measured_clocks[0] == top and len(profiler.measured_clocks) == 3
    for key, prof in truth.items():
        assert profiler.profile().get(*key).at(top)[1] == pytest.approx(2 * prof.at(top)[1])


def test_a_rank_shares_rows_of_its_own_stages() -> None:
    truth = example_profile()
    profiler = ClockProfiler(truth.frequencies, max_clocks=4)
    while (clock := profiler.next_clock()) is not None:
        profiler.record(clock, {key: m for key, m in measurements(truth, clock).items() if key[0] == 2})
    assert {(stage, kind) for stage, kind, *_ in profiler.rows()} == {(2, "forward"), (2, "backward")}
    with pytest.raises(ProfileError, match="stage 0 is missing"):
        profiler.profile()


def test_errors_name_the_fix() -> None:
    truth = example_profile()
    top = max(truth.frequencies)
    profiler = ClockProfiler(truth.frequencies)
    with pytest.raises(ProfileError, match="no clock has been measured.*Fix"):
        profiler.profile()
    with pytest.raises(ProfileError, match="1234 MHz is not a supported clock.*Fix"):
        profiler.record(1234, measurements(truth, top))
    with pytest.raises(ProfileError, match="not \\(stage, kind\\).*Fix"):
        profiler.record(top, {(0, "sideways"): KindMeasurement(0.1, 10.0, 1)})
    with pytest.raises(ProfileError, match="energy is nan J.*Fix: measure longer"):
        KindMeasurement(0.1, float("nan"), 3)
    with pytest.raises(ProfileError, match="blocking power.*Fix"):
        profiler.set_p2p_power(-1.0)
    with pytest.raises(ProfileError, match="supported clocks.*Fix"):
        ClockProfiler([])
    lower = truth.frequencies[0]
    profiler.record(lower, measurements(truth, lower))
    with pytest.raises(ProfileError, match=f"maximum clock {top} MHz was not measured.*Fix"):
        profiler.profile()


@pytest.mark.parametrize("stall_rate", [0.0, 0.02], ids=["steady", "stalls"])
def test_in_situ_plan_is_close_to_the_full_profiles(shared_profile_path: Path, stall_rate: float) -> None:
    """The benchmark's pipeline (bench/profiling.py) on 4 stages x 8 microbatches of the measured A100 profile;
    with host stalls too (2 % of the instructions 3 times longer: with mean durations, the in-situ plan was
    up to 6 % slower than T_min on the full benchmark)."""
    from bench.profiling import Emulation, evaluate

    measured = Profile.load(shared_profile_path)
    kept_stages = (0, 1, 2, measured.num_stages - 1)  # keep the last stage's LM head: stages stay imbalanced
    truth = Profile({(new, kind): measured.get(old, kind) for new, old in enumerate(kept_stages) for kind in measured.kinds(old)})
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", 4, 8))
    emulation = Emulation(iterations=4, time_jitter=0.005, update_period=0.1, counter_noise=0.005, read_gap=0.001,
                          stall_rate=stall_rate, stall_factor=3.0)
    # No exact MILP: its time limit would make the plans depend on the machine's speed.
    outcome = evaluate(truth, dag, 83.64, emulation, seed=0, exact_seconds=0)
    assert 4 * outcome.clocks_measured <= len(truth.frequencies)
    assert outcome.saving_full > 0.05
    assert outcome.saving_full - outcome.saving_in_situ < 0.005
    assert outcome.slowdown <= 0.001
