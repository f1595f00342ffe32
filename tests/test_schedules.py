"""Built-in pipeline schedules, action-list parsing and the instruction DAG.

The expected orders come from outside the package: hand-written lists, DeepSpeed's
``TrainSchedule`` step arithmetic (re-typed below), and torch 2.13's own schedule classes.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import ScheduleError
from perseus_lightning.core.profile import BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD
from perseus_lightning.core.schedules import (
    Instruction,
    PipelineSchedule,
    build_schedule,
    from_actions,
    one_f_one_b,
    parse_action,
    zero_bubble,
)
from schedule_variants import VARIANTS

LOOPED = ("interleaved-1f1b", "zero-bubble")
SIZES: list[tuple[int, int]] = [(s, m) for s in (1, 2, 3, 4, 8) for m in (1, 2, 3, 4, 5, 8, 12, 24)]


def variant_id(variant: tuple[str, int, bool]) -> str:
    name, virtual, split = variant
    return f"{name}-V{virtual}" + ("" if name != "zero-bubble" else ("-split" if split else "-whole"))


def torch_accepts(num_ranks: int, num_microbatches: int) -> bool:
    """torch's rule for looped schedules: microbatches must be a multiple of max(1, M // S)."""
    return num_microbatches % max(1, num_microbatches // num_ranks) == 0


def build(variant: tuple[str, int, bool], num_ranks: int, num_microbatches: int) -> PipelineSchedule:
    name, virtual, split = variant
    return build_schedule(name, num_ranks, num_microbatches, virtual_stages=virtual, split_backward=split)


def valid_builds(variant: tuple[str, int, bool]) -> Iterator[tuple[int, int, PipelineSchedule]]:
    for num_ranks, num_microbatches in SIZES:
        if variant[0] in LOOPED and not torch_accepts(num_ranks, num_microbatches):
            continue
        yield num_ranks, num_microbatches, build(variant, num_ranks, num_microbatches)


def parse_list(text: str) -> list[str]:
    return text.split()


# --------------------------------------------------------------------------- built-in schedules
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_every_instruction_runs_once_on_the_rank_that_holds_its_stage(variant: tuple[str, int, bool]) -> None:
    name, virtual, split = variant
    splits_backward = name == "zero-bubble" and split
    checked = 0
    for num_ranks, num_microbatches, schedule in valid_builds(variant):
        num_stages = num_ranks * virtual
        assert schedule.num_ranks == num_ranks
        assert schedule.num_stages == num_stages
        assert schedule.num_microbatches == num_microbatches
        # Megatron / torch placement: rank r holds model stages r, r + S, r + 2S, ...
        assert schedule.stage_ranks == tuple(v % num_ranks for v in range(num_stages))

        kinds = (FORWARD, BACKWARD_INPUT, BACKWARD_WEIGHT) if splits_backward else (FORWARD, BACKWARD)
        expected = Counter(
            Instruction(v, kind, j) for v in range(num_stages) for j in range(num_microbatches) for kind in kinds
        )
        ran = Counter(ins for order in schedule.rank_orders for ins in order)
        assert ran == expected, f"S={num_ranks} M={num_microbatches}"
        assert schedule.num_instructions == sum(expected.values())

        for rank, order in enumerate(schedule.rank_orders):
            assert {ins.stage % num_ranks for ins in order} == {rank}
            position = {ins: k for k, ins in enumerate(order)}
            for ins in order:
                # a stage's forward precedes its backward on the same rank, and I precedes W
                if ins.kind in (BACKWARD, BACKWARD_INPUT):
                    assert position[Instruction(ins.stage, FORWARD, ins.microbatch)] < position[ins]
                if ins.kind == BACKWARD_WEIGHT:
                    assert position[Instruction(ins.stage, BACKWARD_INPUT, ins.microbatch)] < position[ins]
            for stage in {ins.stage for ins in order}:
                for kind in kinds:  # each (stage, kind) runs its microbatches in order, as torch counts them
                    mbs = [ins.microbatch for ins in order if ins.stage == stage and ins.kind == kind]
                    assert mbs == list(range(num_microbatches))
        InstructionDAG.from_schedule(schedule)  # no built-in schedule deadlocks
        checked += 1
    assert checked >= 20


def test_1f1b_explicit_orders_for_4_stages_6_microbatches() -> None:
    expected = [
        "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0B3 0B4 0B5",
        "1F0 1F1 1F2 1B0 1F3 1B1 1F4 1B2 1F5 1B3 1B4 1B5",
        "2F0 2F1 2B0 2F2 2B1 2F3 2B2 2F4 2B3 2F5 2B4 2B5",
        "3F0 3B0 3F1 3B1 3F2 3B2 3F3 3B3 3F4 3B4 3F5 3B5",
    ]
    assert build_schedule("1f1b", 4, 6).actions() == [parse_list(line) for line in expected]


def test_gpipe_explicit_orders() -> None:
    assert build_schedule("gpipe", 2, 3).actions() == [
        parse_list("0F0 0F1 0F2 0B0 0B1 0B2"),
        parse_list("1F0 1F1 1F2 1B0 1B1 1B2"),
    ]


def deepspeed_train_schedule(num_stages: int, stage: int, num_microbatches: int) -> list[str]:
    """Compute steps of DeepSpeed's ``TrainSchedule`` for one stage (its even/odd step arithmetic)."""
    order = []
    for step in range(2 * (num_microbatches + num_stages - 1)):
        even_step, even_stage = step % 2 == 0, stage % 2 == 0
        if even_step and even_stage:
            mb, forward = step // 2 - stage // 2, True
        elif not even_step and not even_stage:
            mb, forward = (step - 1) // 2 - stage // 2, True
        elif even_step and not even_stage:
            mb, forward = step // 2 - num_stages + (stage + 1) // 2, False
        else:
            mb, forward = (step - 1) // 2 - num_stages + 1 + stage // 2, False
        if 0 <= mb < num_microbatches:
            order.append(f"{stage}{'F' if forward else 'B'}{mb}")
    return order


@pytest.mark.parametrize("num_stages", range(1, 9))
def test_1f1b_equals_deepspeed_train_schedule(num_stages: int) -> None:
    for num_microbatches in range(1, 25):
        actions = build_schedule("1f1b", num_stages, num_microbatches).actions()
        for stage in range(num_stages):
            assert actions[stage] == deepspeed_train_schedule(num_stages, stage, num_microbatches), (
                f"S={num_stages} M={num_microbatches} stage {stage}"
            )


@settings(max_examples=150, deadline=None)
@given(num_stages=st.integers(1, 16), num_microbatches=st.integers(1, 64), data=st.data())
def test_1f1b_phases(num_stages: int, num_microbatches: int, data: st.DataObject) -> None:
    """Warm-up of min(S-s-1, M) forwards, then F/B alternation, then the remaining backwards."""
    stage = data.draw(st.integers(0, num_stages - 1))
    order = one_f_one_b(num_stages, num_microbatches).rank_orders[stage]
    warmup = min(num_stages - stage - 1, num_microbatches)
    steady = num_microbatches - warmup
    letters = "".join("F" if ins.kind == FORWARD else "B" for ins in order)
    assert letters == "F" * warmup + "FB" * steady + "B" * warmup
    assert all(ins.stage == stage for ins in order)
    assert [ins.microbatch for ins in order if ins.kind == FORWARD] == list(range(num_microbatches))
    assert [ins.microbatch for ins in order if ins.kind == BACKWARD] == list(range(num_microbatches))


def torch_rank_actions(cls: type, num_ranks: int, num_microbatches: int, virtual: int) -> list[list[object]]:
    """torch's per-rank compute actions, built without a process group (``None`` bubbles dropped)."""
    schedule = object.__new__(cls)
    schedule.n_local_stages = virtual
    schedule.pp_group_size = num_ranks
    schedule._n_microbatches = num_microbatches
    schedule.number_of_rounds = max(1, num_microbatches // num_ranks)
    schedule.microbatches_per_round = num_microbatches // schedule.number_of_rounds
    return [
        [action for action in schedule._calculate_single_rank_operations(rank) if action is not None]
        for rank in range(num_ranks)
    ]


TORCH_CLASSES = {"interleaved-1f1b": "ScheduleInterleaved1F1B", "zero-bubble": "ScheduleInterleavedZeroBubble"}


@pytest.mark.parametrize("name", list(TORCH_CLASSES))
@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_looped_schedules_equal_torch(name: str, num_ranks: int) -> None:
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    cls = getattr(schedules, TORCH_CLASSES[name])
    compared = 0
    for num_microbatches in range(1, 25):
        for virtual in (1, 2, 3):
            if not torch_accepts(num_ranks, num_microbatches):  # torch's constructor raises ValueError
                with pytest.raises(ScheduleError, match="multiple of"):
                    build_schedule(name, num_ranks, num_microbatches, virtual_stages=virtual)
                continue
            expected = [[str(a) for a in rank] for rank in torch_rank_actions(cls, num_ranks, num_microbatches, virtual)]
            ours = build_schedule(name, num_ranks, num_microbatches, virtual_stages=virtual).actions()
            assert ours == expected, f"S={num_ranks} M={num_microbatches} V={virtual}"
            compared += 1
    assert compared >= 30


@pytest.mark.parametrize("num_ranks", range(1, 9))
def test_zero_bubble_without_split_is_1f1b_with_one_stage_per_rank(num_ranks: int) -> None:
    for num_microbatches in range(1, 25):
        if torch_accepts(num_ranks, num_microbatches):
            whole = zero_bubble(num_ranks, num_microbatches, 1, split_backward=False)
            assert whole.rank_orders == one_f_one_b(num_ranks, num_microbatches).rank_orders


@pytest.mark.parametrize("virtual", [1, 2, 3])
def test_zero_bubble_without_split_keeps_the_split_order_of_input_gradients(virtual: int) -> None:
    split = zero_bubble(4, 8, virtual, split_backward=True)
    whole = zero_bubble(4, 8, virtual, split_backward=False)
    for split_order, whole_order in zip(split.rank_orders, whole.rank_orders):
        renamed = [
            Instruction(ins.stage, BACKWARD, ins.microbatch) if ins.kind == BACKWARD_INPUT else ins
            for ins in split_order
            if ins.kind != BACKWARD_WEIGHT
        ]
        assert list(whole_order) == renamed


# --------------------------------------------------------------------------- action lists
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_from_actions_round_trip(variant: tuple[str, int, bool]) -> None:
    for _, _, schedule in valid_builds(variant):
        again = from_actions(schedule.actions(), name=schedule.name)
        assert again.rank_orders == schedule.rank_orders
        assert again.stage_ranks == schedule.stage_ranks
        assert again.num_microbatches == schedule.num_microbatches
        assert again.name == schedule.name


def test_from_actions_accepts_a_rank_mapping_and_keeps_the_name() -> None:
    schedule = build_schedule("1f1b", 3, 4)
    again = from_actions(dict(enumerate(schedule.actions())), name="mine")
    assert again.rank_orders == schedule.rank_orders
    assert again.name == "mine"


@pytest.mark.parametrize(("name", "num_ranks", "num_microbatches", "virtual"), [
    ("interleaved-1f1b", 4, 8, 2),
    ("interleaved-1f1b", 3, 5, 3),
    ("zero-bubble", 4, 8, 2),
    ("zero-bubble", 2, 6, 1),
])
def test_from_actions_parses_torch_action_objects(name: str, num_ranks: int, num_microbatches: int, virtual: int) -> None:
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    cls = getattr(schedules, TORCH_CLASSES[name])
    schedule = object.__new__(cls)
    schedule.n_local_stages, schedule.pp_group_size, schedule._n_microbatches = virtual, num_ranks, num_microbatches
    schedule.number_of_rounds = max(1, num_microbatches // num_ranks)
    schedule.microbatches_per_round = num_microbatches // schedule.number_of_rounds
    with_bubbles = {rank: schedule._calculate_single_rank_operations(rank) for rank in range(num_ranks)}
    assert any(action is None for actions in with_bubbles.values() for action in actions) or num_ranks == 1
    expected = build_schedule(name, num_ranks, num_microbatches, virtual_stages=virtual)

    parsed = from_actions(with_bubbles, name=name)  # _Action objects and None bubbles
    assert parsed.rank_orders == expected.rank_orders
    assert parsed.stage_ranks == expected.stage_ranks

    compute_only = {rank: [a for a in actions if a is not None] for rank, actions in with_bubbles.items()}
    with_comms = schedules._add_send_recv(compute_only, lambda stage: stage % num_ranks, num_ranks * virtual)
    comm_names = {str(a) for actions in with_comms.values() for a in actions if not a.is_compute_op}
    if num_ranks > 1:
        assert any("SEND_F" in c for c in comm_names) and any("RECV_B" in c for c in comm_names)
    assert from_actions(with_comms, name=name).rank_orders == expected.rank_orders


def test_overlapped_forward_backward_gives_its_sub_actions() -> None:
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    action, kind = schedules._Action, schedules._ComputationType
    overlap = action(-1, kind.OVERLAP_F_B, None, (action(0, kind.FORWARD, 1), action(0, kind.FULL_BACKWARD, 0)))
    assert str(overlap) == "(0F1;0B0)OVERLAP_F_B"
    assert parse_action(overlap) == [Instruction(0, FORWARD, 1), Instruction(0, BACKWARD, 0)]
    schedule = from_actions([[action(0, kind.FORWARD, 0), overlap, "0B1"]])
    assert schedule.actions() == [["0F0", "0F1", "0B0", "0B1"]]


@pytest.mark.parametrize("action", [
    "0SEND_F0", "1RECV_F3", "2SEND_B1", "0RECV_B0", "0UNSHARD", "3RESHARD", "1REDUCE_GRAD", "", "  ", None,
])
def test_communication_and_empty_actions_give_no_instruction(action: object) -> None:
    assert parse_action(action) == []


def test_compute_actions_parse_to_instructions() -> None:
    assert parse_action(" 12I7 ") == [Instruction(12, BACKWARD_INPUT, 7)]
    assert parse_action("3W0") == [Instruction(3, BACKWARD_WEIGHT, 0)]
    assert [str(i) for i in parse_action("(1F2;1I0)OVERLAP_F_B")] == ["1F2", "1I0"]


def test_torch_comm_action_objects_are_ignored() -> None:
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    action, kind = schedules._Action, schedules._ComputationType
    comms = [action(0, kind.SEND_F, 0), action(1, kind.RECV_F, 0), action(0, kind.UNSHARD), action(0, kind.REDUCE_GRAD)]
    assert [parse_action(a) for a in comms] == [[], [], [], []]


def error_text(call: object, *args: object, **kwargs: object) -> str:
    with pytest.raises(ScheduleError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return str(info.value)


def assert_phrases(message: str, *phrases: str) -> None:
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in {message!r}"


def test_unknown_action_string() -> None:
    message = error_text(from_actions, [["0F0", "0X0", "0B0"]])
    assert_phrases(message, "rank 0, action 1", "unknown action '0X0'", "Fix: write actions as STAGE + F|B|I|W + MICROBATCH")


def test_stage_on_two_ranks() -> None:
    message = error_text(from_actions, [["0F0", "0B0"], ["0F1", "0B1"]])
    assert_phrases(message, "rank 1, action 0", "'0F1' runs stage 0, which rank 0 also runs", "Fix: each stage belongs to exactly one rank")


def test_repeated_action() -> None:
    message = error_text(from_actions, [["0F0", "0B0", "0F0"]])
    assert_phrases(message, "rank 0, action 2", "'0F0' repeats rank 0, action 0", "Fix: run each instruction once per iteration")


def test_missing_forward() -> None:
    message = error_text(from_actions, [["0F0", "0B0", "0B1"]])
    assert_phrases(message, "stage 0 never runs forward of microbatch 1 ('0F1')", "Fix: add the missing action on the rank that runs stage 0")


def test_missing_backward() -> None:
    message = error_text(from_actions, [["0F0", "0F1", "0B0"], ["1F0", "1F1", "1B0", "1B1"]])
    assert_phrases(message, "stage 0, microbatch 1 has no complete backward", "Fix: add the missing action on the rank that runs stage 0")
    message = error_text(from_actions, [["0F0", "0I0"]])
    assert_phrases(message, "stage 0, microbatch 0 has no complete backward: need '0B0', or both '0I0' and '0W0'", "Fix: add the missing action")


def test_full_backward_mixed_with_split_backward() -> None:
    message = error_text(from_actions, [["0F0", "0B0", "0W0"]])
    assert_phrases(message, "stage 0, microbatch 0 has both a full backward (B) and a split one (I/W)", "Fix:")


def test_ranks_must_be_numbered_from_zero_and_actions_must_compute() -> None:
    assert_phrases(error_text(from_actions, {0: ["0F0", "0B0"], 2: ["1F0", "1B0"]}), "ranks [0, 2]", "Fix: give one list per rank, for ranks 0..N-1")
    assert_phrases(error_text(from_actions, []), "Fix: give one list per rank")
    assert_phrases(error_text(from_actions, [["0SEND_F0"], []]), "rank 0 runs no compute action", "Fix: drop ranks without stages")
    assert_phrases(error_text(from_actions, [["0F0", "1F0", "1B0", "0B0"], []]), "rank 1 runs no compute action")
    assert_phrases(error_text(from_actions, [["0F0", "0B0"], ["2F0", "2B0"]]), "no rank runs stage(s) [1]", "Fix: give every stage 0..2 its actions")


def test_unknown_schedule_name() -> None:
    message = error_text(build_schedule, "pipedream", 4, 8)
    assert_phrases(message, "unknown schedule 'pipedream'", "Fix: use one of 1f1b, gpipe, interleaved-1f1b, zero-bubble")


@pytest.mark.parametrize(("stages", "microbatches", "virtual"), [(0, 4, 1), (4, 0, 1), (4, 4, 0), (-1, 4, 1)])
def test_bad_counts(stages: int, microbatches: int, virtual: int) -> None:
    message = error_text(build_schedule, "1f1b", stages, microbatches, virtual_stages=virtual)
    assert_phrases(message, f"stages ({stages}), microbatches ({microbatches}) and virtual stages ({virtual})",
                   "must all be at least 1", "Fix: pass positive counts")


@pytest.mark.parametrize("name", ["interleaved-1f1b", "zero-bubble"])
def test_interleaved_microbatch_multiple_rule(name: str) -> None:
    message = error_text(build_schedule, name, 4, 9, virtual_stages=2)
    assert_phrases(message, f"{name} with 4 ranks", "multiple of 2", "got 9", "Fix: use 8 or 10 microbatches")
    build_schedule(name, 4, 8, virtual_stages=2)
    build_schedule(name, 4, 10, virtual_stages=2)
    build_schedule(name, 4, 7, virtual_stages=2)  # fewer than 2S microbatches: one round, always accepted


def suggested_counts(message: str) -> tuple[int, int]:
    match = re.search(r"Fix: use (\d+) or (\d+) microbatches", message)
    assert match, message
    return int(match.group(1)), int(match.group(2))


def rejected_sizes() -> Iterator[tuple[int, int]]:
    for num_ranks in range(1, 9):
        for num_microbatches in range(1, 100):
            if not torch_accepts(num_ranks, num_microbatches):
                yield num_ranks, num_microbatches


def test_the_lower_suggested_microbatch_count_is_accepted() -> None:
    for num_ranks, num_microbatches in rejected_sizes():
        lower, _ = suggested_counts(error_text(build_schedule, "interleaved-1f1b", num_ranks, num_microbatches, 2))
        assert lower < num_microbatches and torch_accepts(num_ranks, lower)


def test_the_upper_suggested_microbatch_count_is_accepted() -> None:
    bad = []
    for num_ranks, num_microbatches in rejected_sizes():
        _, upper = suggested_counts(error_text(build_schedule, "interleaved-1f1b", num_ranks, num_microbatches, 2))
        if not torch_accepts(num_ranks, upper):
            bad.append((num_ranks, num_microbatches, upper))
    assert not bad, f"{len(bad)} rejected suggestions, e.g. (S, M, suggested) = {bad[:3]}"


@pytest.mark.parametrize("name", ["1f1b", "gpipe"])
def test_virtual_stages_with_a_single_stage_schedule(name: str) -> None:
    message = error_text(build_schedule, name, 4, 8, virtual_stages=2)
    assert_phrases(message, f"schedule '{name}' has one stage per rank", "--virtual-stages is 2",
                   "Fix: use interleaved-1f1b or zero-bubble, or drop --virtual-stages")


def test_deadlocking_action_lists_name_the_blocked_ranks() -> None:
    # Rank 0 runs 0B1 before 0F1, but 0B1 needs 1B1 <- 1F1 <- 0F1: a cycle through both ranks.
    schedule = from_actions([["0F0", "0B1", "0F1", "0B0"], ["1F0", "1B0", "1F1", "1B1"]])
    message = error_text(InstructionDAG.from_schedule, schedule)
    assert_phrases(message, "schedule 'custom' deadlocks", "rank 0 at '0B1'", "rank 1 at '1F1'", "Fix: order each rank's actions")


def test_backward_before_forward_on_the_last_stage_deadlocks() -> None:
    schedule = from_actions([["0F0", "0B0"], ["1B0", "1F0"]], name="bad")
    message = error_text(InstructionDAG.from_schedule, schedule)
    assert_phrases(message, "schedule 'bad' deadlocks", "rank 0 at '0B0'", "rank 1 at '1B0'")


def test_unusual_but_feasible_order_is_accepted() -> None:
    # Rank 1 takes microbatch 1 first: slow, but it does not deadlock.
    schedule = from_actions([["0F0", "0F1", "0B1", "0B0"], ["1F0", "1F1", "1B1", "1B0"]])
    dag = InstructionDAG.from_schedule(schedule)
    assert dag.num_nodes == 8


# --------------------------------------------------------------------------- DAG
def expected_edges(schedule: PipelineSchedule) -> Counter[tuple[Instruction, Instruction]]:
    """Execution-order edges plus the model's data dependencies, derived here from the design rules."""
    edges: Counter[tuple[Instruction, Instruction]] = Counter()
    present = {ins for order in schedule.rank_orders for ins in order}
    last = max(ins.stage for ins in present)
    for order in schedule.rank_orders:
        edges.update(zip(order, order[1:]))
    for ins in present:
        v, j = ins.stage, ins.microbatch
        if ins.kind == FORWARD and v > 0:
            edges[(Instruction(v - 1, FORWARD, j), ins)] += 1
        elif ins.kind in (BACKWARD, BACKWARD_INPUT):
            if v == last:
                edges[(Instruction(v, FORWARD, j), ins)] += 1
            else:
                (grad,) = [g for g in (Instruction(v + 1, BACKWARD, j), Instruction(v + 1, BACKWARD_INPUT, j)) if g in present]
                edges[(grad, ins)] += 1
        elif ins.kind == BACKWARD_WEIGHT:
            edges[(Instruction(v, BACKWARD_INPUT, j), ins)] += 1
    return edges


def dag_edges(dag: InstructionDAG) -> Counter[tuple[Instruction, Instruction]]:
    return Counter(
        (dag.instructions[s], dag.instructions[t]) for s, t in zip(dag.edge_sources.tolist(), dag.edge_targets.tolist())
    )


def data_edge_count(num_stages: int, num_microbatches: int, split: bool) -> int:
    forward = (num_stages - 1) * num_microbatches
    backward = num_stages * num_microbatches  # B(v+1)->B(v) for v < last, plus F->B on the last stage
    weight = num_stages * num_microbatches if split else 0
    return forward + backward + weight


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_dag_edges_are_execution_order_plus_data_dependencies(variant: tuple[str, int, bool]) -> None:
    for num_ranks, num_microbatches, schedule in valid_builds(variant):
        dag = InstructionDAG.from_schedule(schedule)
        split = any(ins.kind == BACKWARD_WEIGHT for ins in dag.instructions)
        order_edges = sum(len(order) - 1 for order in schedule.rank_orders)
        assert len(dag.edge_sources) == len(dag.edge_targets)
        assert len(dag.edge_sources) == order_edges + data_edge_count(schedule.num_stages, num_microbatches, split)
        assert dag_edges(dag) == expected_edges(schedule)

        # nodes, ranks and topological order
        assert dag.num_nodes == schedule.num_instructions
        for rank, order in enumerate(schedule.rank_orders):
            nodes = list(dag.rank_nodes(rank))
            assert [dag.instructions[n] for n in nodes] == list(order)
            assert all(dag.ranks[n] == rank for n in nodes)
            assert all(dag.index(dag.instructions[n]) == n for n in nodes)
        position = {int(node): k for k, node in enumerate(dag.topological_order)}
        assert sorted(position) == list(range(dag.num_nodes))
        assert all(position[s] < position[t] for s, t in zip(dag.edge_sources.tolist(), dag.edge_targets.tolist()))
        incoming: list[Counter[int]] = [Counter() for _ in range(dag.num_nodes)]
        for s, t in zip(dag.edge_sources.tolist(), dag.edge_targets.tolist()):
            incoming[t][s] += 1
        assert [Counter(preds) for preds in dag.predecessors] == incoming


def test_specific_dag_edges() -> None:
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", 4, 6))
    edges = dag_edges(dag)
    F, B = FORWARD, BACKWARD
    for j in range(6):
        for v in range(3):
            assert edges[(Instruction(v, F, j), Instruction(v + 1, F, j))] == 1
            assert edges[(Instruction(v + 1, B, j), Instruction(v, B, j))] == 1
        assert edges[(Instruction(3, F, j), Instruction(3, B, j))] >= 1  # also an execution-order edge on stage 3
    assert edges[(Instruction(0, F, 3), Instruction(0, B, 0))] == 1  # stage 0's order: ... 0F3 0B0 ...
    assert edges[(Instruction(0, B, 0), Instruction(0, F, 0))] == 0

    zb = InstructionDAG.from_schedule(build_schedule("zero-bubble", 2, 4, virtual_stages=2))
    zb_edges = dag_edges(zb)
    for v in range(4):
        for j in range(4):
            assert zb_edges[(Instruction(v, BACKWARD_INPUT, j), Instruction(v, BACKWARD_WEIGHT, j))] >= 1
    assert zb_edges[(Instruction(2, BACKWARD_INPUT, 1), Instruction(1, BACKWARD_INPUT, 1))] == 1  # across ranks, chunk 1 -> 0
    assert zb_edges[(Instruction(1, FORWARD, 0), Instruction(2, FORWARD, 0))] == 1  # rank 1 chunk 0 -> rank 0 chunk 1
    assert zb_edges[(Instruction(3, FORWARD, 2), Instruction(3, BACKWARD_INPUT, 2))] >= 1


@pytest.mark.parametrize("variant", [("1f1b", 1, True), ("gpipe", 1, True), ("interleaved-1f1b", 2, True), ("zero-bubble", 1, True)], ids=variant_id)
def test_dag_edge_count_is_linear_in_the_number_of_instructions(variant: tuple[str, int, bool]) -> None:
    small = InstructionDAG.from_schedule(build(variant, 8, 96))
    large = InstructionDAG.from_schedule(build(variant, 8, 192))
    assert large.num_nodes == 2 * small.num_nodes
    for dag in (small, large):
        assert len(dag.edge_sources) <= 3 * dag.num_nodes
    # N - R execution edges plus data edges proportional to M: doubling M adds no superlinear term.
    assert len(large.edge_sources) == 2 * len(small.edge_sources) + 8


def schedule_from_text(lines: Sequence[str]) -> PipelineSchedule:
    return from_actions([parse_list(line) for line in lines])


def test_dag_of_a_mixed_split_and_whole_backward_schedule() -> None:
    # Stage 1 splits its backward, stage 0 does not: 0B0 must wait on 1I0.
    schedule = schedule_from_text(["0F0 0B0", "1F0 1I0 1W0"])
    edges = dag_edges(InstructionDAG.from_schedule(schedule))
    assert edges[(Instruction(1, BACKWARD_INPUT, 0), Instruction(0, BACKWARD, 0))] == 1
    assert edges == expected_edges(schedule)
