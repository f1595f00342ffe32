"""Open the local GPUs: real ones through NVML, or emulated ones on machines without a driver.

Backends: ``"nvml"``, ``"emulated"``, or ``"auto"``: ``$PERSEUS_GPU_BACKEND`` when set, else NVML
when a driver is present, else emulated GPUs, announced once per process by a WARNING on the
``perseus_lightning.gpu.selection`` logger (so that emulated energy is never mistaken for a
measurement; set ``PERSEUS_GPU_BACKEND=emulated`` to choose emulation without the notice).

Emulated GPUs are configured by environment variables:

- ``PERSEUS_EMULATED_GPU_COUNT``: how many (default 8);
- ``PERSEUS_EMULATED_GPU_MODEL``: ``a100`` (default), ``h100``, or the path of a Zeus CSV (or
  Perseus JSON) profile, fitted with :meth:`GPUModel.from_profile`;
- ``PERSEUS_EMULATED_GPU_BLOCKING_POWER``: for a fitted profile, the blocking power in watts
  (default: the A100's measured 83.64 W);
- ``PERSEUS_EMULATED_GPU_DIR`` and ``PERSEUS_EMULATED_GPU_UPDATE_PERIOD``: see
  :mod:`perseus_lightning.gpu.emulated`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from perseus_lightning.core.errors import ProfileError
from perseus_lightning.core.gpu_model import A100_LIKE, H100_LIKE, GPUModel
from perseus_lightning.core.profile import Profile
from perseus_lightning.gpu.device import GPUControlError, GPUDevice, GPULibraryNotFoundError
from perseus_lightning.gpu.emulated import EmulatedGPU

ENV_BACKEND = "PERSEUS_GPU_BACKEND"
ENV_COUNT = "PERSEUS_EMULATED_GPU_COUNT"
ENV_MODEL = "PERSEUS_EMULATED_GPU_MODEL"
ENV_BLOCKING_POWER = "PERSEUS_EMULATED_GPU_BLOCKING_POWER"
BACKENDS: tuple[str, ...] = ("auto", "nvml", "emulated")
MODELS: dict[str, GPUModel] = {"a100": A100_LIKE, "h100": H100_LIKE}
DEFAULT_EMULATED_COUNT = 8

logger = logging.getLogger(__name__)
_fallback_announced = False


def open_devices(backend: str = "auto", count: int | None = None, model: GPUModel | None = None) -> list[GPUDevice]:
    """The first ``count`` local GPUs (all NVML GPUs, or ``$PERSEUS_EMULATED_GPU_COUNT`` emulated ones, when ``None``).

    ``model`` drives emulated GPUs (default: ``$PERSEUS_EMULATED_GPU_MODEL``).
    """
    nvml = _nvml_or_fallback(backend)
    if nvml is not None:
        if count is not None and count > len(nvml):
            raise GPUControlError(f"asked for {count} GPUs but NVML sees {len(nvml)}. Fix: check CUDA_VISIBLE_DEVICES.")
        return nvml[:count]
    model = model or emulated_model()
    return [EmulatedGPU(i, model) for i in range(emulated_count() if count is None else count)]


def open_device(backend: str = "auto", index: int = 0, model: GPUModel | None = None) -> GPUDevice:
    """The local GPU with CUDA index ``index`` (see :func:`open_devices`)."""
    nvml = _nvml_or_fallback(backend)
    available = len(nvml) if nvml is not None else emulated_count()
    if not 0 <= index < available:
        fix = "check CUDA_VISIBLE_DEVICES" if nvml is not None else f"set {ENV_COUNT} to at least {index + 1}"
        raise GPUControlError(f"no GPU {index}: {available} {'NVML' if nvml is not None else 'emulated'} GPU(s). Fix: {fix}.")
    return nvml[index] if nvml is not None else EmulatedGPU(index, model or emulated_model())


def resolve_backend(backend: str = "auto") -> str:
    """Validate ``backend``; ``"auto"`` becomes ``$PERSEUS_GPU_BACKEND`` when that is set."""
    name = backend.strip().lower()
    if name == "auto":
        name = os.environ.get(ENV_BACKEND, "auto").strip().lower() or "auto"
        source = f"{ENV_BACKEND}={os.environ.get(ENV_BACKEND)!r}"
    else:
        source = f"GPU backend {backend!r}"
    if name not in BACKENDS:
        raise GPUControlError(f"{source} is not a GPU backend. Fix: use one of {', '.join(BACKENDS)}.")
    return name


def emulated_count() -> int:
    """``$PERSEUS_EMULATED_GPU_COUNT``, default 8."""
    raw = os.environ.get(ENV_COUNT)
    if raw is None:
        return DEFAULT_EMULATED_COUNT
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise GPUControlError(f"{ENV_COUNT}={raw!r} is not a positive integer. Fix: e.g. {ENV_COUNT}=8.")
    return count


def emulated_model() -> GPUModel:
    """The model named by ``$PERSEUS_EMULATED_GPU_MODEL``: ``a100`` (default), ``h100``, or a profile's path."""
    raw = os.environ.get(ENV_MODEL, "a100")
    if raw.strip().lower() in MODELS:
        return MODELS[raw.strip().lower()]
    path = Path(raw).expanduser()
    if not path.is_file():
        raise GPUControlError(
            f"{ENV_MODEL}={raw!r}: neither {' nor '.join(MODELS)} nor a profile file. Fix: name a model or a Zeus CSV profile."
        )
    raw_power = os.environ.get(ENV_BLOCKING_POWER, str(A100_LIKE.blocking_power))
    try:
        blocking_power = float(raw_power)
    except ValueError:
        raise GPUControlError(f"{ENV_BLOCKING_POWER}={raw_power!r} is not a number. Fix: give watts, e.g. 83.64.") from None
    try:
        profile = Profile.load(path)
    except ProfileError as exc:
        raise GPUControlError(f"{ENV_MODEL}: {exc}") from None
    return GPUModel.from_profile(profile, blocking_power, name=path.stem)


def _nvml_or_fallback(backend: str) -> list[GPUDevice] | None:
    """NVML's devices, or ``None`` when emulated GPUs are to be used."""
    global _fallback_announced
    name = resolve_backend(backend)
    if name == "emulated":
        return None
    from perseus_lightning.gpu.nvml import nvml_devices  # lazy: needs nvidia-ml-py

    try:
        return list(nvml_devices())
    except GPULibraryNotFoundError as exc:
        if name == "nvml":
            raise
        if not _fallback_announced:
            _fallback_announced = True
            logger.warning(
                "No NVIDIA driver (%s): using emulated GPUs; their energy figures are modelled, not measured. "
                "Set %s=emulated to choose this without the notice, or =nvml to require real GPUs.",
                exc, ENV_BACKEND,
            )
        return None
