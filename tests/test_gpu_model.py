"""GPU models: the built-in ones, and fitting a model to a measured profile."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from perseus_lightning.core.gpu_model import A100_LIKE, H100_LIKE, GPUModel
from perseus_lightning.core.profile import FORWARD, Profile

FITTED_FIELDS = ("static_power", "dynamic_power", "voltage_floor", "compute_fraction")


def relative_errors(model: GPUModel, profile: Profile) -> tuple[np.ndarray, np.ndarray]:
    """Relative errors of the model's time ratios to the measured max-clock time (what an emulated GPU
    reproduces) and of its power."""
    time_err, power_err = [], []
    for _, prof in profile.items():
        t_max = prof.at(profile.max_frequency)[0]
        predicted_time = np.array([t_max * model.time_factor(f) for f in prof.frequencies])
        predicted_power = np.array([model.power(f) for f in prof.frequencies])
        time_err.append(predicted_time / prof.time - 1.0)
        power_err.append(predicted_power / (prof.energy / prof.time) - 1.0)
    return np.concatenate(time_err), np.concatenate(power_err)


def test_h100_parameters() -> None:
    assert H100_LIKE.max_frequency == 1980
    assert H100_LIKE.power(1980) == pytest.approx(700.0)
    assert H100_LIKE.time_factor(1980) == 1.0
    pareto = H100_LIKE.profile([(0.05, 0.1)]).get(0, FORWARD).pareto_frequencies(H100_LIKE.blocking_power)
    assert min(H100_LIKE.frequencies) < min(pareto) < H100_LIKE.max_frequency  # the lowest clocks are dominated


@pytest.mark.parametrize("model", [A100_LIKE, H100_LIKE, dataclasses.replace(A100_LIKE, voltage_floor=0.5, compute_fraction=0.6)],
                         ids=["a100", "h100", "no-floor-in-range"])
def test_fit_recovers_the_generating_model(model: GPUModel) -> None:
    profile = model.profile([(0.05, 0.1), (0.03, 0.07), (0.06, 0.12)])
    fit = GPUModel.from_profile(profile, model.blocking_power, name="fit")
    assert fit.frequencies == model.frequencies
    assert fit.blocking_power == model.blocking_power
    assert fit.name == "fit"
    for field in ("static_power", "dynamic_power", "compute_fraction"):
        assert getattr(fit, field) == pytest.approx(getattr(model, field), rel=1e-4), field
    if model.voltage_floor > min(model.frequencies) / model.max_frequency:  # otherwise the floor is unobservable
        assert fit.voltage_floor == pytest.approx(model.voltage_floor, rel=1e-4)
    for f in model.frequencies:
        assert fit.power(f) == pytest.approx(model.power(f), rel=1e-5)


def test_fit_tolerates_noise() -> None:
    rng = np.random.default_rng(0)
    clean = A100_LIKE.profile([(0.05, 0.1)] * 4)
    noisy = Profile.from_rows(
        (s, k, f, t * rng.normal(1, 0.01), e * rng.normal(1, 0.02))
        for (s, k), prof in clean.items() for f, t, e in zip(prof.frequencies, prof.time, prof.energy)
    )
    fit = GPUModel.from_profile(noisy, A100_LIKE.blocking_power)
    assert fit.compute_fraction == pytest.approx(A100_LIKE.compute_fraction, abs=0.02)
    for f in A100_LIKE.frequencies:
        assert fit.power(f) == pytest.approx(A100_LIKE.power(f), rel=0.02)


def test_fit_to_measured_a100_profile(shared_profile_path: Path) -> None:
    profile = Profile.load(shared_profile_path)
    fit = GPUModel.from_profile(profile, 83.64)
    time_err, power_err = relative_errors(fit, profile)
    rms_time, rms_power = float(np.sqrt(np.mean(time_err**2))), float(np.sqrt(np.mean(power_err**2)))
    print(f"\n{fit}\nfit error on {shared_profile_path.name}: time RMS {rms_time:.2%} (max {np.abs(time_err).max():.2%}), "
          f"power RMS {rms_power:.2%} (max {np.abs(power_err).max():.2%})")
    assert fit.name == "fit of gpt3-175b+a100_sxm_bf16"
    assert rms_time < 0.04 and rms_power < 0.04
    # The hand-fitted A100_LIKE came from the same data: the fit lands close to it.
    assert fit.compute_fraction == pytest.approx(A100_LIKE.compute_fraction, abs=0.05)
    assert fit.power(profile.max_frequency) == pytest.approx(A100_LIKE.power(1410), rel=0.1)
