"""``perseus doctor`` and ``perseus reset`` on emulated GPUs and on a fake NVML."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from fake_pynvml import NVML_ERROR_NO_PERMISSION, FakeNVML

from perseus_lightning.cli import gpu_args
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.gpu import selection
from perseus_lightning.gpu.emulated import ENV_DIR, ENV_UPDATE_PERIOD, EmulatedGPU
from cli_runner import run_cli

PERIOD = 0.02
LOCK_CALLS = ("nvmlDeviceSetGpuLockedClocks", "nvmlDeviceResetGpuLockedClocks")


@pytest.fixture(autouse=True)
def gpu_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two private emulated GPUs with a fast energy counter; no GPU configuration from the caller."""
    for name in (selection.ENV_BACKEND, selection.ENV_MODEL, selection.ENV_BLOCKING_POWER):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(selection.ENV_COUNT, "2")
    monkeypatch.setenv(ENV_UPDATE_PERIOD, str(PERIOD))
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "gpus"))
    return tmp_path / "gpus"


@pytest.fixture
def nvml(fake_nvml: FakeNVML, monkeypatch: pytest.MonkeyPatch) -> FakeNVML:
    """The fake NVML with a driver version and an energy counter that ticks every 50 ms."""

    def driver_version() -> str:
        fake_nvml._enter("nvmlSystemGetDriverVersion")
        return "580.159.04"

    def energy(handle) -> int:
        fake_nvml._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
        return int(time.monotonic() / 0.05) * 10_000

    monkeypatch.setattr(fake_nvml, "nvmlSystemGetDriverVersion", driver_version, raising=False)
    monkeypatch.setattr(fake_nvml, "nvmlDeviceGetTotalEnergyConsumption", energy)
    return fake_nvml


def as_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, euid: int, cap_eff: str) -> None:
    """Pretend this process runs as ``euid`` with effective capabilities ``cap_eff`` (hex)."""
    status = tmp_path / "status"
    status.write_text(f"Name:\tpython\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")
    monkeypatch.setattr(gpu_args.os, "geteuid", lambda: euid)
    monkeypatch.setattr(gpu_args, "PROC_STATUS", status)


def doctor_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    code, out, err = run_cli(capsys, "doctor", "--json", "--energy-window", "0.25", *argv)
    assert code == 0, err
    return json.loads(out)


def test_help_lists_the_gpu_commands(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "perseus doctor" in out and "perseus reset --all" in out
    for command, phrases in (("doctor", ["--measure-lock-latency", "--json", "CAP_SYS_ADMIN"]), ("reset", ["--all", "--device", "nvidia-smi -rgc"])):
        code, out, _ = run_cli(capsys, command, "--help")
        assert code == 0 and all(p in " ".join(out.split()) for p in phrases), out


def test_doctor_reports_emulated_gpus_without_changing_them(capsys: pytest.CaptureFixture[str], gpu_env: Path) -> None:
    EmulatedGPU(1).lock_clock(900)
    report = doctor_json(capsys, "--backend", "emulated")
    assert report["backend"] == "emulated" and report["backend_reason"] == "--backend emulated"
    assert report["driver"] == {"name": "emulated", "model": "A100-like", "state_dir": str(gpu_env)}
    assert report["clock_permission"]["allowed"] is True
    assert [(d["index"], d["uuid"]) for d in report["devices"]] == [(i, EmulatedGPU(i).uuid) for i in range(2)]
    assert report["devices"][0]["supported_clocks"] == {"count": len(A100_LIKE.frequencies), "min_mhz": 855, "max_mhz": 1410, "step_mhz": 15}
    for device in report["devices"]:  # idle GPUs: the counter still ticks, at the blocking power
        counter = device["energy_counter"]
        assert counter["available"] and counter["updates_seen"] >= 5
        assert counter["update_period_s"] == pytest.approx(PERIOD, rel=0.3)
    assert [d["locked_clock_mhz"] for d in report["devices"]] == [None, 900]
    assert report["locked_clocks"]["locked"] == [{"index": 1, "mhz": 900}]
    assert report["problems"] == ["GPU 1 is locked at 900 MHz. Fix: `perseus reset --device 1`."]
    assert EmulatedGPU(1).locked_clock() == 900 and EmulatedGPU(0).locked_clock() is None
    assert "lock_latency" not in report["devices"][0]


def test_doctor_measures_lock_latency_and_leaves_clocks_unlocked(capsys: pytest.CaptureFixture[str]) -> None:
    EmulatedGPU(0).lock_clock(900)
    report = doctor_json(capsys, "--measure-lock-latency")
    assert report["backend"] == "emulated"
    for device in report["devices"]:
        latency = device["lock_latency"]
        assert latency["clock_mhz"] in A100_LIKE.frequencies
        assert len(latency["lock_ms"]) == len(latency["reset_ms"]) == 3 and min(latency["lock_ms"]) > 0
    assert report["locked_clocks"]["locked"] == [] and report["locked_clocks"]["unlocked_by_lock_latency"] == [0]
    assert report["problems"] == []
    assert EmulatedGPU(0).locked_clock() is None and EmulatedGPU(1).locked_clock() is None


def test_doctor_text_report(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "160")
    EmulatedGPU(0).lock_clock(900)
    code, out, _ = run_cli(capsys, "doctor", "--energy-window", "0.15")
    assert code == 0
    assert "backend: emulated" in out and EmulatedGPU(1).uuid in out and "855-1410" in out
    assert "problem: GPU 0 is locked at 900 MHz" in out


def test_doctor_on_nvml_reports_driver_and_permission_and_locks_nothing(
    nvml: FakeNVML, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    as_user(monkeypatch, tmp_path, euid=0, cap_eff="0000000000000000")
    # A window of 12 ticks: the median period stays right if the machine stalls the polling threads
    # once (with 0.25 s, one stall of about 150 ms on a loaded 2-core CI machine read 0.19 s).
    report = doctor_json(capsys, "--energy-window", "0.6")
    assert report["backend"] == "nvml" and report["backend_reason"] == "auto: NVIDIA driver found"
    assert report["driver"] == {"name": "nvml", "version": "580.159.04"}
    assert report["clock_permission"] == {"allowed": True, "reason": "root (effective uid 0)"}
    assert [d["uuid"] for d in report["devices"]] == [gpu.uuid for gpu in nvml.gpus]
    assert report["devices"][0]["supported_clocks"] == {"count": 81, "min_mhz": 210, "max_mhz": 1410, "step_mhz": 15}
    counter = report["devices"][0]["energy_counter"]
    assert counter["available"] and counter["update_period_s"] == pytest.approx(0.05, rel=0.3)
    assert "locked_clock_mhz" not in report["devices"][0]
    assert report["locked_clocks"]["known"] is False and "perseus reset --all" in report["locked_clocks"]["note"]
    assert not any(nvml.calls_to(name) for name in LOCK_CALLS)
    assert nvml.init_count == 0  # every nvmlInit released


@pytest.mark.parametrize(
    ("euid", "cap_eff", "allowed", "reason"),
    [
        (1000, "00000000a80425fb", False, "neither root nor CAP_SYS_ADMIN"),  # docker's default set
        (1000, "00000000a82425fb", True, "CAP_SYS_ADMIN"),  # docker run --cap-add SYS_ADMIN
    ],
)
def test_doctor_judges_clock_permission_from_capabilities(
    nvml: FakeNVML, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    euid: int, cap_eff: str, allowed: bool, reason: str,
) -> None:
    as_user(monkeypatch, tmp_path, euid, cap_eff)
    report = doctor_json(capsys, "--backend", "nvml", "--energy-window", "0.05")
    assert report["clock_permission"] == {"allowed": allowed, "reason": reason}
    assert any("cannot set clocks" in p for p in report["problems"]) is not allowed
    assert not any(nvml.calls_to(name) for name in LOCK_CALLS)


def test_doctor_lock_latency_on_nvml_locks_and_resets(nvml: FakeNVML, capsys: pytest.CaptureFixture[str]) -> None:
    report = doctor_json(capsys, "--measure-lock-latency", "--energy-window", "0.05")
    assert len(nvml.calls_to("nvmlDeviceSetGpuLockedClocks")) == 3 * len(nvml.gpus)
    assert all(gpu.locked is None for gpu in nvml.gpus)
    assert all(len(d["lock_latency"]["lock_ms"]) == 3 for d in report["devices"])


def test_doctor_lock_latency_without_permission_reports_it(nvml: FakeNVML, capsys: pytest.CaptureFixture[str]) -> None:
    for gpu in nvml.gpus:
        gpu.can_set_clocks = False
    report = doctor_json(capsys, "--measure-lock-latency", "--energy-window", "0.05")
    assert all("refused" in d["lock_latency"]["error"] for d in report["devices"])
    assert sum("locking its clock failed" in p for p in report["problems"]) == len(nvml.gpus)


def test_doctor_without_a_driver_falls_back_to_emulated_and_says_why(nvml: FakeNVML, capsys: pytest.CaptureFixture[str]) -> None:
    nvml.driver_loaded = False
    report = doctor_json(capsys)
    assert report["backend"] == "emulated" and report["backend_reason"].startswith("auto: no NVIDIA driver (nvmlInit failed")
    code, _, err = run_cli(capsys, "doctor", "--backend", "nvml")
    assert code == 2 and err.startswith("perseus doctor: error: nvmlInit failed") and err.count("\n") == 1


def test_reset_unlocks_every_emulated_gpu_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    EmulatedGPU(0).lock_clock(900)
    for argv in ((), ("--all",)):
        code, out, err = run_cli(capsys, "reset", *argv)
        assert code == 0, err
        assert EmulatedGPU(0).locked_clock() is None and EmulatedGPU(1).locked_clock() is None
        assert "reset 2 emulated GPU(s)" in out
    EmulatedGPU(0).lock_clock(900)
    _, out, _ = run_cli(capsys, "reset")
    assert "GPU 0 (Emulated A100-like" in out and "unlocked (was locked at 900 MHz)" in out and "GPU 1" in out and "not locked" in out


def test_reset_one_device(capsys: pytest.CaptureFixture[str]) -> None:
    EmulatedGPU(0).lock_clock(900)
    EmulatedGPU(1).lock_clock(900)
    code, out, _ = run_cli(capsys, "reset", "--device", "1")
    assert code == 0 and "reset 1 emulated GPU(s)" in out
    assert EmulatedGPU(0).locked_clock() == 900 and EmulatedGPU(1).locked_clock() is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("--device", "5"), "perseus reset: error: no GPU 5: 2 emulated GPU(s). Fix: use --device 0-1."),
        (("--device", "0", "--all"), "perseus reset: error: argument --all: not allowed with argument --device"),
        (("--backend", "cuda"), "perseus reset: error: argument --backend: invalid choice"),
    ],
)
def test_reset_errors_are_one_line_with_exit_code_2(capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], message: str) -> None:
    code, out, err = run_cli(capsys, "reset", *argv)
    assert code == 2 and out == "" and err.startswith(message) and err.count("\n") == 1, err


def test_reset_on_nvml_resets_every_gpu(nvml: FakeNVML, capsys: pytest.CaptureFixture[str]) -> None:
    nvml.gpus[2].locked = (1005, 1005)  # left by a killed run: NVML cannot tell, reset anyway
    code, out, _ = run_cli(capsys, "reset", "--backend", "nvml")
    assert code == 0 and "reset 4 nvml GPU(s)" in out and "NVML cannot tell" in out
    assert len(nvml.calls_to("nvmlDeviceResetGpuLockedClocks")) == 4
    assert all(gpu.locked is None for gpu in nvml.gpus)


def test_reset_on_nvml_without_permission(
    nvml: FakeNVML, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    as_user(monkeypatch, tmp_path, euid=1000, cap_eff="00000000a80425fb")
    nvml.failures["nvmlDeviceResetGpuLockedClocks"] = NVML_ERROR_NO_PERMISSION
    code, _, err = run_cli(capsys, "reset", "--backend", "nvml")
    assert code == 2 and err.count("\n") == 1
    assert err.startswith("perseus reset: error: NVML refused to reset GPU(s) 0, 1, 2, 3: no permission (neither root nor CAP_SYS_ADMIN)")
    assert "sudo perseus reset --all" in err
