"""A fake ``pynvml`` for tests: NVML's real return codes and exception classes, scripted GPUs, recorded calls.

It implements exactly the NVML calls ``perseus_lightning.gpu.nvml`` makes, with NVML's semantics
where they matter: ``nvmlInit`` is reference-counted, device calls need an initialised library,
errors are ``NVMLError(code)`` instances of per-code subclasses, as nvidia-ml-py builds them.
"""

from __future__ import annotations

import string
import types
from dataclasses import dataclass, field
from typing import Any

NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4
NVML_ERROR_ALREADY_INITIALIZED = 5
NVML_ERROR_NOT_FOUND = 6
NVML_ERROR_INSUFFICIENT_SIZE = 7
NVML_ERROR_INSUFFICIENT_POWER = 8
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_TIMEOUT = 10
NVML_ERROR_IRQ_ISSUE = 11
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_FUNCTION_NOT_FOUND = 13
NVML_ERROR_CORRUPTED_INFOROM = 14
NVML_ERROR_GPU_IS_LOST = 15
NVML_ERROR_RESET_REQUIRED = 16
NVML_ERROR_OPERATING_SYSTEM = 17
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
NVML_ERROR_IN_USE = 19
NVML_ERROR_MEMORY = 20
NVML_ERROR_NO_DATA = 21
NVML_ERROR_VGPU_ECC_NOT_SUPPORTED = 22
NVML_ERROR_INSUFFICIENT_RESOURCES = 23
NVML_ERROR_FREQ_NOT_SUPPORTED = 24
NVML_ERROR_ARGUMENT_VERSION_MISMATCH = 25
NVML_ERROR_DEPRECATED = 26
NVML_ERROR_NOT_READY = 27
NVML_ERROR_GPU_NOT_FOUND = 28
NVML_ERROR_INVALID_STATE = 29
NVML_ERROR_RESET_TYPE_NOT_SUPPORTED = 30
NVML_ERROR_UNKNOWN = 999


class NVMLError(Exception):
    """As in pynvml: ``NVMLError(code)`` returns an instance of that code's subclass."""

    _valClassMapping: dict[int, type[NVMLError]] = {}
    _errcode_to_string = {
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_NO_PERMISSION: "Insufficient Permissions",
        NVML_ERROR_ALREADY_INITIALIZED: "Already Initialized",
        NVML_ERROR_NOT_FOUND: "Not Found",
        NVML_ERROR_INSUFFICIENT_SIZE: "Insufficient Size",
        NVML_ERROR_INSUFFICIENT_POWER: "Insufficient External Power",
        NVML_ERROR_DRIVER_NOT_LOADED: "Driver Not Loaded",
        NVML_ERROR_TIMEOUT: "Timeout",
        NVML_ERROR_IRQ_ISSUE: "Interrupt Request Issue",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_FUNCTION_NOT_FOUND: "Function Not Found",
        NVML_ERROR_CORRUPTED_INFOROM: "Corrupted infoROM",
        NVML_ERROR_GPU_IS_LOST: "GPU is lost",
        NVML_ERROR_RESET_REQUIRED: "GPU requires restart",
        NVML_ERROR_OPERATING_SYSTEM: "The operating system has blocked the request.",
        NVML_ERROR_LIB_RM_VERSION_MISMATCH: "RM has detected an NVML/RM version mismatch.",
        NVML_ERROR_MEMORY: "Insufficient Memory",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }

    value: int

    def __new__(cls, value: int) -> NVMLError:
        if cls is NVMLError:
            cls = NVMLError._valClassMapping.get(value, cls)
        obj = Exception.__new__(cls)
        obj.value = value
        return obj

    def __str__(self) -> str:
        # The real module asks the library (nvmlErrorString) for codes missing from the table.
        return NVMLError._errcode_to_string.get(self.value, f"NVML Error with code {self.value}")

    def __eq__(self, other: object) -> bool:
        return self.value == other.value  # type: ignore[attr-defined]


def _error_classes() -> dict[str, type[NVMLError]]:
    """``NVMLError_NoPermission`` etc., one subclass per ``NVML_ERROR_*`` code, named as pynvml names them."""
    classes = {}
    for const_name, code in list(globals().items()):
        if not const_name.startswith("NVML_ERROR_"):
            continue
        class_name = "NVMLError_" + string.capwords(const_name.replace("NVML_ERROR_", ""), "_").replace("_", "")

        def new(cls: type[NVMLError], *args: Any, _code: int = code) -> NVMLError:
            return NVMLError.__new__(cls, _code)

        error_class = type(class_name, (NVMLError,), {"__new__": new, "__module__": __name__})
        NVMLError._valClassMapping[code] = error_class
        classes[class_name] = error_class
    return classes


ERROR_CLASSES = _error_classes()
globals().update(ERROR_CLASSES)

A100_SM_CLOCKS = tuple(range(1410, 209, -15))


@dataclass(frozen=True)
class FakeHandle:
    """What ``nvmlDeviceGetHandleByIndex`` returns: the NVML index of a GPU."""

    nvml_index: int


@dataclass
class FakeGPU:
    """A scripted GPU. ``graphics_clocks`` maps each memory clock to its SM clocks (in NVML's order)."""

    uuid: str
    name: str = "NVIDIA A100-SXM4-40GB"
    graphics_clocks: dict[int, tuple[int, ...]] = field(default_factory=lambda: {1215: A100_SM_CLOCKS})
    energy_counter: bool = True
    energy_mj: int = 1_234_567
    power_mw: int = 250_500
    can_set_clocks: bool = True
    lock_supported: bool = True
    locked: tuple[int, int] | None = None


class FakeNVML(types.ModuleType):
    """The fake ``pynvml`` module: put it in ``sys.modules["pynvml"]``.

    ``gpus`` are the GPUs in NVML order, ``driver_loaded=False`` makes ``nvmlInit`` fail like a
    machine without a driver, ``failures[function_name] = code`` makes that call raise
    ``NVMLError(code)``, and ``calls`` records ``(function_name, args)`` of every call.
    """

    def __init__(self, gpus: list[FakeGPU]) -> None:
        super().__init__("pynvml")
        for name, value in globals().items():
            if name.startswith(("NVML_", "NVMLError")):
                setattr(self, name, value)
        self.gpus = gpus
        self.driver_loaded = True
        self.failures: dict[str, int] = {}
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.init_count = 0

    def calls_to(self, function_name: str) -> list[tuple[Any, ...]]:
        """The arguments of each recorded call to ``function_name``."""
        return [args for name, args in self.calls if name == function_name]

    def _enter(self, function_name: str, *args: Any, needs_init: bool = True) -> None:
        self.calls.append((function_name, args))
        if function_name in self.failures:
            raise NVMLError(self.failures[function_name])
        if needs_init and self.init_count == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: FakeHandle) -> FakeGPU:
        return self.gpus[handle.nvml_index]

    def nvmlInit(self) -> None:
        self._enter("nvmlInit", needs_init=False)
        if not self.driver_loaded:
            raise NVMLError(NVML_ERROR_LIBRARY_NOT_FOUND)
        self.init_count += 1

    def nvmlShutdown(self) -> None:
        self._enter("nvmlShutdown")
        self.init_count -= 1

    def nvmlDeviceGetCount(self) -> int:
        self._enter("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        self._enter("nvmlDeviceGetHandleByIndex", index)
        if not 0 <= index < len(self.gpus):
            raise NVMLError(NVML_ERROR_INVALID_ARGUMENT)
        return FakeHandle(index)

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        self._enter("nvmlDeviceGetName", handle)
        return self._gpu(handle).name

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        self._enter("nvmlDeviceGetUUID", handle)
        return self._gpu(handle).uuid

    def nvmlDeviceGetSupportedMemoryClocks(self, handle: FakeHandle) -> list[int]:
        self._enter("nvmlDeviceGetSupportedMemoryClocks", handle)
        return list(self._gpu(handle).graphics_clocks)

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle: FakeHandle, memoryClockMHz: int) -> list[int]:
        self._enter("nvmlDeviceGetSupportedGraphicsClocks", handle, memoryClockMHz)
        clocks = self._gpu(handle).graphics_clocks
        if memoryClockMHz not in clocks:
            raise NVMLError(NVML_ERROR_NOT_FOUND)
        return list(clocks[memoryClockMHz])

    def nvmlDeviceSetGpuLockedClocks(self, handle: FakeHandle, minGpuClockMHz: int, maxGpuClockMHz: int) -> None:
        self._enter("nvmlDeviceSetGpuLockedClocks", handle, minGpuClockMHz, maxGpuClockMHz)
        gpu = self._check_clock_control(handle)
        gpu.locked = (minGpuClockMHz, maxGpuClockMHz)

    def nvmlDeviceResetGpuLockedClocks(self, handle: FakeHandle) -> None:
        self._enter("nvmlDeviceResetGpuLockedClocks", handle)
        self._check_clock_control(handle).locked = None

    def _check_clock_control(self, handle: FakeHandle) -> FakeGPU:
        gpu = self._gpu(handle)
        if not gpu.lock_supported:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if not gpu.can_set_clocks:
            raise NVMLError(NVML_ERROR_NO_PERMISSION)
        return gpu

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetTotalEnergyConsumption", handle)
        gpu = self._gpu(handle)
        if not gpu.energy_counter:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return gpu.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        self._enter("nvmlDeviceGetPowerUsage", handle)
        return self._gpu(handle).power_mw


FUNCTIONS = tuple(name for name in vars(FakeNVML) if name.startswith("nvml"))
"""The NVML functions the fake implements (those perseus_lightning calls)."""
