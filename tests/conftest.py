"""Shared fixtures for the perseus_lightning tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from fake_pynvml import FakeGPU, FakeNVML

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # import the package from the checkout when it is not installed
    sys.path.insert(0, str(REPO_ROOT))

SHARED_STAGE_PROFILES = REPO_ROOT.parent / "shared" / "data" / "stage_profiles"
A100_PROFILE_CSV = SHARED_STAGE_PROFILES / "gpt3-175b+a100_sxm_bf16.csv"
A40_PROFILE_CSV = SHARED_STAGE_PROFILES / "gpt3-175b+a40_bf16.csv"


@pytest.fixture(scope="session")
def shared_profile_path() -> Path:
    """The measured GPT-3 175B A100 stage profile from ../shared/data (skips when absent)."""
    if not A100_PROFILE_CSV.is_file():
        pytest.skip("../shared/data/stage_profiles not present (third-party data, not shipped with the repo)")
    return A100_PROFILE_CSV


@pytest.fixture(scope="session")
def shared_a40_profile_path() -> Path:
    """The measured GPT-3 175B A40 stage profile from ../shared/data (skips when absent)."""
    if not A40_PROFILE_CSV.is_file():
        pytest.skip("../shared/data/stage_profiles not present (third-party data, not shipped with the repo)")
    return A40_PROFILE_CSV


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "distributed: launches a real multi-process torch.distributed (gloo) job; slow"
    )


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch) -> FakeNVML:
    """A fake ``pynvml`` (tests/fake_pynvml.py) with four A100s, installed as the ``pynvml`` module.

    ``CUDA_VISIBLE_DEVICES`` is unset and the once-per-process observe-only warning re-armed.
    """
    from perseus_lightning.gpu import nvml

    fake = FakeNVML([FakeGPU(uuid=f"GPU-{i}{i}{i}{i}aaaa-0000-1111-2222-33334444555{i}") for i in range(4)])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(nvml, "_observe_only_warned", False)
    return fake


@pytest.fixture
def example_csv(tmp_path: Path) -> Path:
    """The built-in example pipeline's profile, written as a Zeus CSV."""
    from perseus_lightning.core.gpu_model import example_profile

    path = tmp_path / "example.csv"
    example_profile().save(path)
    return path
