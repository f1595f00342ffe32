"""Command-line arguments and helpers shared by the commands that touch local GPUs (reset, doctor)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from perseus_lightning.gpu.device import GPUDevice, GPULibraryNotFoundError
from perseus_lightning.gpu.selection import BACKENDS, ENV_BACKEND, open_devices, resolve_backend

PROC_STATUS = Path("/proc/self/status")
CAP_SYS_ADMIN = 21


def add_backend_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend", choices=BACKENDS, default="auto",
        help=f"GPU backend (default: %(default)s: ${ENV_BACKEND} when set, else NVML when a driver is present, else emulated)",
    )


def open_backend(backend: str) -> tuple[str, list[GPUDevice], str]:
    """``(backend, devices, why that backend)``: the local GPUs, as the training process would open them."""
    requested = backend
    backend = resolve_backend(backend)
    why = f"--backend {requested}" if requested != "auto" else (
        f"{ENV_BACKEND}={os.environ[ENV_BACKEND]}" if backend != "auto" else "auto"
    )
    if backend in ("auto", "nvml"):
        from perseus_lightning.gpu.nvml import nvml_devices

        try:
            return "nvml", list(nvml_devices()), why if backend == "nvml" else "auto: NVIDIA driver found"
        except GPULibraryNotFoundError as exc:
            if backend == "nvml":
                raise
            return "emulated", open_devices("emulated"), f"auto: no NVIDIA driver ({str(exc).split('. ')[0]})"
    return "emulated", open_devices("emulated"), why


def clock_permission() -> tuple[bool, str]:
    """Whether this process may lock NVML clocks (root or CAP_SYS_ADMIN), and why; changes nothing."""
    if os.geteuid() == 0:
        return True, "root (effective uid 0)"
    try:
        status = PROC_STATUS.read_text()
    except OSError as exc:
        return False, f"not root, and {PROC_STATUS} is unreadable ({exc.strerror})"
    effective = next((line.split()[1] for line in status.splitlines() if line.startswith("CapEff:")), "0")
    if int(effective, 16) >> CAP_SYS_ADMIN & 1:
        return True, "CAP_SYS_ADMIN"
    return False, "neither root nor CAP_SYS_ADMIN"
