"""The few collective operations the runtime needs, with or without ``torch.distributed``.

:class:`TorchCollectives` uses the default process group (imported lazily, so the runtime itself
needs no torch); :class:`LocalCollectives` is the single-process stand-in. Every rank must make
the same calls in the same order, as with any collective.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np


class Collectives(Protocol):
    """Rank, world size, and the collectives the runtime uses."""

    rank: int
    world_size: int

    def all_gather_floats(self, values: Sequence[float]) -> np.ndarray:
        """Every rank's ``values`` (equal lengths), as an array of shape ``(world_size, len(values))``."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (for rare, larger exchanges)."""

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank."""


class LocalCollectives:
    """One process: every collective returns the local value."""

    rank = 0
    world_size = 1

    def all_gather_floats(self, values: Sequence[float]) -> np.ndarray:
        return np.asarray(values, dtype=float).reshape(1, -1)

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        return obj


class TorchCollectives:
    """Collectives over ``torch.distributed``'s default process group (which must be initialised).

    Float exchanges use a float64 tensor on the backend's device (the current CUDA device for
    NCCL, the CPU otherwise): one small ``all_gather`` per call.
    """

    def __init__(self) -> None:
        import torch
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised. Fix: use LocalCollectives for a single process.")
        self._torch, self._dist = torch, dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        backend = str(dist.get_backend()).lower()
        self._device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")

    def all_gather_floats(self, values: Sequence[float]) -> np.ndarray:
        local = self._torch.tensor(list(values), dtype=self._torch.float64, device=self._device)
        gathered = [self._torch.empty_like(local) for _ in range(self.world_size)]
        self._dist.all_gather(gathered, local)
        return self._torch.stack(gathered).cpu().numpy()

    def all_gather_object(self, obj: Any) -> list[Any]:
        gathered: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        box = [obj if self.rank == src else None]
        self._dist.broadcast_object_list(box, src=src)
        return box[0]


def default_collectives() -> Collectives:
    """:class:`TorchCollectives` when ``torch.distributed`` is initialised (torch already imported), else local."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return TorchCollectives()
    return LocalCollectives()
