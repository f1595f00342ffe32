"""Real GPUs through NVML (``pynvml`` from nvidia-ml-py): energy, power and SM clock locking.

``pynvml`` is imported inside functions, so importing this module needs no driver. NVML is
initialised once per :class:`NVMLDevice` (NVML reference-counts ``nvmlInit``/``nvmlShutdown``)
and released by :meth:`NVMLDevice.close` or when the device is garbage-collected.

A device that may not lock clocks (no permission, or the GPU/driver cannot) switches to
observe-only mode: it keeps measuring, never sets a clock, and the process emits one
:class:`~perseus_lightning.gpu.device.PerseusGPUWarning` that names the fix.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from perseus_lightning.gpu.device import (
    GPUControlError,
    GPUDevice,
    GPULibraryNotFoundError,
    GPUNotSupportedError,
    GPUPermissionError,
    PerseusGPUWarning,
)

_T = TypeVar("_T")

_NO_DRIVER_HINT = (
    "NVML (libnvidia-ml.so.1) comes with the NVIDIA driver; on a machine without an NVIDIA GPU, "
    "use the emulated GPU instead"
)
_PERMISSION_FIX = (
    "To let Perseus lock clocks, run as root or grant the process CAP_SYS_ADMIN "
    "(e.g. `docker run --cap-add SYS_ADMIN`, or `securityContext.capabilities.add: [SYS_ADMIN]` "
    "on Kubernetes). `nvidia-smi -acp UNRESTRICTED` does not help: it only opens application "
    "clocks, not locked clocks. Zeus's non-root route, the zeusd daemon (ZEUSD_SOCK_PATH), "
    "is not supported yet."
)
_SUPPORT_FIX = (
    "Locking the SM clock (nvmlDeviceSetGpuLockedClocks) needs a Volta-or-newer GPU and a driver "
    "that supports it; this GPU cannot save energy through Perseus."
)

# One observe-only warning per process, whichever device trips first.
_observe_only_warned = False
_observe_only_warned_lock = threading.Lock()

_ORDINAL = re.compile(r"[+-]?\d+")


def visible_nvml_indices(env_value: str | None, uuids: Sequence[str]) -> list[int]:
    """The NVML index of each CUDA device index under ``CUDA_VISIBLE_DEVICES=env_value``.

    ``uuids[i]`` is the UUID (``GPU-...``) of NVML device ``i``. Parsing follows CUDA, as
    ``torch.cuda`` mirrors it:

    - unset (``None``): every GPU, in NVML order; empty string: no GPU;
    - a list of ordinals, each read like C's ``strtoul`` (``" 1"`` and ``"1gpu"`` are 1);
    - or, when the value starts with ``GPU-``, a list of UUIDs or unique UUID prefixes;
    - parsing stops at the first invalid entry (negative, out of range, not a number, unknown or
      ambiguous UUID, or a non-UUID in a UUID list), keeping the entries before it;
    - a device listed twice (before the first invalid entry) hides all devices.

    Raises:
        GPUNotSupportedError: the value lists MIG instances (``MIG-...``); clocks and energy
            belong to the whole physical GPU, shared with other MIG tenants.
    """
    if env_value is None:
        return list(range(len(uuids)))
    if env_value.startswith("MIG-"):
        raise GPUNotSupportedError(
            f"CUDA_VISIBLE_DEVICES={env_value!r} selects MIG instances, which Perseus does not support: "
            "the SM clock and the energy counter belong to the whole GPU, shared by all its MIG instances"
        )
    by_uuid = env_value.startswith("GPU-")
    visible: list[int] = []
    for entry in env_value.split(","):
        nvml_index = _uuid_entry_index(entry, uuids) if by_uuid else _ordinal_entry_index(entry, len(uuids))
        if nvml_index is None:
            break
        if nvml_index in visible:
            return []
        visible.append(nvml_index)
    return visible


def _ordinal_entry_index(entry: str, device_count: int) -> int | None:
    match = _ORDINAL.match(entry.strip())
    if match is None:
        return None
    ordinal = int(match.group())
    return ordinal if 0 <= ordinal < device_count else None


def _uuid_entry_index(entry: str, uuids: Sequence[str]) -> int | None:
    if not entry.startswith("GPU-"):
        return None
    matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(entry)]
    return matches[0] if len(matches) == 1 else None


def nvml_devices() -> list[NVMLDevice]:
    """One :class:`NVMLDevice` per CUDA-visible GPU, indexed as CUDA indexes them.

    CUDA ordinals in ``CUDA_VISIBLE_DEVICES`` are taken in NVML's (PCI bus) order. That is
    CUDA's order with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; CUDA's default, ``FASTEST_FIRST``,
    agrees on machines whose GPUs are all the same model.

    Raises:
        GPULibraryNotFoundError: no NVIDIA driver (or no nvidia-ml-py) on this machine.
        GPUNotSupportedError: ``CUDA_VISIBLE_DEVICES`` selects MIG instances.
        GPUControlError: any other NVML failure.
    """
    nvml = _import_pynvml()
    _call(nvml, nvml.nvmlInit)
    try:
        count = _call(nvml, nvml.nvmlDeviceGetCount)
        uuids = [_call(nvml, nvml.nvmlDeviceGetUUID, _handle_by_index(nvml, i)) for i in range(count)]
        visible = visible_nvml_indices(os.environ.get("CUDA_VISIBLE_DEVICES"), uuids)
        return [NVMLDevice(cuda_index, nvml_index) for cuda_index, nvml_index in enumerate(visible)]
    finally:
        _shutdown_quietly(nvml)


@dataclass
class _LockState:
    """The SM clock this process locked on one GPU (shared with the device's finalizer)."""

    mhz: int | None = None


class NVMLDevice(GPUDevice):
    """One GPU through NVML.

    ``index`` is the CUDA device index, ``nvml_index`` NVML's (see :func:`nvml_devices`).

    :meth:`locked_clock` reports only the lock this object set: NVML has no getter for the
    locked-clock range that works across drivers, so a lock left by another process (or a
    crashed run; locks outlive processes) is invisible. Call :meth:`reset_clock` at start-up to
    clear one. :meth:`close`, garbage collection and interpreter exit undo this object's lock.
    """

    def __init__(self, index: int, nvml_index: int, *, observe_only: bool = False) -> None:
        """Open NVML device ``nvml_index`` as CUDA device ``index``.

        ``observe_only=True`` measures without ever setting clocks.
        """
        nvml = _import_pynvml()
        _call(nvml, nvml.nvmlInit)
        try:
            handle = _handle_by_index(nvml, nvml_index)
            self.name: str = _call(nvml, nvml.nvmlDeviceGetName, handle)
            self.uuid: str = _call(nvml, nvml.nvmlDeviceGetUUID, handle)
        except GPUControlError:
            _shutdown_quietly(nvml)
            raise
        self.index = index
        self.nvml_index = nvml_index
        self._nvml = nvml
        self._handle = handle
        self._observe_only = observe_only
        self._lock = _LockState()
        self._supported_clocks: tuple[int, ...] | None = None
        self._has_energy_counter: bool | None = None
        self._finalizer = weakref.finalize(self, _release, nvml, handle, self.uuid, self._lock)

    def __repr__(self) -> str:
        return f"NVMLDevice(cuda:{self.index}, nvml:{self.nvml_index}, {self.name}, {self.uuid})"

    @property
    def observe_only(self) -> bool:
        return self._observe_only

    @property
    def has_energy_counter(self) -> bool:
        """Whether :meth:`energy_j` works (NVML's total-energy counter needs Volta or newer)."""
        if self._has_energy_counter is None:
            try:
                self.energy_j()
            except GPUNotSupportedError:
                pass
        return bool(self._has_energy_counter)

    def supported_clocks(self) -> tuple[int, ...]:
        """Supported SM clocks in MHz, highest first, as NVML lists them for the highest memory clock.

        Training runs at the highest memory clock; clocks listed only for lower ones are left out.
        """
        if self._supported_clocks is None:
            nvml, handle = self._nvml, self._handle
            memory = _call(nvml, nvml.nvmlDeviceGetSupportedMemoryClocks, handle)
            graphics = _call(nvml, nvml.nvmlDeviceGetSupportedGraphicsClocks, handle, max(memory)) if memory else []
            if not graphics:
                raise GPUNotSupportedError(f"{self}: NVML lists no supported SM clocks")
            self._supported_clocks = tuple(sorted(set(graphics), reverse=True))
        return self._supported_clocks

    def locked_clock(self) -> int | None:
        """The SM clock this object locked (MHz), or ``None``; see the class docstring."""
        return self._lock.mhz

    def lock_clock(self, mhz: int) -> None:
        """Lock the SM clock at ``mhz``; a no-op when observe-only or already locked there.

        Raises:
            ValueError: ``mhz`` is not one of :meth:`supported_clocks`.
        """
        if self._observe_only or mhz == self._lock.mhz:
            return
        if mhz not in self.supported_clocks():
            raise ValueError(f"{mhz} MHz is not a supported SM clock of {self}")
        if self._control(self._nvml.nvmlDeviceSetGpuLockedClocks, mhz, mhz):
            self._lock.mhz = mhz

    def reset_clock(self) -> None:
        """Remove any SM clock lock (also one set by another process); a no-op when observe-only."""
        if self._observe_only:
            return
        if self._control(self._nvml.nvmlDeviceResetGpuLockedClocks):
            self._lock.mhz = None

    def energy_j(self) -> float:
        """NVML's total-energy counter in joules.

        Raises:
            GPUNotSupportedError: the GPU has no energy counter (pre-Volta); see
                :attr:`has_energy_counter`.
        """
        if self._has_energy_counter is False:
            raise GPUNotSupportedError(self._no_energy_counter_message())
        nvml = self._nvml
        try:
            millijoules = nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle)
        except nvml.NVMLError as err:
            error = _gpu_error(nvml, err, "nvmlDeviceGetTotalEnergyConsumption")
            if isinstance(error, GPUNotSupportedError):
                self._has_energy_counter = False
                raise GPUNotSupportedError(f"{self._no_energy_counter_message()} ({error})") from err
            raise error from err
        self._has_energy_counter = True
        return millijoules / 1000.0

    def power_w(self) -> float:
        """Current power draw in watts (``nvmlDeviceGetPowerUsage``)."""
        nvml = self._nvml
        return _call(nvml, nvml.nvmlDeviceGetPowerUsage, self._handle) / 1000.0

    def close(self) -> None:
        """Undo this object's clock lock and release NVML. Idempotent."""
        self._finalizer()

    def _no_energy_counter_message(self) -> str:
        return (
            f"{self} has no energy counter (nvmlDeviceGetTotalEnergyConsumption needs a Volta-or-newer GPU); "
            "check has_energy_counter first, and integrate power_w() samples instead"
        )

    def _control(self, set_call: Callable[..., Any], *args: int) -> bool:
        """Run a clock-setting NVML call; whether it ran.

        Missing permission or support switches the device to observe-only instead of raising.
        """
        nvml = self._nvml
        try:
            set_call(self._handle, *args)
        except nvml.NVMLError as err:
            error = _gpu_error(nvml, err, set_call.__name__)
            if not isinstance(error, (GPUPermissionError, GPUNotSupportedError)):
                raise error from err
            self._observe_only = True
            fix = _PERMISSION_FIX if isinstance(error, GPUPermissionError) else _SUPPORT_FIX
            _warn_observe_only_once(f"{self}: {error}. {fix}")
            return False
        return True


def _warn_observe_only_once(detail: str) -> None:
    global _observe_only_warned
    with _observe_only_warned_lock:
        if _observe_only_warned:
            return
        _observe_only_warned = True
    warnings.warn(
        "Perseus cannot set GPU clocks and runs observe-only: training, energy and time measurement "
        f"go on, clocks stay as they are. {detail}",
        PerseusGPUWarning,
    )


def _import_pynvml() -> ModuleType:
    try:
        import pynvml
    except ImportError as err:
        raise GPULibraryNotFoundError(
            f"nvidia-ml-py (module pynvml) is not installed: pip install nvidia-ml-py. {_NO_DRIVER_HINT}."
        ) from err
    return pynvml


def _gpu_error(nvml: ModuleType, err: Exception, function_name: str) -> GPUControlError:
    """The package exception for an ``NVMLError`` from ``function_name``, keeping NVML's code and message."""
    code = getattr(err, "value", None)
    message = f"{function_name} failed: NVML error {code}: {err}"
    if code == nvml.NVML_ERROR_NO_PERMISSION:
        return GPUPermissionError(message)
    if code in (nvml.NVML_ERROR_NOT_SUPPORTED, nvml.NVML_ERROR_FUNCTION_NOT_FOUND):
        return GPUNotSupportedError(message)
    if code in (nvml.NVML_ERROR_LIBRARY_NOT_FOUND, nvml.NVML_ERROR_DRIVER_NOT_LOADED):
        return GPULibraryNotFoundError(f"{message}. No usable NVIDIA driver: {_NO_DRIVER_HINT}.")
    return GPUControlError(message)


def _call(nvml: ModuleType, nvml_call: Callable[..., _T], *args: Any) -> _T:
    """``nvml_call(*args)``, raising NVML errors as the package's exceptions."""
    try:
        return nvml_call(*args)
    except nvml.NVMLError as err:
        raise _gpu_error(nvml, err, nvml_call.__name__) from err


def _handle_by_index(nvml: ModuleType, nvml_index: int) -> Any:
    return _call(nvml, nvml.nvmlDeviceGetHandleByIndex, nvml_index)


def _shutdown_quietly(nvml: ModuleType) -> None:
    """Drop one ``nvmlInit`` reference; a failure here must not hide the caller's own error."""
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError:
        pass


def _release(nvml: ModuleType, handle: Any, uuid: str, lock: _LockState) -> None:
    """Finalizer of an :class:`NVMLDevice`: undo its clock lock, then drop its NVML reference."""
    if lock.mhz is not None:
        try:
            nvml.nvmlDeviceResetGpuLockedClocks(handle)
        except nvml.NVMLError as err:
            warnings.warn(
                f"Could not undo the {lock.mhz} MHz SM clock lock on GPU {uuid} "
                f"({_gpu_error(nvml, err, 'nvmlDeviceResetGpuLockedClocks')}); it stays locked until "
                f"`nvidia-smi -i {uuid} -rgc` or a driver reload",
                PerseusGPUWarning,
            )
        lock.mhz = None
    _shutdown_quietly(nvml)
