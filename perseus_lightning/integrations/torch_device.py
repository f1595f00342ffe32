"""The runtime of one training process, for the torch device it trains on (shared by the integrations)."""

from __future__ import annotations

from typing import Any

import torch

from perseus_lightning.runtime.collectives import default_collectives
from perseus_lightning.runtime.config import PerseusConfig
from perseus_lightning.runtime.runtime import PerseusRuntime


def runtime_for_device(config: PerseusConfig, device: torch.device, local_rank: int, **options: Any) -> PerseusRuntime:
    """A :class:`PerseusRuntime` over ``torch.distributed`` (when initialised) for ``device``.

    On CUDA it drives GPU ``device.index`` and synchronises CUDA to time instructions; elsewhere
    (emulated GPUs) it drives the GPU of ``local_rank``. ``options`` go to :class:`PerseusRuntime`.
    """
    cuda = device.type == "cuda"
    return PerseusRuntime(
        config,
        default_collectives(),
        device_index=device.index if cuda and device.index is not None else local_rank,
        synchronize=torch.cuda.synchronize if cuda else None,
        **options,
    )
