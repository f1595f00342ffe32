"""Frequency plans: one SM clock per instruction of an iteration.

On disk a plan is a list per rank, in execution order, of entries whose first element is the
instruction kind and whose last is the frequency in MHz:

- ``["forward", 1410]`` for 1F1B, exactly as Zeus's ``freqs_pipeline_*.py`` files;
- ``["forward", 3, 1410]`` (kind, microbatch, MHz) for other schedules;
- ``["forward", 3, 5, 1410]`` (kind, microbatch, model stage, MHz) where a rank runs several stages.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError, read_json
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.schedules import Instruction


@dataclass(frozen=True)
class FrequencyPlan:
    """SM frequency (MHz) of every node of an :class:`InstructionDAG`, indexed by node id."""

    frequencies: tuple[int, ...]

    @classmethod
    def max_clock(cls, dag: InstructionDAG, profile: Profile) -> FrequencyPlan:
        """Every instruction at the profile's maximum clock: the baseline."""
        return cls((profile.max_frequency,) * dag.num_nodes)

    def as_array(self) -> np.ndarray:
        return np.asarray(self.frequencies, dtype=np.int64)

    def rank_lists(self, dag: InstructionDAG) -> list[list[list]]:
        """The on-disk form: per rank, ``[kind, (microbatch, (stage,)) frequency]`` in execution order."""
        detail = _entry_detail(dag)
        lists = []
        for rank in range(dag.num_ranks):
            entries = []
            for node in dag.rank_nodes(rank):
                ins = dag.instructions[node]
                middle = [ins.microbatch, ins.stage][: detail]
                entries.append([ins.kind, *middle, int(self.frequencies[node])])
            lists.append(entries)
        return lists

    @classmethod
    def from_rank_lists(cls, dag: InstructionDAG, lists: object, source: str = "<plan>") -> FrequencyPlan:
        """Parse the on-disk form, checking every entry against the schedule's order."""
        if not isinstance(lists, list) or len(lists) != dag.num_ranks:
            count = len(lists) if isinstance(lists, list) else "no"
            raise PlanError(
                f"{source}: has {count} per-rank lists but the pipeline has {dag.num_ranks} ranks. "
                f"Fix: give one list per rank (stage), in execution order."
            )
        frequencies = [0] * dag.num_nodes
        for rank, entries in enumerate(lists):
            nodes = dag.rank_nodes(rank)
            if not isinstance(entries, list) or len(entries) != len(nodes):
                raise PlanError(
                    f"{source}: rank {rank} has {len(entries) if isinstance(entries, list) else 'no'} entries but "
                    f"runs {len(nodes)} instructions in schedule '{dag.schedule.name}'. "
                    f"Fix: plan every instruction of that rank, in execution order."
                )
            for pos, (node, entry) in enumerate(zip(nodes, entries)):
                frequencies[node] = _parse_entry(entry, dag.instructions[node], f"{source}: rank {rank}, entry {pos}")
        return cls(tuple(frequencies))

    @classmethod
    def load(cls, path: str | Path, dag: InstructionDAG, index: int = 0) -> FrequencyPlan:
        """Read ``{"frequencies": ...}``, or plan ``index`` of a frontier file (``{"plans": [...]}``)."""
        path = Path(path)
        doc = read_json(path, "plan", PlanError, "write the plan with FrequencyPlan.save() or `perseus plan`")
        if isinstance(doc, dict) and isinstance(doc.get("plans"), list):
            if not 0 <= index < len(doc["plans"]):
                raise PlanError(f"{path}: has {len(doc['plans'])} plans, no plan {index}. Fix: pick 0..{len(doc['plans']) - 1}.")
            doc = doc["plans"][index]
        if not isinstance(doc, dict) or "frequencies" not in doc:
            raise PlanError(
                f"{path}: has no \"frequencies\" key. Fix: a plan is {{\"frequencies\": [[[\"forward\", 1410], ...], ...]}}."
            )
        return cls.from_rank_lists(dag, doc["frequencies"], str(path))

    def save(self, path: str | Path, dag: InstructionDAG) -> None:
        Path(path).write_text(json.dumps({"frequencies": self.rank_lists(dag)}) + "\n")


def _entry_detail(dag: InstructionDAG) -> int:
    """How many of (microbatch, stage) an entry names: 0 for 1F1B, 2 where ranks run several stages."""
    if dag.schedule.num_stages > dag.num_ranks:
        return 2
    return 0 if dag.schedule.name == "1f1b" else 1


def _parse_entry(entry: object, expected: Instruction, where: str) -> int:
    if not isinstance(entry, (list, tuple)) or not 2 <= len(entry) <= 4:
        raise PlanError(f"{where}: {entry!r} is not [kind, (microbatch, (stage,)) MHz]. Fix: e.g. [\"forward\", 1410].")
    kind, *middle, frequency = entry
    want = [expected.kind, expected.microbatch, expected.stage]
    if [kind, *middle] != want[: 1 + len(middle)]:
        raise PlanError(
            f"{where}: names {[kind, *middle]} but the schedule runs '{expected}' there "
            f"({', '.join(map(str, want))}). Fix: list instructions in the schedule's execution order."
        )
    if (
        isinstance(frequency, bool) or not isinstance(frequency, (int, float)) or not math.isfinite(frequency)
        or frequency != int(frequency) or frequency <= 0
    ):
        raise PlanError(f"{where}: frequency {frequency!r} is not a clock in MHz. Fix: give a positive integer, e.g. 1410.")
    return int(frequency)


def check_frequencies(plan: FrequencyPlan | Sequence[int], dag: InstructionDAG, profile: Profile) -> None:
    """Raise :class:`PlanError` if any planned clock was not profiled for its instruction."""
    freqs = plan.frequencies if isinstance(plan, FrequencyPlan) else tuple(plan)
    if len(freqs) != dag.num_nodes:
        raise PlanError(f"the plan has {len(freqs)} frequencies for {dag.num_nodes} instructions. Fix: plan every instruction.")
    for node, (ins, f) in enumerate(zip(dag.instructions, freqs)):
        prof = profile.get(ins.stage, ins.kind)
        if f not in prof.frequencies:
            rank = int(dag.ranks[node])
            pos = node - dag.rank_nodes(rank).start
            raise PlanError(
                f"rank {rank}, entry {pos} ('{ins}'): {f} MHz was not profiled for stage {ins.stage} {ins.kind} "
                f"(profiled: {prof.frequencies[0]}-{prof.frequencies[-1]} MHz). Fix: use a profiled clock."
            )
