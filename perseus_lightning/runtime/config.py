"""Perseus settings: one YAML schema for ``PerseusCallback.from_config(path)`` (Lightning) and the
Accelerate plugin (``PERSEUS_CONFIG=perseus.yaml``).

The file holds the keys of :class:`PerseusConfig`, either at the top level or under a top-level
``perseus:`` key (the rest of a bigger file is then ignored). Every value is validated when a config
is built, however it is built; a bad one raises :class:`ConfigError` naming the file, the key and
the fix. ``docs/configuration.md`` is the reference.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from perseus_lightning.core.errors import PerseusInputError
from perseus_lightning.gpu.selection import BACKENDS as GPU_BACKENDS

MODES: tuple[str, ...] = ("apply", "observe", "off")
DEFAULT_CACHE_DIR = "~/.cache/perseus-lightning"
DOCS = "docs/configuration.md"

_Section = TypeVar("_Section")


class ConfigError(PerseusInputError):
    """A setting is unknown, of the wrong type or out of range.

    The message reads ``"<source>: <key path>: <what is wrong>. Fix: <fix>."``.
    """

    def __init__(self, source: str, key: str | None, problem: str, fix: str) -> None:
        self.source, self.key, self.problem, self.fix = source, key, problem, fix
        where = f"{source}: {key}: " if key else f"{source}: "
        super().__init__(f"{where}{problem}. Fix: {fix}.")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str | None, str, str]]:
        return type(self), (self.source, self.key, self.problem, self.fix)

    def relocated(self, source: str, prefix: str) -> ConfigError:
        """The same error reported at ``source``, with its key under ``prefix`` (e.g. ``"straggler."``)."""
        key = f"{prefix}{self.key}" if self.key else (prefix.rstrip(".") or None)
        return ConfigError(source, key, self.problem, self.fix)


@dataclass(frozen=True)
class ProfilingConfig:
    """How the in-training profiler sweeps clocks."""

    max_clocks: int | None = None
    """Clocks profiled per GPU, from the highest down; ``None``: a quarter of the supported clocks."""
    iterations_per_clock: int = 4
    """Training iterations measured at each clock."""

    def __post_init__(self) -> None:
        if self.max_clocks is not None:
            _set(self, "max_clocks", _whole(self, "max_clocks", self.max_clocks, minimum=1))
        _set(self, "iterations_per_clock", _whole(self, "iterations_per_clock", self.iterations_per_clock, minimum=1))


@dataclass(frozen=True)
class StragglerConfig:
    """When a slow data-parallel pipeline counts as a straggler (see :class:`StragglerDetector`)."""

    threshold: float = 0.05
    """A pipeline more than this fraction slower than its plan is straggling."""
    patience: int = 3
    """Consecutive iterations needed to start, and to end, a straggler episode."""
    recovery: float = 0.02
    """The episode ends once every pipeline is less than this fraction slower than its plan."""

    def __post_init__(self) -> None:
        _set(self, "threshold", _number(self, "threshold", self.threshold, above=0.0, example="0.05"))
        _set(self, "patience", _whole(self, "patience", self.patience, minimum=1))
        _set(self, "recovery", _number(self, "recovery", self.recovery, minimum=0.0, example="0.02"))
        if self.recovery >= self.threshold:
            raise ConfigError(
                type(self).__name__, "recovery",
                f"is {self.recovery}, must be below threshold ({self.threshold}) or a straggler episode could not end",
                f"set recovery between 0 and threshold, e.g. recovery {self.threshold / 2:g} for threshold {self.threshold:g}",
            )


@dataclass(frozen=True)
class EmulationConfig:
    """Tune the emulated GPUs: their pace against the host's, and a straggler emulated by slowing some ranks down."""

    straggler_ranks: tuple[int, ...] = ()
    """Global ranks that run slower."""
    straggler_slowdown: float = 1.0
    """How many times slower they run (1.0: not at all)."""
    straggler_iterations: tuple[int, int] | None = None
    """``[start, stop)`` training iterations during which they are slow; ``None``: always."""
    time_scale: float = 1.0
    """Emulated GPU seconds at max clock per second of host work (>= 1); above 1 keeps CPU contention out of timing."""

    def __post_init__(self) -> None:
        ranks = self.straggler_ranks
        if not isinstance(ranks, (list, tuple)):
            raise ConfigError(type(self).__name__, "straggler_ranks", f"expected a list of ranks, got {_describe(ranks)}",
                              "write a list of global ranks, e.g. [1], or [] for none")
        ranks = tuple(_whole(self, f"straggler_ranks[{i}]", rank, minimum=0) for i, rank in enumerate(ranks))
        if len(set(ranks)) != len(ranks):
            raise ConfigError(type(self).__name__, "straggler_ranks", f"lists a rank twice: {list(ranks)}",
                              "list each rank once")
        _set(self, "straggler_ranks", ranks)
        _set(self, "straggler_slowdown",
             _number(self, "straggler_slowdown", self.straggler_slowdown, minimum=1.0, example="1.2"))
        _set(self, "time_scale", _number(self, "time_scale", self.time_scale, minimum=1.0, example="1.5"))
        if self.straggler_iterations is not None:
            _set(self, "straggler_iterations", self._window(self.straggler_iterations))

    def _window(self, window: Any) -> tuple[int, int]:
        fix = "write [start, stop) iterations, e.g. [100, 200], or null for always"
        if not isinstance(window, (list, tuple)) or len(window) != 2:
            raise ConfigError(type(self).__name__, "straggler_iterations",
                              f"expected two iterations [start, stop), got {_describe(window)}", fix)
        start, stop = (_whole(self, f"straggler_iterations[{i}]", value, minimum=0) for i, value in enumerate(window))
        if stop <= start:
            raise ConfigError(type(self).__name__, "straggler_iterations",
                              f"[{start}, {stop}) is empty: stop must be after start", fix)
        return start, stop


@dataclass(frozen=True)
class PerseusConfig:
    """Every Perseus setting; build one with :meth:`from_yaml`, :meth:`from_mapping` or the constructor.

    Nested sections may also be given as mappings (``None``: the defaults).
    """

    mode: str = "apply"
    """``apply``: profile, plan and lock clocks; ``observe``: measure and report, never set a clock;
    ``off`` (or ``False``): do nothing."""
    gpu_backend: str = "auto"
    """``auto``, ``nvml`` or ``emulated`` (see :mod:`perseus_lightning.gpu.selection`)."""
    cache_dir: str | None = DEFAULT_CACHE_DIR
    """Profile and frontier cache: a directory, or one ``.json`` file; ``None`` disables it. ``~`` expands."""
    warmup_iterations: int = 2
    """Iterations skipped before any measurement."""
    baseline_iterations: int = 3
    """Iterations measured at max clock for the baseline."""
    deploy_iterations: int = 3
    """Iterations measured right after deploying a plan, to report the saving."""
    blocking_power: float | None = None
    """Power (W) of a GPU waiting on a peer; ``None``: measured from idle waits."""
    max_slowdown: float = 1.2
    """The frontier spans ``T_min`` to ``min(T*, max_slowdown * T_min)``."""
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    straggler: StragglerConfig = field(default_factory=StragglerConfig)
    emulation: EmulationConfig = field(default_factory=EmulationConfig)

    def __post_init__(self) -> None:
        mode = "off" if self.mode is False else self.mode  # YAML 1.1 reads a bare `off` as false
        _set(self, "mode", _choice(self, "mode", mode, MODES))
        _set(self, "gpu_backend", _choice(self, "gpu_backend", self.gpu_backend, GPU_BACKENDS))
        if self.cache_dir is not None:
            _set(self, "cache_dir", self._cache_path(self.cache_dir))
        _set(self, "warmup_iterations", _whole(self, "warmup_iterations", self.warmup_iterations, minimum=0))
        _set(self, "baseline_iterations", _whole(self, "baseline_iterations", self.baseline_iterations, minimum=1))
        _set(self, "deploy_iterations", _whole(self, "deploy_iterations", self.deploy_iterations, minimum=1))
        if self.blocking_power is not None:
            _set(self, "blocking_power", _number(self, "blocking_power", self.blocking_power, above=0.0, example="83.64"))
        _set(self, "max_slowdown", _number(self, "max_slowdown", self.max_slowdown, minimum=1.0, example="1.2"))
        for name, section in (("profiling", ProfilingConfig), ("straggler", StragglerConfig), ("emulation", EmulationConfig)):
            value = getattr(self, name)
            if not isinstance(value, section):
                _set(self, name, _construct(section, {} if value is None else value, type(self).__name__, f"{name}."))

    def _cache_path(self, value: Any) -> str:
        fix = "give a directory or a .json file, or null to disable the cache"
        if not isinstance(value, (str, os.PathLike)):
            raise ConfigError(type(self).__name__, "cache_dir", f"expected a path, got {_describe(value)}", fix)
        if not str(value).strip():
            raise ConfigError(type(self).__name__, "cache_dir", "is empty", fix)
        return os.path.expanduser(os.fspath(value))

    @classmethod
    def from_yaml(cls, path: str | Path) -> PerseusConfig:
        """The config in the YAML file at ``path`` (an empty file gives the defaults)."""
        path = Path(path).expanduser()
        source = str(path)
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(source, None, "no such config file",
                              f"check the path (PERSEUS_CONFIG or from_config), or create the file; see {DOCS}") from None
        except OSError as exc:
            raise ConfigError(source, None, f"cannot read the config file ({exc.strerror})",
                              "point to a readable YAML file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark is not None else None
            problem = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(source, where, f"not valid YAML ({problem})",
                              "fix the syntax there: 'key: value' pairs, nested keys indented under their section") from None
        return cls.from_mapping({} if data is None else data, source)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "<config>") -> PerseusConfig:
        """The config in ``data`` (parsed YAML or JSON), optionally wrapped in a ``perseus`` key;
        errors name ``source``."""
        if isinstance(data, Mapping) and "perseus" in data:
            section = data["perseus"]
            return _construct(cls, {} if section is None else section, source, "perseus.")
        return _construct(cls, data, source, "")

    def to_dict(self) -> dict[str, Any]:
        """Plain (YAML- and JSON-ready) settings, which :meth:`from_mapping` reads back."""
        return _plain(dataclasses.asdict(self))

    def replace(self, **overrides: Any) -> PerseusConfig:
        """A validated copy with ``overrides``; a section given as a mapping updates only its keys,
        as a dataclass replaces the whole section."""
        merged = self.to_dict()
        for key, value in overrides.items():
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = _plain(dataclasses.asdict(value))
            elif isinstance(value, Mapping) and isinstance(merged.get(key), dict):
                value = {**merged[key], **value}
            merged[key] = value
        return _construct(type(self), merged, f"{type(self).__name__}.replace", "")


# ---------------------------------------------------------------------------------- helpers
def _construct(cls: type[_Section], data: Any, source: str, prefix: str) -> _Section:
    """``cls(**data)`` after checking ``data`` is a mapping of ``cls``'s keys; errors report
    ``source`` and keys under ``prefix``."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    if not isinstance(data, Mapping):
        raise ConfigError(source, prefix.rstrip(".") or "top level", f"expected a mapping of settings, got {_describe(data)}",
                          f"write 'key: value' lines, e.g. '{names[0]}: ...'; see {DOCS}")
    for key in data:
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(source, f"{prefix}{key}", "unknown key", f"{hint}Valid keys here: {', '.join(names)}")
    try:
        return cls(**data)
    except ConfigError as exc:
        raise exc.relocated(source, prefix) from None


def _set(config: object, name: str, value: Any) -> None:
    object.__setattr__(config, name, value)


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _whole(config: object, key: str, value: Any, minimum: int) -> int:
    owner = type(config).__name__
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(owner, key, f"expected a whole number, got {_describe(value)}",
                          f"set it to a whole number >= {minimum}")
    if value < minimum:
        raise ConfigError(owner, key, f"is {value}, must be >= {minimum}", f"set it to a whole number >= {minimum}")
    return value


def _number(config: object, key: str, value: Any, example: str, minimum: float | None = None,
            above: float | None = None) -> float:
    """``value`` as a float, ``>= minimum`` or ``> above``."""
    owner = type(config).__name__
    bound = f">= {minimum:g}" if minimum is not None else f"> {above:g}"
    fix = f"set it to a number {bound}, e.g. {example}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str) and _parses_as_float(value):
            fix += " (YAML reads exponents without a dot, like 5e-2, as text: write 5.0e-2)"
        raise ConfigError(owner, key, f"expected a number, got {_describe(value)}", fix)
    value = float(value)
    if not math.isfinite(value) or not (value >= minimum if minimum is not None else value > above):
        raise ConfigError(owner, key, f"is {value:g}, must be {bound}", fix)
    return value


def _parses_as_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _choice(config: object, key: str, value: Any, choices: tuple[str, ...]) -> str:
    owner = type(config).__name__
    fix = f"use one of {', '.join(choices)}"
    if not isinstance(value, str):
        raise ConfigError(owner, key, f"expected one of {', '.join(choices)}, got {_describe(value)}", fix)
    if value not in choices:
        close = difflib.get_close_matches(value.lower(), choices, n=1)
        raise ConfigError(owner, key, f"unknown {key} {value!r}", fix + (f" (did you mean '{close[0]}'?)" if close else ""))
    return value


def _plain(value: Any) -> Any:
    """``value`` with tuples turned into lists, recursively."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
