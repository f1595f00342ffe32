"""Run the third-party solver lowtime 0.3.0 (behind Perseus/Zeus) as a benchmark baseline.

Used only by the benchmarks, never by the package: import this module only when
``importlib.util.find_spec("lowtime")`` finds lowtime (``pip install lowtime==0.3.0``).

:func:`run_lowtime` drives lowtime the way Zeus's Perseus driver does
(``examples/pipeline_frequency_optimizer/run_optimization.py`` in ml-energy/zeus, the same steps as
``examples/perseus.py`` in ml-energy/lowtime), minus its plots and plan files:

1. per (stage, forward/backward): one option per profiled frequency, time quantised to 1 ms and
   energy turned into effective energy ``E - P_block * quant_time * unit``; the Pareto options are
   kept (refiltered with noise factor 0.95 if 3 or fewer remain), and an exponential cost model is
   fitted to them with ``curve_fit`` (grid search over initial guesses, ``"best"`` strategy);
2. the synchronous 1F1B DAG, with lowtime's own pairwise dependency scan;
3. Phillips-Dessouky from the slowest plan, one time unit faster per iteration; each iteration
   yields one plan, and the last one is the fastest.

The fastest plan is then mapped onto our 1F1B :class:`InstructionDAG` (the same DeepSpeed per-stage
order) and evaluated with our exact simulator, so it is compared with our planner on equal terms.

Run ``.venv/bin/python bench/lowtime_baseline.py`` for the GPT-3 175B / A100 profile, 8 x 12.
"""

from __future__ import annotations

import itertools
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
from scipy.optimize import OptimizeWarning
from lowtime.cost_model import ExponentialModel
from lowtime.graph_utils import DependencyResolver, add_sink_node, add_source_node
from lowtime.operation import CandidateExecutionOptions, ExecutionOption, OperationSpec
from lowtime.perseus.instruction import Backward, Forward, Instruction, backward_dep, forward_dep
from lowtime.perseus.schedule import Synchronous1F1B
from lowtime.solver import PhillipsDessouky

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.plan import FrequencyPlan
from perseus_lightning.core.profile import BACKWARD, FORWARD, Profile
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.simulator import simulate

UNIT_TIME = 0.001
"""lowtime's time quantum (s), as in the Perseus/Zeus driver."""
NOISE_FACTOR = 0.95
"""Soft Pareto filtering for instructions with 3 or fewer Pareto options, as in the driver."""
_KINDS: dict[type[Instruction], str] = {Forward: FORWARD, Backward: BACKWARD}

LowtimePlan = list[list[tuple[str, int, int]]]
"""Per stage, in execution order: (our instruction kind, microbatch, frequency in MHz)."""


@dataclass(frozen=True)
class LowtimeResult:
    """lowtime's frontier solve and its fastest plan, measured by our simulator."""

    wall_time: float
    """Seconds for the whole lowtime solve (cost models, DAG, frontier), by ``time.perf_counter``."""
    fastest_time: float
    """Iteration time (s) of lowtime's fastest plan, by our exact simulator."""
    fastest_energy: float
    """Energy (J) of that plan, by our exact simulator (idle time at the blocking power included)."""
    plans: tuple[FrequencyPlan, ...]
    """lowtime's frontier on our DAG: one plan per Phillips-Dessouky iteration, slowest first."""

    @property
    def num_plans(self) -> int:
        return len(self.plans)


def _operation_spec(profile: Profile, stage: int, kind: str, p2p_power: float) -> OperationSpec[int]:
    """lowtime's execution options and fitted exponential cost model for one (stage, kind)."""
    prof = profile.get(stage, kind)
    options = [
        ExecutionOption[int](real_time=float(t), unit_time=UNIT_TIME, cost=float(e), knob=int(f))
        for f, t, e in zip(prof.frequencies, prof.time, prof.energy)
    ]
    for option in options:  # effective energy, on lowtime's quantised time
        option.cost -= p2p_power * option.quant_time * option.unit_time
    candidates = CandidateExecutionOptions[int](options=options)
    if len(candidates.options) <= 3:
        candidates = CandidateExecutionOptions[int](options=options, noise_factor=NOISE_FACTOR)
    model = ExponentialModel(candidates, search_strategy="best")
    return OperationSpec[int](options=candidates, cost_model=model)


def solve_lowtime(profile: Profile, num_stages: int, num_microbatches: int, p2p_power: float) -> list[LowtimePlan]:
    """lowtime's frontier: the plan after each solver iteration, slowest first, the fastest last.

    Each is one time unit faster than the one before; the all-slowest start is not included.
    """
    with warnings.catch_warnings():  # the fit's grid search tries guesses that overflow or do not fit
        warnings.simplefilter("ignore", OptimizeWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        specs = {
            stage: {cls: _operation_spec(profile, stage, kind, p2p_power) for cls, kind in _KINDS.items()}
            for stage in range(num_stages)
        }
    dag = nx.DiGraph()
    stage_insts: list[list[Instruction]] = []
    node_id = 2  # 0 and 1 are the dummy source and sink
    for stage in range(num_stages):
        insts = list(Synchronous1F1B(num_stages, num_microbatches, stage, specs[stage]))
        ids = range(node_id, node_id + len(insts))
        dag.add_nodes_from((i, {"op": inst}) for i, inst in zip(ids, insts))
        dag.add_edges_from(zip(ids, ids[1:]))  # execution order within the stage
        stage_insts.append(insts)
        node_id += len(insts)
    # Data dependencies: lowtime's pairwise scan, as the driver does it.
    resolver = DependencyResolver(dependency_rules=[forward_dep, backward_dep], node_type=Instruction)
    nodes = list(dag.nodes(data="op"))
    for (id1, op1), (id2, op2) in itertools.product(nodes, nodes):
        if resolver.is_dependent(op1, op2):
            dag.add_edge(id1, id2)
    add_source_node(dag, 0)
    add_sink_node(dag, 1)
    dag.graph["source_node"] = 0
    dag.graph["sink_node"] = 1

    def snapshot() -> LowtimePlan:  # the solver mutates the operations in place
        return [[(_KINDS[type(i)], i.micro_batch_id, int(i.assigned_knob)) for i in insts] for insts in stage_insts]

    return [snapshot() for _ in PhillipsDessouky(dag).run()]


def to_frequency_plan(plan: LowtimePlan, dag: InstructionDAG) -> FrequencyPlan:
    """Map a lowtime plan onto our 1F1B DAG by stage and execution order, checking every instruction."""
    if len(plan) != dag.num_ranks:
        raise ValueError(f"lowtime planned {len(plan)} stages, our DAG has {dag.num_ranks} ranks")
    freqs = [0] * dag.num_nodes
    for rank, entries in enumerate(plan):
        nodes = dag.rank_nodes(rank)
        if len(entries) != len(nodes):
            raise ValueError(f"stage {rank}: lowtime has {len(entries)} instructions, our 1F1B has {len(nodes)}")
        for node, (kind, microbatch, freq) in zip(nodes, entries):
            ours = dag.instructions[node]
            if (ours.kind, ours.microbatch) != (kind, microbatch):
                raise ValueError(f"stage {rank}: lowtime runs {kind} {microbatch} where our 1F1B runs {ours}")
            freqs[node] = freq
    return FrequencyPlan(tuple(freqs))


def run_lowtime(profile: Profile, num_stages: int, num_microbatches: int, p2p_power: float) -> LowtimeResult:
    """Solve with lowtime as Perseus does; evaluate its fastest plan with our simulator."""
    start = time.perf_counter()
    plans = solve_lowtime(profile, num_stages, num_microbatches, p2p_power)
    wall_time = time.perf_counter() - start
    if not plans:
        raise RuntimeError("lowtime's solver yielded no plan (its slowest plan is already its fastest)")
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", num_stages, num_microbatches))
    mapped = tuple(to_frequency_plan(plan, dag) for plan in plans)
    fastest = simulate(dag, profile, p2p_power, mapped[-1])
    return LowtimeResult(wall_time, fastest.iteration_time, fastest.energy, mapped)


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[2] / "shared" / "data" / "stage_profiles" / "gpt3-175b+a100_sxm_bf16.csv"
    stages, microbatches, power = 8, 12, 83.64
    result = run_lowtime(Profile.load(path), stages, microbatches, power)
    base = simulate(InstructionDAG.from_schedule(build_schedule("1f1b", stages, microbatches)), Profile.load(path), power)
    print(f"lowtime: {result.wall_time:.1f} s, {result.num_plans} plans")
    print(f"max clock: {base.iteration_time:.5f} s, {base.energy:.1f} J; lowtime's fastest plan: "
          f"{100 * (result.fastest_time / base.iteration_time - 1):+.3f} % time, "
          f"{100 * (1 - result.fastest_energy / base.energy):.2f} % saving")
