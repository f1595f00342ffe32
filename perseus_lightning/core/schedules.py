"""Pipeline schedules: the order in which each rank runs its forward and backward instructions.

Built-in schedules follow the implementations users run:

- ``1f1b``: synchronous 1F1B, the per-stage order of DeepSpeed's ``TrainSchedule`` (and Zeus/Perseus).
- ``gpipe``: all forwards, then all backwards (``torch.distributed.pipelining.ScheduleGPipe``).
- ``interleaved-1f1b``: virtual stages per rank (``ScheduleInterleaved1F1B``).
- ``zero-bubble``: backward split into input-gradient ``I`` and weight-gradient ``W``
  (``ScheduleInterleavedZeroBubble``, the ZB1P schedule; ZB-H1 with one stage per rank).

Any other schedule can be given as per-rank action lists in ``torch.distributed.pipelining``
notation (``"0F0"``, ``"1B3"``, ``"0I2"``, ``"0W2"``) with :func:`from_actions`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from perseus_lightning.core.errors import ScheduleError
from perseus_lightning.core.profile import BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD

SCHEDULES: tuple[str, ...] = ("1f1b", "gpipe", "interleaved-1f1b", "zero-bubble")
ACTION_LETTERS: dict[str, str] = {FORWARD: "F", BACKWARD: "B", BACKWARD_INPUT: "I", BACKWARD_WEIGHT: "W"}
_KIND_OF_LETTER = {letter: kind for kind, letter in ACTION_LETTERS.items()}
_COMPUTE_ACTION = re.compile(r"^(\d+)([FBIW])(\d+)$")
_COMM_ACTION = re.compile(r"^(\d+)(SEND_F|RECV_F|SEND_B|RECV_B|UNSHARD|RESHARD|REDUCE_GRAD|BW)(\d*)$")


@dataclass(frozen=True, order=True)
class Instruction:
    """The forward or (part of the) backward of one microbatch on one pipeline stage.

    ``stage`` is the model stage (a virtual stage under interleaving), not the rank.
    """

    stage: int
    kind: str
    microbatch: int

    @property
    def action(self) -> str:
        """The ``torch.distributed.pipelining`` name, e.g. ``"0F3"``."""
        return f"{self.stage}{ACTION_LETTERS[self.kind]}{self.microbatch}"

    def __str__(self) -> str:
        return self.action


@dataclass(frozen=True)
class PipelineSchedule:
    """Per-rank execution order of every compute instruction in one training iteration."""

    name: str
    num_microbatches: int
    rank_orders: tuple[tuple[Instruction, ...], ...]
    stage_ranks: tuple[int, ...]
    """``stage_ranks[v]`` is the rank that runs model stage ``v``."""

    @property
    def num_ranks(self) -> int:
        return len(self.rank_orders)

    @property
    def num_stages(self) -> int:
        return len(self.stage_ranks)

    @property
    def num_instructions(self) -> int:
        return sum(len(order) for order in self.rank_orders)

    def actions(self) -> list[list[str]]:
        """Per-rank action names, e.g. ``[["0F0", "0F1", "0B0", ...], ...]``."""
        return [[ins.action for ins in order] for order in self.rank_orders]


def build_schedule(
    name: str,
    num_stages: int,
    num_microbatches: int,
    virtual_stages: int = 1,
    split_backward: bool = True,
) -> PipelineSchedule:
    """Build a built-in schedule for ``num_stages`` ranks.

    ``virtual_stages`` is the number of model chunks per rank (interleaved schedules only).
    ``split_backward`` makes ``zero-bubble`` use separate ``I`` and ``W`` instructions;
    without it, each backward stays whole and zero-bubble reduces to 1F1B.
    """
    if name not in SCHEDULES:
        raise ScheduleError(f"unknown schedule '{name}'. Fix: use one of {', '.join(SCHEDULES)}.")
    if num_stages < 1 or num_microbatches < 1 or virtual_stages < 1:
        raise ScheduleError(
            f"stages ({num_stages}), microbatches ({num_microbatches}) and virtual stages ({virtual_stages}) "
            f"must all be at least 1. Fix: pass positive counts."
        )
    if virtual_stages > 1 and name not in ("interleaved-1f1b", "zero-bubble"):
        raise ScheduleError(
            f"schedule '{name}' has one stage per rank, but --virtual-stages is {virtual_stages}. "
            f"Fix: use interleaved-1f1b or zero-bubble, or drop --virtual-stages."
        )
    if name == "1f1b":
        return one_f_one_b(num_stages, num_microbatches)
    if name == "gpipe":
        return gpipe(num_stages, num_microbatches)
    if name == "interleaved-1f1b":
        return interleaved_1f1b(num_stages, num_microbatches, virtual_stages)
    return zero_bubble(num_stages, num_microbatches, virtual_stages, split_backward)


def one_f_one_b(num_stages: int, num_microbatches: int) -> PipelineSchedule:
    """Synchronous 1F1B: ``min(S-s-1, M)`` warm-up forwards, alternate F and B, then the remaining Bs."""
    orders = []
    for s in range(num_stages):
        warmup = min(num_stages - s - 1, num_microbatches)
        order = [Instruction(s, FORWARD, j) for j in range(warmup)]
        for k in range(num_microbatches - warmup):
            order += [Instruction(s, FORWARD, warmup + k), Instruction(s, BACKWARD, k)]
        order += [Instruction(s, BACKWARD, j) for j in range(num_microbatches - warmup, num_microbatches)]
        orders.append(tuple(order))
    return PipelineSchedule("1f1b", num_microbatches, tuple(orders), tuple(range(num_stages)))


def gpipe(num_stages: int, num_microbatches: int) -> PipelineSchedule:
    """GPipe: every forward, then every backward, both in microbatch order."""
    orders = tuple(
        tuple(Instruction(s, FORWARD, j) for j in range(num_microbatches))
        + tuple(Instruction(s, BACKWARD, j) for j in range(num_microbatches))
        for s in range(num_stages)
    )
    return PipelineSchedule("gpipe", num_microbatches, orders, tuple(range(num_stages)))


def interleaved_1f1b(num_ranks: int, num_microbatches: int, virtual_stages: int) -> PipelineSchedule:
    """Interleaved 1F1B (Megatron-LM, as ``ScheduleInterleaved1F1B`` orders it).

    Rank ``r`` holds model stages ``r, r + S, r + 2S, ...``.
    """
    return _looped_schedule("interleaved-1f1b", num_ranks, num_microbatches, virtual_stages, zero_bubble=False)


def zero_bubble(
    num_ranks: int, num_microbatches: int, virtual_stages: int = 1, split_backward: bool = True
) -> PipelineSchedule:
    """Zero-bubble ZB1P (``ScheduleInterleavedZeroBubble``): weight gradients fill the bubbles."""
    schedule = _looped_schedule("zero-bubble", num_ranks, num_microbatches, virtual_stages, zero_bubble=True)
    if split_backward:
        return schedule
    whole = tuple(
        tuple(
            Instruction(ins.stage, BACKWARD, ins.microbatch) if ins.kind == BACKWARD_INPUT else ins
            for ins in order
            if ins.kind != BACKWARD_WEIGHT
        )
        for order in schedule.rank_orders
    )
    return PipelineSchedule(schedule.name, num_microbatches, whole, schedule.stage_ranks)


def _looped_schedule(
    name: str, num_ranks: int, num_microbatches: int, virtual_stages: int, zero_bubble: bool
) -> PipelineSchedule:
    rounds = max(1, num_microbatches // num_ranks)
    if num_microbatches % rounds:
        below = next(m for m in range(num_microbatches - 1, 0, -1) if _fits_rounds(m, num_ranks))
        above = next(m for m in range(num_microbatches + 1, 2 * num_microbatches + num_ranks) if _fits_rounds(m, num_ranks))
        raise ScheduleError(
            f"{name} with {num_ranks} ranks needs the microbatch count to be a multiple of {rounds} "
            f"(microbatches // ranks), got {num_microbatches}. Fix: use {below} or {above} microbatches."
        )
    per_round = num_microbatches // rounds
    total = virtual_stages * num_microbatches
    orders = []
    for rank in range(num_ranks):
        factor = 1 if zero_bubble else 2
        warmup = min((virtual_stages - 1) * per_round + factor * (num_ranks - 1 - rank), total)

        def forward_stage(step: int) -> int:
            return (step // per_round) % virtual_stages * num_ranks + rank

        def backward_stage(step: int) -> int:
            return (virtual_stages - 1 - ((step - warmup) // per_round) % virtual_stages) * num_ranks + rank

        next_mb: dict[tuple[int, str], int] = {}

        def take(stage: int, kind: str) -> Instruction:
            mb = next_mb.get((stage, kind), 0)
            next_mb[(stage, kind)] = mb + 1
            return Instruction(stage, kind, mb)

        order: list[Instruction] = []
        backward_steps: list[int] = []
        weights_done = 0
        backward_kind = BACKWARD_INPUT if zero_bubble else BACKWARD
        for step in range(total + warmup):
            if step < total:
                order.append(take(forward_stage(step), FORWARD))
            if step >= warmup:
                order.append(take(backward_stage(step), backward_kind))
                backward_steps.append(step)
                if zero_bubble and step - warmup >= rank:
                    order.append(take(backward_stage(backward_steps[weights_done]), BACKWARD_WEIGHT))
                    weights_done += 1
        if zero_bubble:
            for step in backward_steps[weights_done:]:
                order.append(take(backward_stage(step), BACKWARD_WEIGHT))
        orders.append(tuple(order))
    stage_ranks = tuple(v % num_ranks for v in range(num_ranks * virtual_stages))
    return PipelineSchedule(name, num_microbatches, tuple(orders), stage_ranks)


def _fits_rounds(num_microbatches: int, num_ranks: int) -> bool:
    """Whether looped schedules accept ``num_microbatches`` (a whole number of rounds)."""
    return num_microbatches % max(1, num_microbatches // num_ranks) == 0


def parse_action(action: object, where: str = "") -> list[Instruction]:
    """Compute instructions named by one ``torch.distributed.pipelining`` action.

    Accepts strings such as ``"0F0"`` or ``_Action`` objects (by their ``str``). Communication and
    sharding actions and ``None`` give no instruction; ``OVERLAP_F_B`` gives its sub-actions.
    """
    if action is None:
        return []
    text = str(action).strip()
    if not text:
        return []
    if text.startswith("(") and ")" in text:
        inner = text[1 : text.index(")")]
        return [ins for part in inner.split(";") for ins in parse_action(part, where)]
    match = _COMPUTE_ACTION.match(text)
    if match:
        stage, letter, mb = match.groups()
        return [Instruction(int(stage), _KIND_OF_LETTER[letter], int(mb))]
    if _COMM_ACTION.match(text):
        return []
    raise ScheduleError(
        f"{where}unknown action '{text}'. Fix: write actions as STAGE + F|B|I|W + MICROBATCH, e.g. '0F0', '1B3', '0I2', '0W2'."
    )


def from_actions(
    actions: Mapping[int, Sequence[object]] | Sequence[Sequence[object]], name: str = "custom"
) -> PipelineSchedule:
    """A schedule from per-rank action lists (rank -> actions in execution order).

    The lists may be ``pipeline_order`` of a ``torch.distributed.pipelining`` schedule, or the actions
    observed on each rank. Every stage must run on one rank, and every microbatch must have a
    forward and a backward (``B``, or ``I`` then ``W``) on every stage.
    """
    by_rank = dict(actions) if isinstance(actions, Mapping) else dict(enumerate(actions))
    if sorted(by_rank) != list(range(len(by_rank))) or not by_rank:
        raise ScheduleError(
            f"action lists are given for ranks {sorted(by_rank)}. Fix: give one list per rank, for ranks 0..N-1."
        )
    stage_rank: dict[int, int] = {}
    seen: dict[Instruction, str] = {}
    orders: list[tuple[Instruction, ...]] = []
    for rank in range(len(by_rank)):
        order: list[Instruction] = []
        for pos, action in enumerate(by_rank[rank]):
            where = f"rank {rank}, action {pos}: "
            for ins in parse_action(action, where):
                owner = stage_rank.setdefault(ins.stage, rank)
                if owner != rank:
                    raise ScheduleError(
                        f"{where}'{ins}' runs stage {ins.stage}, which rank {owner} also runs. "
                        f"Fix: each stage belongs to exactly one rank."
                    )
                if ins in seen:
                    raise ScheduleError(f"{where}'{ins}' repeats {seen[ins]}. Fix: run each instruction once per iteration.")
                seen[ins] = f"rank {rank}, action {pos}"
                order.append(ins)
        if not order:
            raise ScheduleError(
                f"rank {rank} runs no compute action. Fix: drop ranks without stages, or give rank {rank} its F and B actions."
            )
        orders.append(tuple(order))
    num_stages = 1 + max(stage_rank)
    num_microbatches = 1 + max(ins.microbatch for ins in seen)
    missing_stages = [v for v in range(num_stages) if v not in stage_rank]
    if missing_stages:
        raise ScheduleError(f"no rank runs stage(s) {missing_stages}. Fix: give every stage 0..{num_stages - 1} its actions.")
    for v in range(num_stages):
        for j in range(num_microbatches):
            _check_microbatch_complete(seen, v, j)
    return PipelineSchedule(name, num_microbatches, tuple(orders), tuple(stage_rank[v] for v in range(num_stages)))


def _check_microbatch_complete(seen: Mapping[Instruction, str], stage: int, mb: int) -> None:
    def has(kind: str) -> bool:
        return Instruction(stage, kind, mb) in seen

    fix = f"Fix: add the missing action on the rank that runs stage {stage}."
    if not has(FORWARD):
        raise ScheduleError(f"stage {stage} never runs forward of microbatch {mb} ('{stage}F{mb}'). {fix}")
    if has(BACKWARD) and (has(BACKWARD_INPUT) or has(BACKWARD_WEIGHT)):
        raise ScheduleError(f"stage {stage}, microbatch {mb} has both a full backward (B) and a split one (I/W). {fix}")
    if not has(BACKWARD) and not (has(BACKWARD_INPUT) and has(BACKWARD_WEIGHT)):
        raise ScheduleError(
            f"stage {stage}, microbatch {mb} has no complete backward: need '{stage}B{mb}', or both "
            f"'{stage}I{mb}' and '{stage}W{mb}'. {fix}"
        )

