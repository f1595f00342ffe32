"""Stage profiles: time and energy of each pipeline instruction at each SM frequency.

A profile maps ``(stage, instruction kind, frequency in MHz)`` to the time (seconds) and
energy (joules) of one microbatch's instruction on one GPU of that stage. It reads and
writes the Zeus pipeline-frequency CSV format (``stage,instruction,frequency,time,energy``)
and a JSON form, and validates its input with errors that name the file, the row and the fix.
"""

from __future__ import annotations

import csv
import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perseus_lightning.core.errors import ProfileError, read_json

FORWARD = "forward"
BACKWARD = "backward"
BACKWARD_INPUT = "backward_input"
BACKWARD_WEIGHT = "backward_weight"
INSTRUCTION_KINDS: tuple[str, ...] = (FORWARD, BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT)
CSV_COLUMNS: tuple[str, ...] = ("stage", "instruction", "frequency", "time", "energy")
JSON_FORMAT = "perseus-profile"
JSON_VERSION = 1


@dataclass(frozen=True)
class InstructionProfile:
    """Time (s) and energy (J) of one instruction kind on one stage, by SM frequency (MHz).

    ``frequencies`` is ascending; ``time`` and ``energy`` are aligned with it.
    """

    frequencies: tuple[int, ...]
    time: np.ndarray
    energy: np.ndarray

    def __post_init__(self) -> None:
        self.time.setflags(write=False)
        self.energy.setflags(write=False)

    @property
    def max_frequency(self) -> int:
        return self.frequencies[-1]

    def index(self, frequency: int) -> int:
        """Position of ``frequency``; raises ``KeyError`` if it was not measured."""
        try:
            return self._positions[frequency]
        except KeyError:
            raise KeyError(frequency) from None

    def at(self, frequency: int) -> tuple[float, float]:
        """``(time, energy)`` at ``frequency``."""
        i = self.index(frequency)
        return float(self.time[i]), float(self.energy[i])

    def pareto_frequencies(self, p2p_power: float = 0.0) -> tuple[int, ...]:
        """Frequencies whose (time, effective energy) is not dominated, ascending.

        Effective energy is ``energy - p2p_power * time``: what running costs on top of
        idling at the blocking power. A frequency is dominated when another one is no
        slower and no costlier, and strictly better in one of the two.
        """
        cost = self.energy - p2p_power * self.time
        order = np.lexsort((cost, self.time))  # by time, then cost
        kept: list[int] = []
        best_cost = math.inf
        for i in order:
            if cost[i] < best_cost:
                kept.append(int(i))
                best_cost = float(cost[i])
        return tuple(sorted(self.frequencies[i] for i in kept))

    def restricted(self, frequencies: Iterable[int]) -> InstructionProfile:
        """The same profile limited to ``frequencies`` (each must have been measured)."""
        idx = sorted(self.index(f) for f in set(frequencies))
        return InstructionProfile(
            tuple(self.frequencies[i] for i in idx), self.time[idx].copy(), self.energy[idx].copy()
        )

    def scaled(self, factor: float) -> InstructionProfile:
        """Time and energy multiplied by ``factor`` (for example, one of V model chunks)."""
        return InstructionProfile(self.frequencies, self.time * factor, self.energy * factor)

    @property
    def _positions(self) -> dict[int, int]:
        cache = self.__dict__.get("_position_cache")
        if cache is None:
            cache = {f: i for i, f in enumerate(self.frequencies)}
            object.__setattr__(self, "_position_cache", cache)
        return cache


class Profile:
    """Per-stage instruction profiles of one pipeline.

    Stages are numbered ``0..num_stages-1``. Every stage has a ``forward`` and either a
    ``backward`` or both ``backward_input`` and ``backward_weight`` (zero-bubble split).
    Build one with :meth:`load`, :meth:`from_rows` or the constructor.
    """

    def __init__(
        self, entries: Mapping[tuple[int, str], InstructionProfile], source: str = "<profile>"
    ) -> None:
        self._entries = dict(sorted(entries.items(), key=lambda kv: (kv[0][0], INSTRUCTION_KINDS.index(kv[0][1]))))
        self.source = source
        _check_complete(self._entries, source)

    # ----------------------------------------------------------------- queries
    @property
    def num_stages(self) -> int:
        return 1 + max(stage for stage, _ in self._entries)

    def kinds(self, stage: int) -> tuple[str, ...]:
        """Instruction kinds profiled for ``stage``."""
        return tuple(kind for s, kind in self._entries if s == stage)

    def has(self, stage: int, kind: str) -> bool:
        return (stage, kind) in self._entries

    def get(self, stage: int, kind: str) -> InstructionProfile:
        try:
            return self._entries[(stage, kind)]
        except KeyError:
            raise ProfileError(
                f"{self.source}: no '{kind}' rows for stage {stage}. "
                f"Fix: profile stage {stage}'s {kind} pass, or choose a schedule that does not need it."
            ) from None

    def items(self) -> Iterable[tuple[tuple[int, str], InstructionProfile]]:
        return self._entries.items()

    @property
    def has_split_backward(self) -> bool:
        """Whether every stage has separate input-gradient and weight-gradient profiles."""
        return all(self.has(s, BACKWARD_INPUT) and self.has(s, BACKWARD_WEIGHT) for s in range(self.num_stages))

    @property
    def frequencies(self) -> tuple[int, ...]:
        """Frequencies measured for every instruction, ascending."""
        common = set.intersection(*(set(p.frequencies) for p in self._entries.values()))
        return tuple(sorted(common))

    @property
    def max_frequency(self) -> int:
        """The highest clock measured for every instruction: the baseline ("max clock") frequency."""
        return self.frequencies[-1]

    # ------------------------------------------------------------- transforms
    def pareto(self, p2p_power: float = 0.0) -> Profile:
        """Keep only each instruction's Pareto-optimal frequencies (see
        :meth:`InstructionProfile.pareto_frequencies`). The max clock is always kept, so the
        baseline stays simulatable."""
        entries = {}
        for key, prof in self._entries.items():
            keep = set(prof.pareto_frequencies(p2p_power)) | {self.max_frequency}
            entries[key] = prof.restricted(keep)
        return Profile(entries, self.source)

    def for_stages(self, stage_ranks: Sequence[int]) -> Profile:
        """The profile of each model stage of a pipeline whose stage ``v`` runs on rank ``stage_ranks[v]``.

        A profile with one entry per model stage is returned as is. A profile with one stage per
        rank is split for interleaved schedules: a rank holding ``k`` model chunks runs each in
        ``1/k`` of its profiled time and energy.
        """
        num_chunks, num_ranks = len(stage_ranks), 1 + max(stage_ranks)
        if self.num_stages == num_chunks:
            return self
        if self.num_stages == num_ranks:
            per_rank = Counter(stage_ranks)
            return Profile(
                {(v, kind): self.get(r, kind).scaled(1.0 / per_rank[r]) for v, r in enumerate(stage_ranks) for kind in self.kinds(r)},
                self.source,
            )
        need = str(num_chunks) if num_chunks == num_ranks else f"{num_ranks} (one per rank) or {num_chunks} (one per model chunk)"
        raise ProfileError(
            f"{self.source}: has {self.num_stages} stages but the pipeline needs {need}. "
            f"Fix: pass --stages {self.num_stages}, or use a profile measured with the pipeline's stage count."
        )

    # ---------------------------------------------------------------- reading
    @classmethod
    def load(cls, path: str | Path) -> Profile:
        """Read a Zeus CSV (``.csv``) or a Perseus JSON (``.json``) profile."""
        path = Path(path)
        if not path.is_file():
            raise ProfileError(f"{path}: no such profile file. Fix: check the path.")
        if path.suffix.lower() == ".json":
            return cls.from_json(path)
        return cls.from_csv(path)

    @classmethod
    def from_csv(cls, path: str | Path) -> Profile:
        path = Path(path)
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            header = [name.strip() for name in reader.fieldnames or []]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise ProfileError(
                    f"{path}: missing column(s) {', '.join(missing)} (header is '{','.join(header)}'). "
                    f"Fix: the first line must be '{','.join(CSV_COLUMNS)}'."
                )
            reader.fieldnames = header
            rows = [
                _RawRow(f"row {n} (line {reader.line_num})", row.get("stage"), row.get("instruction"),
                        row.get("frequency"), row.get("time"), row.get("energy"))
                for n, row in enumerate(reader, start=1)
            ]
        return cls.from_rows(rows, source=str(path))

    @classmethod
    def from_json(cls, path: str | Path) -> Profile:
        path = Path(path)
        doc = read_json(path, "profile", ProfileError, "write the file with Profile.save()")
        if not isinstance(doc, dict) or doc.get("format") != JSON_FORMAT or not isinstance(doc.get("instructions"), list):
            raise ProfileError(
                f"{path}: not a Perseus profile (expected an object with \"format\": \"{JSON_FORMAT}\" and an "
                f"\"instructions\" list). Fix: write the file with Profile.save(), or use the Zeus CSV format."
            )
        rows: list[_RawRow] = []
        for n, entry in enumerate(doc["instructions"]):
            where = f"instructions[{n}]"
            if not isinstance(entry, dict):
                raise ProfileError(f"{path}, {where}: is not an object. Fix: each entry needs stage, instruction, frequency, time, energy.")
            missing = [c for c in CSV_COLUMNS if c not in entry]
            if missing:
                raise ProfileError(
                    f"{path}, {where}: missing key(s) {', '.join(missing)}. "
                    f"Fix: each entry needs {', '.join(CSV_COLUMNS)}."
                )
            series = [entry[c] for c in ("frequency", "time", "energy")]
            if not all(isinstance(s, list) for s in series) or len({len(s) for s in series}) != 1:
                raise ProfileError(
                    f"{path}, {where}: frequency, time and energy must be lists of equal length. "
                    f"Fix: give one time and one energy per frequency."
                )
            rows += [
                _RawRow(f"{where} point {k}", entry["stage"], entry["instruction"], f, t, e)
                for k, (f, t, e) in enumerate(zip(*series))
            ]
        return cls.from_rows(rows, source=str(path))

    @classmethod
    def from_rows(cls, rows: Iterable[_RawRow | tuple], source: str = "<profile>") -> Profile:
        """Build a profile from ``(stage, instruction, frequency, time, energy)`` records.

        Each record may also be a :class:`_RawRow` carrying its location for error messages.
        """
        seen: dict[tuple[int, str, int], str] = {}
        points: dict[tuple[int, str], list[tuple[int, float, float]]] = {}
        for n, raw in enumerate(rows, start=1):
            row = raw if isinstance(raw, _RawRow) else _RawRow(f"row {n}", *raw)
            stage, kind, freq, time, energy = row.parse(source)
            key = (stage, kind, freq)
            if key in seen:
                raise ProfileError(
                    f"{source}, {row.where}: duplicates {seen[key]} (stage {stage}, {kind}, {freq} MHz). "
                    f"Fix: keep one measurement per stage, instruction and frequency (average repeats first)."
                )
            seen[key] = row.where
            points.setdefault((stage, kind), []).append((freq, time, energy))
        if not points:
            raise ProfileError(f"{source}: has no data rows. Fix: add one row per stage, instruction and frequency.")
        entries = {}
        for key, pts in points.items():
            pts.sort()
            entries[key] = InstructionProfile(
                tuple(p[0] for p in pts), np.array([p[1] for p in pts]), np.array([p[2] for p in pts])
            )
        return cls(entries, source)

    # ---------------------------------------------------------------- writing
    def save(self, path: str | Path) -> None:
        """Write as JSON if ``path`` ends in ``.json``, else as a Zeus CSV."""
        path = Path(path)
        if path.suffix.lower() == ".json":
            self.to_json(path)
        else:
            self.to_csv(path)

    def rows(self) -> list[tuple[int, str, int, float, float]]:
        """``(stage, kind, frequency, time, energy)`` of every point, each instruction's fastest clock first."""
        return [
            (stage, kind, prof.frequencies[i], float(prof.time[i]), float(prof.energy[i]))
            for (stage, kind), prof in self._entries.items()
            for i in reversed(range(len(prof.frequencies)))
        ]

    def to_csv(self, path: str | Path) -> None:
        with Path(path).open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_COLUMNS)
            for stage, kind, frequency, time, energy in self.rows():
                writer.writerow([stage, kind, frequency, repr(time), repr(energy)])

    def to_json(self, path: str | Path) -> None:
        doc = {
            "format": JSON_FORMAT,
            "version": JSON_VERSION,
            "instructions": [
                {"stage": stage, "instruction": kind, "frequency": list(prof.frequencies),
                 "time": prof.time.tolist(), "energy": prof.energy.tolist()}
                for (stage, kind), prof in self._entries.items()
            ],
        }
        Path(path).write_text(json.dumps(doc, indent=1) + "\n")

    def __repr__(self) -> str:
        return f"Profile({self.source!r}, stages={self.num_stages}, frequencies={len(self.frequencies)})"


@dataclass(frozen=True)
class _RawRow:
    """One unparsed profile record and where it came from (for error messages)."""

    where: str
    stage: object
    instruction: object
    frequency: object
    time: object
    energy: object

    def parse(self, source: str) -> tuple[int, str, int, float, float]:
        at = f"{source}, {self.where}"
        stage = _as_int(self.stage, "stage", at, "a stage index 0, 1, 2, ...")
        if stage < 0:
            raise ProfileError(f"{at}: stage is {stage}, a negative index. Fix: number stages from 0.")
        kind = str(self.instruction).strip() if self.instruction is not None else ""
        if kind not in INSTRUCTION_KINDS:
            raise ProfileError(
                f"{at}: unknown instruction '{kind}'. Fix: use one of {', '.join(INSTRUCTION_KINDS)}."
            )
        freq = _as_int(self.frequency, "frequency", at, "the SM clock in MHz, e.g. 1410")
        if freq <= 0:
            raise ProfileError(f"{at}: frequency is {freq} MHz. Fix: give the SM clock in MHz, a positive integer.")
        time = _as_float(self.time, "time", at, "seconds per microbatch")
        energy = _as_float(self.energy, "energy", at, "joules per microbatch")
        if time <= 0:
            raise ProfileError(f"{at}: time is {time}, not positive. Fix: give the measured seconds per microbatch (> 0).")
        if energy < 0:
            raise ProfileError(f"{at}: energy is {energy}, negative. Fix: give the measured joules per microbatch (>= 0).")
        return stage, kind, freq, time, energy


def _as_float(value: object, column: str, at: str, meaning: str) -> float:
    try:
        number = float(str(value).strip()) if not isinstance(value, (int, float)) else float(value)
    except ValueError:
        raise ProfileError(f"{at}: {column} '{value}' is not a number. Fix: give {meaning}.") from None
    if not math.isfinite(number):
        raise ProfileError(f"{at}: {column} is {value}. Fix: give {meaning}, a finite number (re-measure this point).")
    return number


def _as_int(value: object, column: str, at: str, meaning: str) -> int:
    number = _as_float(value, column, at, meaning)
    if number != int(number):
        raise ProfileError(f"{at}: {column} '{value}' is not an integer. Fix: give {meaning}.")
    return int(number)


def _check_complete(entries: Mapping[tuple[int, str], InstructionProfile], source: str) -> None:
    """Stages 0..N-1 all present, each with forward and backward, sharing a frequency."""
    stages = sorted({stage for stage, _ in entries})
    for expected, stage in enumerate(stages):
        if stage != expected:
            raise ProfileError(
                f"{source}: stage {expected} is missing (stages present: {_ranges(stages)}). "
                f"Fix: add stage {expected}'s rows, or renumber stages from 0 without gaps."
            )
    for stage in stages:
        kinds = {kind for s, kind in entries if s == stage}
        if FORWARD not in kinds:
            raise ProfileError(f"{source}: stage {stage} has no forward rows. Fix: profile stage {stage}'s forward pass.")
        split = {BACKWARD_INPUT, BACKWARD_WEIGHT} & kinds
        if split and len(split) == 1:
            (have,) = split
            lacking = BACKWARD_WEIGHT if have == BACKWARD_INPUT else BACKWARD_INPUT
            raise ProfileError(
                f"{source}: stage {stage} has {have} rows but no {lacking} rows. "
                f"Fix: profile both halves of the split backward, or neither."
            )
        if BACKWARD not in kinds and not split:
            raise ProfileError(
                f"{source}: stage {stage} has no backward rows. "
                f"Fix: profile stage {stage}'s backward pass (or both backward_input and backward_weight)."
            )
    by_stage = {s: set.intersection(*(set(p.frequencies) for (st, _), p in entries.items() if st == s)) for s in stages}
    for s in stages:
        if not by_stage[s]:
            raise ProfileError(
                f"{source}: stage {s}'s instructions share no frequency. Fix: measure all of stage {s}'s instructions at the same clocks."
            )
    if not set.intersection(*by_stage.values()):
        pair = next(((a, b) for a in stages for b in stages if a < b and not by_stage[a] & by_stage[b]), None)
        detail = (
            f"stage {pair[0]}: {_clock_range(by_stage[pair[0]])}; stage {pair[1]}: {_clock_range(by_stage[pair[1]])}"
            if pair else "no single clock is measured on every stage"
        )
        raise ProfileError(
            f"{source}: stages have no frequency in common ({detail}). "
            f"Fix: profile every stage at a shared set of clocks."
        )


def _clock_range(frequencies: set[int]) -> str:
    return f"{min(frequencies)}-{max(frequencies)} MHz ({len(frequencies)} clocks)"


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``'0-2, 5'``."""
    parts: list[str] = []
    start = prev = values[0]
    for cur in [*values[1:], None]:
        if cur is None or cur != prev + 1:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
        prev = cur
    return ", ".join(parts)
