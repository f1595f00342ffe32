"""The exact simulator against an independent discrete-event reference, plus plans and data parallelism.

The reference below does not use :class:`InstructionDAG`: it walks each rank's execution order and
starts an instruction once its rank is free and its data dependencies (derived here from the model
rules in design.md) have finished. Costs come from the raw synthetic data, not from ``Profile``.
"""

from __future__ import annotations

import csv
import heapq
import json
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.errors import PlanError, ProfileError
from perseus_lightning.core.plan import FrequencyPlan, check_frequencies
from perseus_lightning.core.profile import BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD, Profile
from perseus_lightning.core.schedules import Instruction, PipelineSchedule, build_schedule
from perseus_lightning.core.simulator import simulate, simulate_data_parallel
from schedule_variants import VARIANTS

RawProfile = dict[tuple[int, str], dict[int, tuple[float, float]]]
"""(profile stage, kind) -> {MHz: (seconds, joules)}."""

SHARED_CLOCKS = np.arange(900, 1500, 30)
EXTRA_CLOCKS = np.arange(1501, 1700, 7)  # clocks only some instructions were measured at

MICROBATCH_COUNTS = (1, 4, 7, 12, 24)


def variant_id(variant: tuple[str, int, bool]) -> str:
    name, virtual, split = variant
    return f"{name}-V{virtual}" + ("" if name != "zero-bubble" else ("-split" if split else "-whole"))


def torch_accepts(num_ranks: int, num_microbatches: int) -> bool:
    return num_microbatches % max(1, num_microbatches // num_ranks) == 0


# --------------------------------------------------------------------------- synthetic data
def random_raw_profile(rng: np.random.Generator, num_stages: int, split_backward: bool) -> RawProfile:
    """Random (time, energy) per clock. Every instruction shares a few clocks and may have extra ones."""
    shared = rng.choice(SHARED_CLOCKS, size=int(rng.integers(1, 5)), replace=False)
    kinds = (FORWARD, BACKWARD) + ((BACKWARD_INPUT, BACKWARD_WEIGHT) if split_backward else ())
    raw: RawProfile = {}
    for stage in range(num_stages):
        for kind in kinds:
            extra = rng.choice(EXTRA_CLOCKS, size=int(rng.integers(0, 3)), replace=False)
            clocks = sorted({int(f) for f in shared} | {int(f) for f in extra})
            raw[(stage, kind)] = {f: (float(rng.uniform(0.005, 0.2)), float(rng.uniform(0.5, 60.0))) for f in clocks}
    return raw


def profile_from_raw(raw: RawProfile) -> Profile:
    return Profile.from_rows(
        [(stage, kind, f, t, e) for (stage, kind), points in raw.items() for f, (t, e) in points.items()]
    )


def read_raw_csv(path: Path) -> RawProfile:
    raw: RawProfile = {}
    with path.open(newline="") as fh:
        for row in csv.DictReader(fh):
            key = (int(row["stage"]), row["instruction"])
            raw.setdefault(key, {})[int(row["frequency"])] = (float(row["time"]), float(row["energy"]))
    return raw


def common_max_clock(raw: RawProfile) -> int:
    return max(set.intersection(*(set(points) for points in raw.values())))


# --------------------------------------------------------------------------- reference executor
def data_dependencies(ins: Instruction, last_stage: int, present: set[Instruction]) -> list[Instruction]:
    """The model's data dependencies (design.md): activations forward, gradients backward, I before W."""
    v, j = ins.stage, ins.microbatch
    if ins.kind == FORWARD:
        return [Instruction(v - 1, FORWARD, j)] if v > 0 else []
    if ins.kind == BACKWARD_WEIGHT:
        return [Instruction(v, BACKWARD_INPUT, j)]
    if v == last_stage:
        return [Instruction(v, FORWARD, j)]
    return [g for g in (Instruction(v + 1, BACKWARD, j), Instruction(v + 1, BACKWARD_INPUT, j)) if g in present]


def profile_key(rank: int, ins: Instruction, per_rank_profile: bool) -> tuple[int, str]:
    return (rank if per_rank_profile else ins.stage, ins.kind)


def reference_costs(
    schedule: PipelineSchedule,
    raw: RawProfile,
    per_rank_profile: bool,
    clock: dict[Instruction, int],
    slowdown: float = 1.0,
) -> dict[Instruction, tuple[float, float]]:
    """(time, energy) of each instruction; a per-rank profile is shared equally by the rank's model chunks."""
    costs = {}
    for rank, order in enumerate(schedule.rank_orders):
        chunks = len({ins.stage for ins in order}) if per_rank_profile else 1
        for ins in order:
            t, e = raw[profile_key(rank, ins, per_rank_profile)][clock[ins]]
            costs[ins] = (t / chunks * slowdown, e / chunks * slowdown)
    return costs


@dataclass
class ReferenceRun:
    start: dict[Instruction, float]
    end: dict[Instruction, float]
    iteration_time: float
    energy: float
    busy: list[float]
    compute_energy: list[float]


def reference_execute(
    rank_orders: Sequence[Sequence[Instruction]], costs: dict[Instruction, tuple[float, float]], p2p_power: float
) -> ReferenceRun:
    """Discrete-event execution: at each event time, every idle rank starts its next instruction if its
    data dependencies have finished. Then E = sum E_i + P_block * (R*T - sum t_i)."""
    present = {ins for order in rank_orders for ins in order}
    last_stage = max(ins.stage for ins in present)
    next_position = [0] * len(rank_orders)
    free_at = [0.0] * len(rank_orders)
    start: dict[Instruction, float] = {}
    end: dict[Instruction, float] = {}
    events = [0.0]
    while events:
        now = heapq.heappop(events)
        for rank, order in enumerate(rank_orders):
            if next_position[rank] == len(order) or free_at[rank] > now:
                continue
            ins = order[next_position[rank]]
            if all(dep in end and end[dep] <= now for dep in data_dependencies(ins, last_stage, present)):
                start[ins], end[ins] = now, now + costs[ins][0]
                free_at[rank] = end[ins]
                next_position[rank] += 1
                heapq.heappush(events, end[ins])
    blocked = [rank for rank, order in enumerate(rank_orders) if next_position[rank] < len(order)]
    assert not blocked, f"reference executor deadlocked on ranks {blocked}"
    iteration_time = max(end.values())
    busy = [sum(costs[ins][0] for ins in order) for order in rank_orders]
    compute_energy = [sum(costs[ins][1] for ins in order) for order in rank_orders]
    energy = sum(compute_energy) + p2p_power * (len(rank_orders) * iteration_time - sum(busy))
    return ReferenceRun(start, end, iteration_time, energy, busy, compute_energy)


def assert_simulation_matches(result: object, dag: InstructionDAG, reference: ReferenceRun, p2p_power: float) -> None:
    rel = 1e-9
    assert result.iteration_time == pytest.approx(reference.iteration_time, rel=rel)
    assert result.energy == pytest.approx(reference.energy, rel=rel)
    expected_start = np.array([reference.start[ins] for ins in dag.instructions])
    expected_end = np.array([reference.end[ins] for ins in dag.instructions])
    np.testing.assert_allclose(result.start, expected_start, rtol=rel, atol=1e-12)
    np.testing.assert_allclose(result.end, expected_end, rtol=rel, atol=1e-12)
    T = reference.iteration_time
    assert len(result.ranks) == len(reference.busy)
    for usage, busy, compute in zip(result.ranks, reference.busy, reference.compute_energy):
        assert usage.busy == pytest.approx(busy, rel=rel)
        assert usage.idle == pytest.approx(T - busy, rel=rel, abs=1e-9)
        assert usage.compute_energy == pytest.approx(compute, rel=rel)
        assert usage.idle_energy == pytest.approx(p2p_power * (T - busy), rel=rel, abs=1e-9)
    assert sum(u.energy for u in result.ranks) == pytest.approx(reference.energy, rel=rel)


def run_random_case(
    variant: tuple[str, int, bool],
    num_ranks: int,
    num_microbatches: int,
    per_rank_profile: bool,
    seed: int,
    slowdown: float = 1.0,
) -> None:
    name, virtual, split = variant
    rng = np.random.default_rng(seed)
    schedule = build_schedule(name, num_ranks, num_microbatches, virtual_stages=virtual, split_backward=split)
    dag = InstructionDAG.from_schedule(schedule)
    raw = random_raw_profile(rng, num_ranks if per_rank_profile else schedule.num_stages, split_backward=name == "zero-bubble")
    profile = profile_from_raw(raw)
    clock = {}
    for rank, order in enumerate(schedule.rank_orders):
        for ins in order:
            clock[ins] = int(rng.choice(sorted(raw[profile_key(rank, ins, per_rank_profile)])))
    plan = FrequencyPlan(tuple(clock[ins] for ins in dag.instructions))
    p2p_power = float(rng.uniform(0.0, 120.0))

    result = simulate(dag, profile, p2p_power, plan, slowdown=slowdown)
    reference = reference_execute(schedule.rank_orders, reference_costs(schedule, raw, per_rank_profile, clock, slowdown), p2p_power)
    assert_simulation_matches(result, dag, reference, p2p_power)
    assert result.frequencies.tolist() == list(plan.frequencies)


@pytest.mark.parametrize("num_ranks", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_simulation_matches_reference_executor(variant: tuple[str, int, bool], num_ranks: int) -> None:
    ran = 0
    for num_microbatches in MICROBATCH_COUNTS:
        if variant[0] in ("interleaved-1f1b", "zero-bubble") and not torch_accepts(num_ranks, num_microbatches):
            continue
        for per_rank_profile in (False, True) if variant[1] > 1 else (False,):
            seed = zlib.crc32(repr((variant, num_ranks, num_microbatches, per_rank_profile)).encode())
            run_random_case(variant, num_ranks, num_microbatches, per_rank_profile, seed)
            ran += 1
    assert ran >= 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(
    variant=st.sampled_from(VARIANTS),
    num_ranks=st.integers(1, 8),
    num_microbatches=st.integers(1, 24),
    per_rank_profile=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
    slowdown=st.one_of(st.just(1.0), st.floats(1.0, 2.0)),
)
def test_simulation_matches_reference_executor_random(
    variant: tuple[str, int, bool], num_ranks: int, num_microbatches: int, per_rank_profile: bool, seed: int, slowdown: float
) -> None:
    assume(variant[0] not in ("interleaved-1f1b", "zero-bubble") or torch_accepts(num_ranks, num_microbatches))
    run_random_case(variant, num_ranks, num_microbatches, per_rank_profile, seed, slowdown)


@pytest.mark.parametrize("variant", [("1f1b", 1, True), ("interleaved-1f1b", 2, True), ("zero-bubble", 2, True)], ids=variant_id)
def test_default_plan_is_the_highest_clock_every_instruction_has(variant: tuple[str, int, bool]) -> None:
    name, virtual, split = variant
    rng = np.random.default_rng(7)
    schedule = build_schedule(name, 4, 8, virtual_stages=virtual, split_backward=split)
    dag = InstructionDAG.from_schedule(schedule)
    raw = random_raw_profile(rng, 4, split_backward=name == "zero-bubble")  # one stage per rank
    top = common_max_clock(raw)
    assert any(max(points) > top for points in raw.values())  # some instructions have faster, non-shared clocks
    result = simulate(dag, profile_from_raw(raw), 50.0)
    assert set(result.frequencies.tolist()) == {top}
    clock = {ins: top for order in schedule.rank_orders for ins in order}
    reference = reference_execute(schedule.rank_orders, reference_costs(schedule, raw, True, clock), 50.0)
    assert_simulation_matches(result, dag, reference, 50.0)


def test_per_rank_profile_is_split_across_the_ranks_chunks() -> None:
    """A rank holding V chunks runs each chunk in 1/V of its profiled time and energy."""
    raw = {(0, FORWARD): {1000: (0.3, 3.0)}, (0, BACKWARD): {1000: (0.6, 6.0)},
           (1, FORWARD): {1000: (0.9, 9.0)}, (1, BACKWARD): {1000: (1.5, 15.0)}}
    dag = InstructionDAG.from_schedule(build_schedule("interleaved-1f1b", 2, 2, virtual_stages=3))
    result = simulate(dag, profile_from_raw(raw), 0.0)
    for node, ins in enumerate(dag.instructions):
        t, e = raw[(ins.stage % 2, ins.kind)][1000]
        assert result.instruction_time[node] == pytest.approx(t / 3)
        assert result.instruction_energy[node] == pytest.approx(e / 3)
    assert result.compute_energy == pytest.approx(2 * (3 + 6 + 9 + 15))  # 2 microbatches, the whole model each


def test_profile_with_the_wrong_stage_count_is_rejected() -> None:
    raw = random_raw_profile(np.random.default_rng(1), 3, split_backward=False)
    dag = InstructionDAG.from_schedule(build_schedule("interleaved-1f1b", 4, 8, virtual_stages=2))
    with pytest.raises(ProfileError) as info:
        simulate(dag, profile_from_raw(raw), 10.0)
    message = str(info.value)
    assert "has 3 stages but the pipeline needs 4 (one per rank) or 8 (one per model chunk)" in message
    assert "Fix: pass --stages 3" in message


def test_split_backward_schedule_needs_a_split_profile() -> None:
    raw = random_raw_profile(np.random.default_rng(2), 2, split_backward=False)
    dag = InstructionDAG.from_schedule(build_schedule("zero-bubble", 2, 2))
    with pytest.raises(ProfileError, match="no 'backward_input' rows for stage"):
        simulate(dag, profile_from_raw(raw), 10.0)


def test_summary_and_timeline_agree_with_the_arrays() -> None:
    rng = np.random.default_rng(3)
    raw = random_raw_profile(rng, 3, split_backward=False)
    dag = InstructionDAG.from_schedule(build_schedule("gpipe", 3, 4))
    result = simulate(dag, profile_from_raw(raw), 40.0)
    summary = result.to_dict(timeline=True)
    assert summary["schedule"] == "gpipe" and summary["stages_count"] == 3 and summary["microbatches"] == 4
    assert summary["iteration_time"] == result.iteration_time == float(result.end.max())
    assert summary["energy"] == pytest.approx(result.compute_energy + result.idle_energy)
    assert summary["idle_energy"] == pytest.approx(40.0 * (3 * result.iteration_time - result.instruction_time.sum()))
    assert [s["busy"] for s in summary["stages"]] == [u.busy for u in result.ranks]
    timeline = summary["timeline"]
    assert len(timeline) == dag.num_nodes
    for node, entry in enumerate(timeline):
        ins = dag.instructions[node]
        expected = (int(dag.ranks[node]), ins.stage, ins.kind, ins.microbatch, int(result.frequencies[node]))
        assert (entry["rank"], entry["stage"], entry["instruction"], entry["microbatch"], entry["frequency"]) == expected
        assert (entry["start"], entry["end"]) == (result.start[node], result.end[node])
    json.dumps(summary)  # JSON-ready


# --------------------------------------------------------------------------- measured data
def test_reference_value_gpt3_a100_1f1b(shared_profile_path: Path) -> None:
    profile = Profile.load(shared_profile_path)
    schedule = build_schedule("1f1b", 8, 12)
    dag = InstructionDAG.from_schedule(schedule)
    result = simulate(dag, profile, 83.64)
    assert result.iteration_time == pytest.approx(2.83651, rel=1e-4)
    assert result.energy == pytest.approx(7339.00, rel=1e-4)

    raw = read_raw_csv(shared_profile_path)
    clock = {ins: common_max_clock(raw) for order in schedule.rank_orders for ins in order}
    assert set(clock.values()) == {1410}
    reference = reference_execute(schedule.rank_orders, reference_costs(schedule, raw, False, clock), 83.64)
    assert_simulation_matches(result, dag, reference, 83.64)


# --------------------------------------------------------------------------- data parallelism
# Two stages, one microbatch. At 1000 MHz: F0 1 s/10 J, B0 2 s/20 J, F1 1.5 s/15 J, B1 2.5 s/25 J.
# At 800 MHz: F0 2 s/8 J, B0 4 s/16 J, F1 3 s/12 J, B1 5 s/20 J.
TINY_ROWS = [
    (0, FORWARD, 1000, 1.0, 10.0), (0, BACKWARD, 1000, 2.0, 20.0), (1, FORWARD, 1000, 1.5, 15.0), (1, BACKWARD, 1000, 2.5, 25.0),
    (0, FORWARD, 800, 2.0, 8.0), (0, BACKWARD, 800, 4.0, 16.0), (1, FORWARD, 800, 3.0, 12.0), (1, BACKWARD, 800, 5.0, 20.0),
]
TINY_P2P = 10.0


@pytest.fixture
def tiny() -> tuple[InstructionDAG, Profile]:
    return InstructionDAG.from_schedule(build_schedule("1f1b", 2, 1)), Profile.from_rows(TINY_ROWS)


def test_tiny_pipeline_by_hand(tiny: tuple[InstructionDAG, Profile]) -> None:
    dag, profile = tiny
    result = simulate(dag, profile, TINY_P2P)
    # F0 [0,1], F1 [1,2.5], B1 [2.5,5], B0 [5,7]; busy 3 and 4; E = 70 + 10*(2*7 - 7)
    assert result.iteration_time == pytest.approx(7.0)
    assert result.energy == pytest.approx(140.0)
    assert [u.busy for u in result.ranks] == pytest.approx([3.0, 4.0])
    assert [u.idle_energy for u in result.ranks] == pytest.approx([40.0, 30.0])
    start = {str(ins): float(s) for ins, s in zip(dag.instructions, result.start)}
    assert start == pytest.approx({"0F0": 0.0, "0B0": 5.0, "1F0": 1.0, "1B0": 2.5})


def test_data_parallel_straggler_by_hand(tiny: tuple[InstructionDAG, Profile]) -> None:
    dag, profile = tiny
    run = simulate_data_parallel(dag, profile, TINY_P2P, pipelines=3, straggler_slowdown=1.5)
    # straggler: T = 10.5, E = 1.5*70 + 10*(21 - 10.5) = 210; others: 140 + 2 GPUs * 10 W * (10.5 - 7) = 210
    assert run.sync_time == pytest.approx(10.5)
    assert run.pipeline_energy(run.straggler) == pytest.approx(210.0)
    assert run.pipeline_energy(run.others) == pytest.approx(210.0)
    assert run.energy == pytest.approx(210.0 + 2 * 210.0)
    summary = run.to_dict()
    assert summary["energy"] == pytest.approx(630.0) and summary["others_iteration_time"] == pytest.approx(7.0)

    # Others slowed to 800 MHz: T = 2 + 3 + 5 + 4 = 14 > 10.5, so the straggler waits for them.
    slow = FrequencyPlan((800,) * dag.num_nodes)
    run = simulate_data_parallel(dag, profile, TINY_P2P, pipelines=2, straggler_slowdown=1.5, plan=slow)
    assert run.others.iteration_time == pytest.approx(14.0)
    assert run.others.energy == pytest.approx(56.0 + 10.0 * (28.0 - 14.0))
    assert run.sync_time == pytest.approx(14.0)
    assert run.energy == pytest.approx((210.0 + 2 * 10.0 * 3.5) + 196.0)


@pytest.mark.parametrize("pipelines", [1, 2, 5])
def test_data_parallel_without_straggler_is_n_pipelines(tiny: tuple[InstructionDAG, Profile], pipelines: int) -> None:
    dag, profile = tiny
    run = simulate_data_parallel(dag, profile, TINY_P2P, pipelines=pipelines, straggler_slowdown=1.0)
    assert run.energy == pytest.approx(pipelines * 140.0)
    assert run.sync_time == pytest.approx(7.0)


@pytest.mark.parametrize("slowdown", [1.0, 1.2, 1.7])
def test_data_parallel_formula_on_a_random_pipeline(slowdown: float) -> None:
    rng = np.random.default_rng(11)
    raw = random_raw_profile(rng, 4, split_backward=False)
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", 4, 6))
    profile = profile_from_raw(raw)
    base = simulate(dag, profile, 60.0)
    run = simulate_data_parallel(dag, profile, 60.0, pipelines=4, straggler_slowdown=slowdown)
    # A uniformly slowed pipeline takes s*T and s times the energy (same power, longer time).
    assert run.straggler.iteration_time == pytest.approx(slowdown * base.iteration_time)
    assert run.straggler.energy == pytest.approx(slowdown * base.energy)
    sync = max(slowdown * base.iteration_time, base.iteration_time)
    expected = slowdown * base.energy + 3 * (base.energy + 4 * 60.0 * (sync - base.iteration_time))
    assert run.energy == pytest.approx(expected, rel=1e-9)


def test_data_parallel_input_errors(tiny: tuple[InstructionDAG, Profile]) -> None:
    dag, profile = tiny
    with pytest.raises(PlanError, match=r"pipelines is 0\. Fix: give at least 1"):
        simulate_data_parallel(dag, profile, TINY_P2P, pipelines=0, straggler_slowdown=1.2)
    with pytest.raises(PlanError, match=r"straggler slowdown is 0\.9\. Fix: give a factor >= 1"):
        simulate_data_parallel(dag, profile, TINY_P2P, pipelines=2, straggler_slowdown=0.9)


# --------------------------------------------------------------------------- plan validation
def test_unprofiled_frequency(tiny: tuple[InstructionDAG, Profile]) -> None:
    dag, profile = tiny
    frequencies = [1000] * dag.num_nodes
    node = dag.index(Instruction(1, BACKWARD, 0))
    frequencies[node] = 1234
    with pytest.raises(PlanError) as info:
        simulate(dag, profile, TINY_P2P, FrequencyPlan(tuple(frequencies)))
    message = str(info.value)
    for phrase in ("rank 1, entry 1 ('1B0')", "1234 MHz was not profiled for stage 1 backward", "profiled: 800-1000 MHz", "Fix: use a profiled clock"):
        assert phrase in message


def test_plan_with_the_wrong_number_of_frequencies(tiny: tuple[InstructionDAG, Profile]) -> None:
    dag, profile = tiny
    with pytest.raises(PlanError, match=r"the plan has 3 frequencies for 4 instructions\. Fix: plan every instruction"):
        check_frequencies(FrequencyPlan((1000, 1000, 1000)), dag, profile)


@pytest.mark.parametrize("p2p_power", [-1.0, float("nan")])
def test_negative_or_missing_blocking_power(tiny: tuple[InstructionDAG, Profile], p2p_power: float) -> None:
    dag, profile = tiny
    with pytest.raises(PlanError, match=r"blocking power is .* W\. Fix: give the GPU's power while waiting on P2P"):
        simulate(dag, profile, p2p_power)


@pytest.mark.parametrize("slowdown", [0.0, -2.0])
def test_non_positive_slowdown(tiny: tuple[InstructionDAG, Profile], slowdown: float) -> None:
    dag, profile = tiny
    with pytest.raises(PlanError, match="Fix: give a positive factor"):
        simulate(dag, profile, TINY_P2P, slowdown=slowdown)


def plan_error(dag: InstructionDAG, lists: object) -> str:
    with pytest.raises(PlanError) as info:
        FrequencyPlan.from_rank_lists(dag, lists, source="plan.json")
    return str(info.value)


def test_rank_lists_with_wrong_counts() -> None:
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", 2, 2))
    good = FrequencyPlan.max_clock(dag, Profile.from_rows(TINY_ROWS)).rank_lists(dag)
    message = plan_error(dag, good[:1])
    assert "plan.json: has 1 per-rank lists but the pipeline has 2 ranks" in message and "Fix: give one list per rank" in message
    message = plan_error(dag, [good[0], good[1][:-1]])
    assert "plan.json: rank 1 has 3 entries but runs 4 instructions in schedule '1f1b'" in message
    assert "Fix: plan every instruction of that rank, in execution order" in message
    assert "per-rank lists" in plan_error(dag, {"0": good[0]})


def test_rank_lists_naming_the_wrong_instruction() -> None:
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", 2, 2))
    # rank 0 runs 0F0 0F1 0B0 0B1: a plan that alternates F and B there is out of order
    message = plan_error(dag, [[["forward", 1000], ["backward", 1000], ["forward", 1000], ["backward", 1000]],
                               [["forward", 1000], ["backward", 1000], ["forward", 1000], ["backward", 1000]]])
    assert "plan.json: rank 0, entry 1: names ['backward'] but the schedule runs '0F1' there" in message
    assert "Fix: list instructions in the schedule's execution order" in message

    gpipe = InstructionDAG.from_schedule(build_schedule("gpipe", 2, 2))
    wrong_microbatch = [[["forward", 1, 1000], ["forward", 0, 1000], ["backward", 0, 1000], ["backward", 1, 1000]]] * 2
    assert "rank 0, entry 0: names ['forward', 1] but the schedule runs '0F0' there" in plan_error(gpipe, wrong_microbatch)

    interleaved = InstructionDAG.from_schedule(build_schedule("interleaved-1f1b", 2, 2, virtual_stages=2))
    lists = FrequencyPlan((1000,) * interleaved.num_nodes).rank_lists(interleaved)
    lists[1][0] = [lists[1][0][0], lists[1][0][1], 3, 1000]  # right kind and microbatch, wrong stage
    assert "rank 1, entry 0: names ['forward', 0, 3] but the schedule runs '1F0' there" in plan_error(interleaved, lists)


@pytest.mark.parametrize("entry", [["forward", "fast"], ["forward", 1410.5], ["forward", True], ["forward", 0], "forward", ["forward"]])
def test_malformed_plan_entries(entry: object) -> None:
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", 1, 1))
    message = plan_error(dag, [[entry, ["backward", 1000]]])
    assert "plan.json: rank 0, entry 0" in message and "Fix:" in message


# --------------------------------------------------------------------------- plan round trip
@pytest.mark.parametrize(
    ("name", "virtual", "entry_length"),
    [("1f1b", 1, 2), ("gpipe", 1, 3), ("zero-bubble", 1, 3), ("interleaved-1f1b", 2, 4), ("zero-bubble", 2, 4)],
)
def test_plan_rank_lists_save_load_round_trip(name: str, virtual: int, entry_length: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    schedule = build_schedule(name, 3, 6, virtual_stages=virtual)
    dag = InstructionDAG.from_schedule(schedule)
    plan = FrequencyPlan(tuple(int(f) for f in rng.choice([900, 1200, 1410], size=dag.num_nodes)))

    lists = plan.rank_lists(dag)
    assert len(lists) == 3
    for rank, (entries, order) in enumerate(zip(lists, schedule.rank_orders)):
        assert len(entries) == len(order)
        for entry, ins in zip(entries, order):
            expected = [ins.kind, ins.microbatch, ins.stage][: entry_length - 1] + [plan.frequencies[dag.index(ins)]]
            assert entry == expected
    assert FrequencyPlan.from_rank_lists(dag, lists) == plan

    path = tmp_path / "plan.json"
    plan.save(path, dag)
    assert json.loads(path.read_text()) == {"frequencies": lists}
    assert FrequencyPlan.load(path, dag) == plan


def test_zeus_style_1f1b_plan_maps_to_the_right_instructions() -> None:
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", 2, 2))
    lists = [  # as in Zeus's freqs_pipeline_*.py: per stage, (instruction, MHz) in execution order
        [("forward", 1410), ("forward", 1395), ("backward", 1380), ("backward", 1365)],  # 0F0 0F1 0B0 0B1
        [("forward", 1350), ("backward", 1335), ("forward", 1320), ("backward", 1305)],  # 1F0 1B0 1F1 1B1
    ]
    plan = FrequencyPlan.from_rank_lists(dag, lists)
    clock = {str(ins): f for ins, f in zip(dag.instructions, plan.frequencies)}
    assert clock == {"0F0": 1410, "0F1": 1395, "0B0": 1380, "0B1": 1365, "1F0": 1350, "1B0": 1335, "1F1": 1320, "1B1": 1305}


@pytest.mark.parametrize("value", ["Infinity", "NaN"])
def test_non_finite_frequency_in_a_plan_file_is_a_plan_error(value: str, tmp_path: Path) -> None:
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", 1, 1))
    path = tmp_path / "plan.json"
    path.write_text('{"frequencies": [[["forward", %s], ["backward", 1410]]]}' % value)
    with pytest.raises(PlanError, match="is not a clock in MHz"):
        FrequencyPlan.load(path, dag)


def test_load_plan_from_a_frontier_file(tmp_path: Path) -> None:
    dag = InstructionDAG.from_schedule(build_schedule("gpipe", 2, 2))
    first = FrequencyPlan((1000,) * dag.num_nodes)
    second = FrequencyPlan((800, 1000) * (dag.num_nodes // 2))
    path = tmp_path / "frontier.json"
    path.write_text(json.dumps({"plans": [
        {"iteration_time": 7.0, "energy": 140.0, "frequencies": first.rank_lists(dag)},
        {"iteration_time": 9.0, "energy": 120.0, "frequencies": second.rank_lists(dag)},
    ]}))
    assert FrequencyPlan.load(path, dag) == first
    assert FrequencyPlan.load(path, dag, index=1) == second
    with pytest.raises(PlanError, match=r"has 2 plans, no plan 2\. Fix: pick 0\.\.1"):
        FrequencyPlan.load(path, dag, index=2)


def test_plan_file_errors(tmp_path: Path) -> None:
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", 2, 2))
    with pytest.raises(PlanError, match="no such plan file"):
        FrequencyPlan.load(tmp_path / "missing.json", dag)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(PlanError, match=r"not valid JSON .*Fix: write the plan with FrequencyPlan.save\(\)"):
        FrequencyPlan.load(broken, dag)
    keyless = tmp_path / "keyless.json"
    keyless.write_text(json.dumps({"freqs": []}))
    with pytest.raises(PlanError, match='has no "frequencies" key'):
        FrequencyPlan.load(keyless, dag)


def test_loaded_plan_simulates_like_the_original(tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    raw = random_raw_profile(rng, 2, split_backward=False)
    profile = profile_from_raw(raw)
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", 2, 4))
    clock = sorted(set.intersection(*(set(points) for points in raw.values())))
    plan = FrequencyPlan(tuple(int(rng.choice(clock)) for _ in range(dag.num_nodes)))
    plan.save(tmp_path / "p.json", dag)
    loaded = FrequencyPlan.load(tmp_path / "p.json", dag)
    assert loaded == plan
    assert simulate(dag, profile, 30.0, loaded).energy == simulate(dag, profile, 30.0, plan).energy


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_level_by_level_schedules_match_the_per_node_recurrences(variant: tuple[str, int, bool]) -> None:
    from perseus_lightning.core.simulator import earliest_schedule, latest_starts

    name, virtual, split = variant
    dag = InstructionDAG.from_schedule(build_schedule(name, 4, 8, virtual, split))
    for levels, neighbours in ((dag.levels, dag.predecessors), (dag.reverse_levels, dag.successors)):
        level_of = {node: k for k, (nodes, _) in enumerate(levels) for node in nodes.tolist()}
        assert sorted(level_of) == list(range(dag.num_nodes))  # every node once
        for nodes, padded in levels:  # each node's neighbours, padded, all in earlier levels
            for node, row in zip(nodes.tolist(), padded.tolist()):
                assert [n for n in row if n != dag.num_nodes] == list(neighbours[node])
                assert all(level_of[n] < level_of[node] for n in neighbours[node])
    rng = np.random.default_rng(zlib.crc32(repr(variant).encode()))
    durations = rng.uniform(0.0, 1.0, dag.num_nodes) * (rng.random(dag.num_nodes) > 0.1)  # some take no time
    end = [0.0] * dag.num_nodes
    for node in dag.topological_order.tolist():
        end[node] = max((end[p] for p in dag.predecessors[node]), default=0.0) + durations[node]
    deadline = max(end) * 1.1
    latest = [0.0] * dag.num_nodes
    for node in dag.topological_order[::-1].tolist():
        latest[node] = min((latest[s] for s in dag.successors[node]), default=deadline) - durations[node]
    start, finish = earliest_schedule(dag, durations)
    assert finish.tolist() == end and (start + durations).tolist() == end
    assert latest_starts(dag, durations, deadline).tolist() == latest
