"""The device-control interface shared by the NVML and emulated GPUs, and its exceptions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from contextlib import AbstractContextManager, nullcontext


class GPUControlError(RuntimeError):
    """A GPU query or control call failed."""


class GPUPermissionError(GPUControlError):
    """Setting clocks is not permitted (needs root, CAP_SYS_ADMIN, or a user allowed to set clocks)."""


class GPUNotSupportedError(GPUControlError):
    """The GPU or driver does not support the call (e.g. locked clocks or the energy counter)."""


class GPULibraryNotFoundError(GPUControlError):
    """No GPU driver library (NVML) on this machine."""


class PerseusGPUWarning(UserWarning):
    """A GPU capability is missing and Perseus degrades gracefully (e.g. observe-only mode)."""


class GPUDevice(ABC):
    """One local GPU, as the training process sees it.

    ``index`` is the CUDA device index (after ``CUDA_VISIBLE_DEVICES``). A device in
    observe-only mode measures but never changes clocks: :meth:`lock_clock` and
    :meth:`reset_clock` do nothing there.
    """

    index: int
    name: str
    uuid: str

    @property
    @abstractmethod
    def observe_only(self) -> bool:
        """Whether clock changes are disabled (no permission, or not supported)."""

    @abstractmethod
    def supported_clocks(self) -> tuple[int, ...]:
        """Supported SM clocks in MHz, highest first."""

    @abstractmethod
    def locked_clock(self) -> int | None:
        """The SM clock the GPU is locked at (MHz), or ``None`` when unlocked."""

    @abstractmethod
    def lock_clock(self, mhz: int) -> None:
        """Lock the SM clock at ``mhz`` (one of :meth:`supported_clocks`)."""

    @abstractmethod
    def reset_clock(self) -> None:
        """Remove any clock lock, returning the GPU to its default clock management."""

    @abstractmethod
    def energy_j(self) -> float:
        """The energy counter in joules: monotone, updated every few tens of milliseconds."""

    @abstractmethod
    def power_w(self) -> float:
        """Current power draw in watts."""

    def computing(self, kernel: Hashable | None = None) -> AbstractContextManager[None]:
        """Mark the enclosed block as GPU work; ``kernel`` names the work it runs (blocks with the
        same name run the same work). A real GPU knows when it works, so this does nothing; the
        emulated GPU uses it to stretch time and draw power."""
        return nullcontext()
