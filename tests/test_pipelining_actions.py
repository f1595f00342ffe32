"""Observed ``torch.distributed.pipelining`` execution against the built-in schedules.

The ``distributed`` tests launch one real 2-process gloo job for all their cases
(``tests/distributed/pipelining_worker.py``) and compare the DAG of the actions each rank actually
ran with the DAG of the built-in schedule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.profile import BACKWARD, BACKWARD_INPUT, BACKWARD_WEIGHT, FORWARD
from perseus_lightning.core.schedules import Instruction, PipelineSchedule, build_schedule, from_actions
from perseus_lightning.integrations.pipelining import StageInstrumentation
from torchrun import torchrun

REPO_ROOT = Path(__file__).resolve().parents[1]
WORKER = REPO_ROOT / "tests" / "distributed" / "pipelining_worker.py"
LAUNCH_TIMEOUT_S = 120


class FakeStage:
    """The three ``*_one_chunk`` methods of ``PipelineStage``, with torch 2.13's signatures."""

    def __init__(self, stage_index: int) -> None:
        self.stage_index = stage_index
        self.calls: list[str] = []

    def forward_one_chunk(
        self, fwd_chunk_id: int, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None, save_forward_output: bool = True
    ) -> str:
        self.calls.append(f"forward {fwd_chunk_id}")
        return f"output {fwd_chunk_id}"

    def backward_one_chunk(
        self, bwd_chunk_id: int, loss: Any = None, full_backward: bool = True, last_backward: bool = False
    ) -> None:
        self.calls.append(f"backward {bwd_chunk_id}")

    def backward_weight_one_chunk(self, bwd_chunk_id: int, last_backward: bool = False) -> None:
        if bwd_chunk_id < 0:
            raise RuntimeError("no input backward ran for this chunk")
        self.calls.append(f"weight {bwd_chunk_id}")


def test_instrumentation_records_kind_and_microbatch_of_each_call() -> None:
    stage = FakeStage(stage_index=3)
    instrumentation = StageInstrumentation(stage)
    assert stage.forward_one_chunk(0, (), {}, save_forward_output=False) == "output 0"
    stage.forward_one_chunk(fwd_chunk_id=1, args=())
    stage.backward_one_chunk(0, loss=None, last_backward=False)
    stage.backward_one_chunk(1, None, False)
    stage.backward_one_chunk(bwd_chunk_id=2, full_backward=False)
    stage.backward_weight_one_chunk(2, last_backward=True)
    assert instrumentation.executed == [
        Instruction(3, FORWARD, 0),
        Instruction(3, FORWARD, 1),
        Instruction(3, BACKWARD, 0),
        Instruction(3, BACKWARD_INPUT, 1),
        Instruction(3, BACKWARD_INPUT, 2),
        Instruction(3, BACKWARD_WEIGHT, 2),
    ]
    assert [ins.action for ins in instrumentation.executed] == ["3F0", "3F1", "3B0", "3I1", "3I2", "3W2"]
    assert stage.calls == ["forward 0", "forward 1", "backward 0", "backward 1", "backward 2", "weight 2"]


def test_callbacks_bracket_each_call() -> None:
    stage = FakeStage(stage_index=0)
    events = stage.calls
    with StageInstrumentation(
        stage, on_begin=lambda ins: events.append(f"begin {ins}"), on_end=lambda ins: events.append(f"end {ins}")
    ):
        stage.forward_one_chunk(0, ())
        stage.backward_one_chunk(0)
    assert events == ["begin 0F0", "forward 0", "end 0F0", "begin 0B0", "backward 0", "end 0B0"]


def test_failed_call_is_not_recorded_and_skips_on_end() -> None:
    stage = FakeStage(stage_index=0)
    ended: list[Instruction] = []
    with StageInstrumentation(stage, on_end=ended.append) as instrumentation:
        with pytest.raises(RuntimeError, match="no input backward"):
            stage.backward_weight_one_chunk(-1)
    assert instrumentation.executed == [] and ended == []


def test_remove_restores_the_stage() -> None:
    stage = FakeStage(stage_index=1)
    with StageInstrumentation(stage) as instrumentation:
        stage.forward_one_chunk(0, ())
        assert "forward_one_chunk" in vars(stage)
    instrumentation.remove()  # a second remove is harmless
    for name in ("forward_one_chunk", "backward_one_chunk", "backward_weight_one_chunk"):
        assert name not in vars(stage)
    stage.forward_one_chunk(1, ())
    assert instrumentation.executed == [Instruction(1, FORWARD, 0)]
    assert stage.calls == ["forward 0", "forward 1"]


def test_nested_instrumentation_restores_the_outer_one() -> None:
    stage = FakeStage(stage_index=0)
    with StageInstrumentation(stage) as outer:
        with StageInstrumentation(stage) as inner:
            stage.forward_one_chunk(0, ())
        stage.forward_one_chunk(1, ())
    stage.forward_one_chunk(2, ())
    assert [ins.microbatch for ins in inner.executed] == [0]
    assert [ins.microbatch for ins in outer.executed] == [0, 1]
    assert "forward_one_chunk" not in vars(stage)


CASES = [("1f1b", 4, 1), ("1f1b", 3, 1), ("gpipe", 4, 1), ("interleaved-1f1b", 4, 2), ("zero-bubble", 4, 1), ("zero-bubble", 4, 2)]
"""(schedule, microbatches, virtual stages): all run one after the other in one 2-process job."""


def _spec(schedule: str, microbatches: int, virtual_stages: int) -> str:
    return f"{schedule}:{microbatches}:{virtual_stages}"


@pytest.fixture(scope="module")
def observed_steps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[list[list[str]]]]:
    """Per case, per step, per rank: the observed actions; a job that dies at exit still counts if it wrote its result."""
    torch = pytest.importorskip("torch")
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    output = tmp_path_factory.mktemp("pipelining") / "actions.json"
    result = torchrun(2, WORKER, [str(output), *(_spec(*case) for case in CASES)], timeout=LAUNCH_TIMEOUT_S, done=output.exists)
    if not output.exists():
        pytest.fail(f"worker wrote no result (exit code {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(output.read_text())


def _edges(dag: InstructionDAG) -> set[tuple[Instruction, Instruction]]:
    return {
        (dag.instructions[s], dag.instructions[t])
        for s, t in zip(dag.edge_sources.tolist(), dag.edge_targets.tolist())
    }


def _assert_same_dag(observed: PipelineSchedule, expected: PipelineSchedule) -> None:
    assert observed.actions() == expected.actions()
    assert observed.rank_orders == expected.rank_orders
    assert observed.stage_ranks == expected.stage_ranks
    observed_dag, expected_dag = InstructionDAG.from_schedule(observed), InstructionDAG.from_schedule(expected)
    assert observed_dag.instructions == expected_dag.instructions
    assert _edges(observed_dag) == _edges(expected_dag)


@pytest.mark.distributed
@pytest.mark.parametrize(("schedule", "microbatches", "virtual_stages"), CASES)
def test_executed_actions_match_builtin_schedule(
    schedule: str, microbatches: int, virtual_stages: int, observed_steps: dict[str, list[list[list[str]]]]
) -> None:
    steps = observed_steps[_spec(schedule, microbatches, virtual_stages)]
    expected = build_schedule(schedule, 2, microbatches, virtual_stages=virtual_stages)
    assert len(steps) == 2
    for ranks in steps:
        _assert_same_dag(from_actions(ranks, name=schedule), expected)
