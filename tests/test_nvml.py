"""NVMLDevice and nvml_devices against the fake pynvml (tests/fake_pynvml.py): our logic runs unmocked."""

from __future__ import annotations

import gc
import inspect
import sys
import warnings

import pytest
from fake_pynvml import FUNCTIONS, FakeGPU, FakeHandle, FakeNVML

from perseus_lightning.gpu.device import (
    GPUControlError,
    GPULibraryNotFoundError,
    GPUNotSupportedError,
    GPUPermissionError,
    PerseusGPUWarning,
)
from perseus_lightning.gpu.nvml import NVMLDevice, nvml_devices, visible_nvml_indices

SET = "nvmlDeviceSetGpuLockedClocks"
RESET = "nvmlDeviceResetGpuLockedClocks"
UUIDS = ("GPU-aaaa1111-0000", "GPU-aaaa2222-0000", "GPU-bbbb3333-0000", "GPU-cccc4444-0000")


def test_fake_mirrors_real_pynvml() -> None:
    real = pytest.importorskip("pynvml")
    fake = FakeNVML([])
    codes = {name: value for name, value in vars(real).items() if name.startswith("NVML_ERROR_")}
    assert codes and {name: getattr(fake, name) for name in codes} == codes
    for name, code in codes.items():
        real_error, fake_error = real.NVMLError(code), fake.NVMLError(code)
        assert type(fake_error).__name__ == type(real_error).__name__
        assert isinstance(fake_error, getattr(fake, type(real_error).__name__)) and isinstance(fake_error, fake.NVMLError)
        assert fake_error.value == code
        if code in real.NVMLError._errcode_to_string:  # others would need the driver's nvmlErrorString
            assert str(fake_error) == str(real_error)
    for name in FUNCTIONS:
        real_params = list(inspect.signature(getattr(real, name)).parameters)
        assert list(inspect.signature(getattr(fake, name)).parameters) == real_params, name


def test_lock_then_reset_records_calls_and_tracks_locked_clock(fake_nvml: FakeNVML) -> None:
    device = nvml_devices()[1]
    assert device.locked_clock() is None
    device.lock_clock(1200)
    device.lock_clock(1200)  # unchanged: no second NVML call
    assert device.locked_clock() == 1200 and fake_nvml.gpus[1].locked == (1200, 1200)
    device.lock_clock(990)
    device.reset_clock()
    assert fake_nvml.calls_to(SET) == [(FakeHandle(1), 1200, 1200), (FakeHandle(1), 990, 990)]
    assert fake_nvml.calls_to(RESET) == [(FakeHandle(1),)]
    assert device.locked_clock() is None and fake_nvml.gpus[1].locked is None
    assert not device.observe_only


def test_lock_rejects_unsupported_clock(fake_nvml: FakeNVML) -> None:
    device = NVMLDevice(0, 0)
    with pytest.raises(ValueError, match="1234 MHz"):
        device.lock_clock(1234)
    assert fake_nvml.calls_to(SET) == []


def test_supported_clocks_highest_first_at_highest_memory_clock(fake_nvml: FakeNVML) -> None:
    fake_nvml.gpus[0].graphics_clocks = {877: (900, 500), 1593: (705, 1410, 1005, 1410, 210), 1215: (1300, 200)}
    device = NVMLDevice(0, 0)
    assert device.supported_clocks() == (1410, 1005, 705, 210)
    assert fake_nvml.calls_to("nvmlDeviceGetSupportedGraphicsClocks") == [(FakeHandle(0), 1593)]
    device.supported_clocks()
    assert len(fake_nvml.calls_to("nvmlDeviceGetSupportedGraphicsClocks")) == 1  # cached


def test_no_supported_clocks_is_not_supported(fake_nvml: FakeNVML) -> None:
    fake_nvml.gpus[0].graphics_clocks = {}
    with pytest.raises(GPUNotSupportedError, match="no supported SM clocks"):
        NVMLDevice(0, 0).supported_clocks()


def test_identity_energy_and_power_units(fake_nvml: FakeNVML) -> None:
    fake_nvml.gpus[2] = FakeGPU(uuid="GPU-h100", name="NVIDIA H100 80GB HBM3", energy_mj=5_000_250, power_mw=699_500)
    device = NVMLDevice(0, 2)
    assert (device.index, device.nvml_index, device.name, device.uuid) == (0, 2, "NVIDIA H100 80GB HBM3", "GPU-h100")
    assert device.energy_j() == pytest.approx(5000.25)
    assert device.power_w() == pytest.approx(699.5)
    assert device.has_energy_counter


def test_no_permission_goes_observe_only_with_one_warning_per_process(fake_nvml: FakeNVML) -> None:
    for gpu in fake_nvml.gpus:
        gpu.can_set_clocks = False
    devices = nvml_devices()
    with pytest.warns(PerseusGPUWarning) as record:
        for _ in range(3):  # a few training iterations: nothing raises
            for device in devices:
                device.lock_clock(1200)
                device.reset_clock()
                device.lock_clock(990)
    assert len(record) == 1
    message = str(record[0].message)
    for fix in ("observe-only", "root", "CAP_SYS_ADMIN", "--cap-add SYS_ADMIN", "ZEUSD_SOCK_PATH", "Insufficient Permissions"):
        assert fix in message
    assert all(device.observe_only and device.locked_clock() is None for device in devices)
    assert len(fake_nvml.calls_to(SET)) == len(devices)  # one failed try per device, then never again
    assert fake_nvml.calls_to(RESET) == []
    assert devices[3].energy_j() == pytest.approx(1234.567) and devices[3].power_w() == pytest.approx(250.5)


def test_warning_stays_once_per_process_for_devices_opened_later(fake_nvml: FakeNVML) -> None:
    fake_nvml.gpus[0].can_set_clocks = False
    with pytest.warns(PerseusGPUWarning):
        NVMLDevice(0, 0).reset_clock()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        NVMLDevice(1, 0).lock_clock(1200)


def test_unsupported_lock_goes_observe_only(fake_nvml: FakeNVML) -> None:
    fake_nvml.gpus[0].lock_supported = False
    device = NVMLDevice(0, 0)
    with pytest.warns(PerseusGPUWarning, match="Volta") as record:
        device.lock_clock(1200)
    assert "Not Supported" in str(record[0].message)
    assert device.observe_only and device.locked_clock() is None
    device.lock_clock(1005)
    assert len(fake_nvml.calls_to(SET)) == 1


def test_observe_only_by_choice_never_sets_clocks(fake_nvml: FakeNVML) -> None:
    device = NVMLDevice(0, 0, observe_only=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        device.lock_clock(1200)
        device.reset_clock()
    assert device.observe_only and fake_nvml.calls_to(SET) == fake_nvml.calls_to(RESET) == []
    assert device.energy_j() > 0


def test_other_lock_errors_raise_and_keep_control(fake_nvml: FakeNVML) -> None:
    device = NVMLDevice(0, 0)
    fake_nvml.failures[SET] = fake_nvml.NVML_ERROR_GPU_IS_LOST
    with pytest.raises(GPUControlError, match="GPU is lost") as info:
        device.lock_clock(1200)
    assert type(info.value) is GPUControlError and isinstance(info.value.__cause__, fake_nvml.NVMLError_GpuIsLost)
    assert not device.observe_only and device.locked_clock() is None


@pytest.mark.parametrize(
    ("code", "expected", "nvml_message"),
    [
        ("NVML_ERROR_NO_PERMISSION", GPUPermissionError, "Insufficient Permissions"),
        ("NVML_ERROR_NOT_SUPPORTED", GPUNotSupportedError, "Not Supported"),
        ("NVML_ERROR_FUNCTION_NOT_FOUND", GPUNotSupportedError, "Function Not Found"),
        ("NVML_ERROR_DRIVER_NOT_LOADED", GPULibraryNotFoundError, "Driver Not Loaded"),
        ("NVML_ERROR_GPU_IS_LOST", GPUControlError, "GPU is lost"),
        ("NVML_ERROR_UNKNOWN", GPUControlError, "Unknown Error"),
        ("NVML_ERROR_NOT_READY", GPUControlError, "NVML Error with code 27"),
    ],
)
def test_nvml_errors_map_to_package_exceptions(
    fake_nvml: FakeNVML, code: str, expected: type[GPUControlError], nvml_message: str
) -> None:
    device = NVMLDevice(0, 0)
    fake_nvml.failures["nvmlDeviceGetPowerUsage"] = getattr(fake_nvml, code)
    with pytest.raises(GPUControlError) as info:
        device.power_w()
    assert type(info.value) is expected
    assert "nvmlDeviceGetPowerUsage" in str(info.value) and nvml_message in str(info.value)
    assert isinstance(info.value.__cause__, fake_nvml.NVMLError)


def test_library_not_found(fake_nvml: FakeNVML) -> None:
    fake_nvml.driver_loaded = False
    with pytest.raises(GPULibraryNotFoundError, match="NVML Shared Library Not Found") as info:
        nvml_devices()
    assert "NVIDIA driver" in str(info.value) and "emulated" in str(info.value)
    with pytest.raises(GPULibraryNotFoundError):
        NVMLDevice(0, 0)


def test_nvidia_ml_py_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    with pytest.raises(GPULibraryNotFoundError, match="pip install nvidia-ml-py"):
        nvml_devices()


def test_unsupported_energy_counter(fake_nvml: FakeNVML) -> None:
    fake_nvml.gpus[0].energy_counter = False
    device = NVMLDevice(0, 0)
    assert not device.has_energy_counter
    for _ in range(2):
        with pytest.raises(GPUNotSupportedError, match="no energy counter.*Volta.*power_w"):
            device.energy_j()
    assert len(fake_nvml.calls_to("nvmlDeviceGetTotalEnergyConsumption")) == 1  # the answer is remembered
    assert device.power_w() == pytest.approx(250.5)
    device.lock_clock(1200)  # clock control is independent of the counter
    assert device.locked_clock() == 1200


def test_energy_read_errors_other_than_not_supported_propagate(fake_nvml: FakeNVML) -> None:
    device = NVMLDevice(0, 0)
    fake_nvml.failures["nvmlDeviceGetTotalEnergyConsumption"] = fake_nvml.NVML_ERROR_NO_PERMISSION
    with pytest.raises(GPUPermissionError):
        device.has_energy_counter
    del fake_nvml.failures["nvmlDeviceGetTotalEnergyConsumption"]
    assert device.has_energy_counter


@pytest.mark.parametrize(
    ("env_value", "expected"),
    [
        (None, [0, 1, 2, 3]),
        ("", []),
        ("0,1,2,3", [0, 1, 2, 3]),
        ("3,1", [3, 1]),
        ("2", [2]),
        (" 1 , 3", [1, 3]),
        ("1gpu,2ampere", [1, 2]),
        ("+1", [1]),
        ("1,-1,2", [1]),
        ("0,7,1", [0]),
        ("4", []),
        ("1,x,2", [1]),
        ("1,,2", [1]),
        ("abc", []),
        ("1,1", []),
        ("2,0,2", []),
        ("0,9,0", [0]),
        ("1,GPU-aaaa1111", [1]),
        ("GPU-aaaa1111-0000,GPU-cccc4444-0000", [0, 3]),
        ("GPU-cccc4444-0000,GPU-aaaa1111-0000", [3, 0]),
        ("GPU-b,GPU-aaaa2", [2, 1]),
        ("GPU-aaaa,GPU-b", []),  # ambiguous prefix: stops at once
        ("GPU-b,GPU-aaaa,GPU-c", [2]),
        ("GPU-b,GPU-dddd,GPU-c", [2]),
        ("GPU-b,1", [2]),
        ("GPU-b, GPU-c", [2]),
        ("GPU-b,GPU-bbbb3333-0000", []),
        ("GPU-bbbb3333-0000-extra", []),
    ],
)
def test_visible_nvml_indices(env_value: str | None, expected: list[int]) -> None:
    assert visible_nvml_indices(env_value, UUIDS) == expected


def test_visible_nvml_indices_rejects_mig() -> None:
    with pytest.raises(GPUNotSupportedError, match="MIG"):
        visible_nvml_indices("MIG-4b5c6d7e-aaaa-bbbb-cccc-000000000000", UUIDS)


@pytest.mark.parametrize(
    ("env_value", "nvml_indices"),
    [("2,0", [2, 0]), ("GPU-3333,GPU-1111aaaa", [3, 1]), ("3,5,1", [3]), ("", [])],
)
def test_nvml_devices_follow_cuda_visible_devices(
    fake_nvml: FakeNVML, monkeypatch: pytest.MonkeyPatch, env_value: str, nvml_indices: list[int]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", env_value)
    devices = nvml_devices()
    assert [d.index for d in devices] == list(range(len(nvml_indices)))
    assert [d.nvml_index for d in devices] == nvml_indices
    assert [d.uuid for d in devices] == [fake_nvml.gpus[i].uuid for i in nvml_indices]
    for device in devices:
        device.lock_clock(1005)
    assert fake_nvml.calls_to(SET) == [(FakeHandle(i), 1005, 1005) for i in nvml_indices]


def test_nvml_devices_without_cuda_visible_devices_sees_every_gpu(fake_nvml: FakeNVML) -> None:
    assert [(d.index, d.nvml_index) for d in nvml_devices()] == [(i, i) for i in range(4)]


def test_close_undoes_own_lock_and_releases_nvml(fake_nvml: FakeNVML) -> None:
    devices = nvml_devices()
    assert fake_nvml.init_count == len(devices)  # one reference per device; enumeration's own is dropped
    devices[0].lock_clock(1200)
    for device in devices:
        device.close()
        device.close()
    assert fake_nvml.calls_to(RESET) == [(FakeHandle(0),)]  # only the GPU this process locked
    assert fake_nvml.gpus[0].locked is None and fake_nvml.init_count == 0


def test_garbage_collection_undoes_lock(fake_nvml: FakeNVML) -> None:
    device = NVMLDevice(0, 1)
    device.lock_clock(1200)
    del device
    gc.collect()
    assert fake_nvml.gpus[1].locked is None and fake_nvml.init_count == 0


def test_failed_undo_warns_how_to_reset(fake_nvml: FakeNVML) -> None:
    device = NVMLDevice(0, 0)
    device.lock_clock(1200)
    fake_nvml.failures[RESET] = fake_nvml.NVML_ERROR_GPU_IS_LOST
    with pytest.warns(PerseusGPUWarning, match=f"1200 MHz.*nvidia-smi -i {device.uuid} -rgc"):
        device.close()
    assert fake_nvml.init_count == 0


def test_device_open_failure_releases_nvml(fake_nvml: FakeNVML) -> None:
    with pytest.raises(GPUControlError, match="Invalid Argument"):
        NVMLDevice(0, 9)
    assert fake_nvml.init_count == 0
