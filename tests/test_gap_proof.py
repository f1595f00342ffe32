"""The split proof: its verdicts match brute force on tiny instances, however the cubes are split."""

from __future__ import annotations

import pytest

from perseus_lightning.core.errors import PlanError
from perseus_lightning.core.gap_proof import Cube, prove_gap, restricted_options, split_cube
from perseus_lightning.core.options import frequency_plan
from perseus_lightning.core.simulator import simulate
from test_exact import tiny_instance
from test_planner import P2P_POWER, TINY, tiny_brute_force


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("cube_nodes", [2**31 - 1, 0], ids=["whole", "split"])  # 0: every cube not decided at once is split
def test_the_verdict_matches_brute_force(name: str, cube_nodes: int) -> None:
    dag, stage_profile, options, t_min = tiny_instance(name)
    splits = 0
    for deadline in (t_min, 1.02 * t_min, 1.1 * t_min):
        optimum = tiny_brute_force(name).optimum(deadline)
        below = prove_gap(dag, options, P2P_POWER, deadline, optimum * (1 - 1e-4), cube_nodes=cube_nodes)
        assert below.verdict == "proven"
        assert all(cube.status != "found" for cube in below.cubes)
        splits += sum(cube.status == "open" for cube in below.cubes)
        above = prove_gap(dag, options, P2P_POWER, deadline, optimum * (1 + 1e-4), cube_nodes=cube_nodes)
        assert above.verdict == "found"
        found = above.cubes[-1]
        result = simulate(dag, stage_profile, P2P_POWER, frequency_plan(options, found.choice))
        assert result.iteration_time <= deadline * (1 + 1e-9)
        assert result.energy == pytest.approx(found.energy, rel=1e-9)
        assert optimum * (1 - 1e-9) <= result.energy <= optimum * (1 + 1e-4)
    if cube_nodes == 0 and name.startswith("noisy"):
        assert splits > 0, "cubes without a node of search should be left open, and split"


def test_worker_processes_reach_the_same_verdict() -> None:
    dag, _, options, t_min = tiny_instance("noisy-2x2")
    deadline = 1.1 * t_min
    optimum = tiny_brute_force("noisy-2x2").optimum(deadline)
    inline = prove_gap(dag, options, P2P_POWER, deadline, optimum * (1 - 1e-4), cube_nodes=0)
    pooled = prove_gap(dag, options, P2P_POWER, deadline, optimum * (1 - 1e-4), workers=2, cube_nodes=0)
    assert pooled.verdict == inline.verdict == "proven" and len(inline.cubes) > 2
    assert sorted((cube.cube, cube.status) for cube in pooled.cubes) == sorted((cube.cube, cube.status) for cube in inline.cubes)


def test_a_split_keeps_every_plan_of_the_cube_in_one_half() -> None:
    dag, _, options, t_min = tiny_instance("noisy-3x2")
    deadline = 1.05 * t_min
    fast, slow = split_cube(dag, options, P2P_POWER, deadline, ())
    (node, first_fast, last_fast), (same, first_slow, last_slow) = fast[-1], slow[-1]
    assert node == same and first_fast == 0 and first_slow == last_fast + 1
    restricted, _ = restricted_options(options, slow)
    assert len(restricted[node].time) == last_slow - first_slow + 1
    nested: Cube = (*slow, (node, 0, first_slow))  # a later restriction narrows: one option left
    narrowed, firsts = restricted_options(options, nested)
    assert len(narrowed[node].time) == 1 and firsts[node] == first_slow


def test_a_cube_that_leaves_a_node_no_clock_is_refused_with_a_fix() -> None:
    dag, _, options, _ = tiny_instance("noisy-3x2")
    with pytest.raises(PlanError, match="no clock option. Fix"):
        restricted_options(options, ((0, 0, 0), (0, 1, 1)))


def test_out_of_time_is_undecided() -> None:
    dag, _, options, t_min = tiny_instance("noisy-3x2")
    proof = prove_gap(dag, options, P2P_POWER, t_min, 0.0, seconds=0.0)
    assert proof.verdict == "undecided" and proof.cubes == () and proof.open_cubes == ((),)


def test_a_proof_resumed_from_both_halves_of_a_split_reaches_the_same_verdict() -> None:
    dag, _, options, t_min = tiny_instance("noisy-2x2")
    deadline = 1.1 * t_min
    optimum = tiny_brute_force("noisy-2x2").optimum(deadline)
    halves = list(split_cube(dag, options, P2P_POWER, deadline, ()))
    for cutoff, verdict in ((optimum * (1 - 1e-4), "proven"), (optimum * (1 + 1e-4), "found")):
        assert prove_gap(dag, options, P2P_POWER, deadline, cutoff, cubes=halves).verdict == verdict
