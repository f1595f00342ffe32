"""A cache of profiles and frontiers, so that rerunning the same job skips profiling.

An entry is keyed by what the profile depends on: the model architecture, the GPU, the pipeline
schedule, the microbatch count and the parallel layout. The cache is either a directory, with
one ``perseus-<digest>.json`` file per key, or one explicit ``.json`` file, which then belongs to
one key: loading it for another key is an error rather than a silent re-profile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from perseus_lightning.core.errors import PerseusInputError, read_json

CACHE_FORMAT = "perseus-cache"
CACHE_VERSION = 1


@dataclass(frozen=True)
class CacheKey:
    """What a cached profile depends on."""

    model_signature: str
    """See :func:`model_signature`."""
    gpu_name: str
    schedule: str
    microbatches: int
    layout: str
    """The parallel layout, e.g. ``"pp2-dp2"``."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        """A short hash of the key, stable across processes and releases."""
        return _short_hash(self.to_dict())


class CacheMismatchError(PerseusInputError):
    """A cache file was made for another model, GPU, schedule or layout."""


def model_signature(parameter_shapes: Iterable[tuple[str, tuple[int, ...]]]) -> str:
    """A short hash of parameter names and shapes (in any order): equal for the same architecture."""
    return _short_hash(sorted([name, [int(d) for d in shape]] for name, shape in parameter_shapes))


class PlanCache:
    """Profiles and frontiers stored as JSON, one per :class:`CacheKey`."""

    def __init__(self, location: str | Path) -> None:
        """``location``: a directory, or an explicit ``.json`` file (``~`` expands)."""
        self.location = Path(location).expanduser()
        self.single_file = self.location.suffix.lower() == ".json"

    def path_for(self, key: CacheKey) -> Path:
        """The file that holds ``key``'s entry."""
        return self.location if self.single_file else self.location / f"perseus-{key.digest()}.json"

    def load(self, key: CacheKey) -> dict[str, Any] | None:
        """The payload stored for ``key``, or ``None`` when there is none."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        fix = f"delete {path} so that this run profiles again"
        doc = read_json(path, "cache", PerseusInputError, fix)
        if not isinstance(doc, dict) or doc.get("format") != CACHE_FORMAT or not isinstance(doc.get("key"), dict) \
                or not isinstance(doc.get("payload"), dict):
            raise PerseusInputError(f"{path}: not a perseus cache file. Fix: {fix}, or point cache_dir to another path.")
        if doc.get("version") != CACHE_VERSION:
            raise PerseusInputError(
                f"{path}: cache version {doc.get('version')!r}, this release reads {CACHE_VERSION}. Fix: {fix}."
            )
        differences = _differences(doc["key"], key.to_dict())
        if differences:
            raise CacheMismatchError(
                f"{path}: cached for another job ({'; '.join(differences)}). "
                f"Fix: {fix}, or point cache_dir to another path."
            )
        return doc["payload"]

    def store(self, key: CacheKey, payload: dict[str, Any]) -> Path:
        """Write ``payload`` (JSON-serialisable) for ``key``, atomically; returns the file."""
        path = self.path_for(key)
        text = json.dumps({"format": CACHE_FORMAT, "version": CACHE_VERSION, "key": key.to_dict(), "payload": payload})
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as file:
                file.write(text + "\n")
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path


def _short_hash(document: Any) -> str:
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _differences(cached: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``"field: cached X, now Y"`` for every field where the two keys differ."""
    names = list(wanted) + [name for name in cached if name not in wanted]
    return [
        f"{name}: cached {_field(cached, name)}, now {_field(wanted, name)}"
        for name in names
        if cached.get(name) != wanted.get(name) or (name in cached) != (name in wanted)
    ]


def _field(key: dict[str, Any], name: str) -> str:
    return repr(key[name]) if name in key else "absent"
