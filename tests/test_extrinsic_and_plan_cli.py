"""Straggler (extrinsic) accounting, and the ``perseus plan`` / ``perseus simulate --frontier`` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from perseus_lightning.cli import plan as plan_cli
from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.extrinsic import evaluate_straggler
from perseus_lightning.core.gpu_model import A100_LIKE
from perseus_lightning.core.planner import Frontier, plan_frontier
from perseus_lightning.core.profile import Profile
from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.core.simulator import simulate
from cli_runner import run_cli

P2P_POWER = 83.64
NUM_RANKS = 3


# --------------------------------------------------------------------------- evaluate_straggler
@pytest.fixture(scope="module")
def profile() -> Profile:
    return A100_LIKE.profile([(0.05, 0.1), (0.03, 0.07), (0.06, 0.11)])


@pytest.fixture(scope="module")
def frontier(profile: Profile) -> Frontier:
    dag = InstructionDAG.from_schedule(build_schedule("1f1b", NUM_RANKS, 6))
    return plan_frontier(profile, dag, P2P_POWER)


@pytest.mark.parametrize(("pipelines", "slowdown"), [(4, 1.1), (3, 1.02), (8, 2.0)])
def test_straggler_accounting_matches_a_hand_computation(
    frontier: Frontier, profile: Profile, pipelines: int, slowdown: float
) -> None:
    evaluation = evaluate_straggler(frontier, profile, pipelines, slowdown)
    assert evaluation.others_plan != frontier.fastest  # the others do slow down
    idle_power = P2P_POWER * NUM_RANKS  # a whole pipeline waiting

    # Baseline: everyone at max clock; the straggler's every instruction takes `slowdown` x the time and energy.
    base = simulate(frontier.dag, profile, P2P_POWER)
    busy, compute = float(base.instruction_time.sum()), base.compute_energy
    sync = slowdown * base.iteration_time
    straggler = slowdown * compute + P2P_POWER * (NUM_RANKS * sync - slowdown * busy)
    other = base.energy + idle_power * (sync - base.iteration_time)
    assert evaluation.baseline.energy == pytest.approx(straggler + (pipelines - 1) * other, rel=1e-12)

    # Perseus: the straggler on the fastest plan, the others on the cheapest plan finishing by min(T', T*).
    fastest = frontier.fastest
    straggler_time = slowdown * fastest.iteration_time
    target = min(straggler_time, frontier.t_star)
    others = min((p for p in frontier.plans if p.iteration_time <= target * (1 + 1e-9)), key=lambda p: p.energy)
    assert evaluation.others_plan == others
    assert others.iteration_time <= straggler_time * (1 + 1e-9)
    expected = slowdown * fastest.energy + (pipelines - 1) * (others.energy + idle_power * (straggler_time - others.iteration_time))
    assert evaluation.perseus.energy == pytest.approx(expected, rel=1e-12)
    assert evaluation.perseus.sync_time == pytest.approx(straggler_time, rel=1e-12)
    assert evaluation.saving == pytest.approx(1 - expected / evaluation.baseline.energy, rel=1e-12)

    report = evaluation.to_dict()
    assert report["pipelines"] == pipelines and report["straggler_slowdown"] == slowdown
    assert report["baseline_energy"] == evaluation.baseline.energy
    assert report["perseus_energy"] == evaluation.perseus.energy
    assert report["others_plan_time"] == others.iteration_time


def test_big_straggler_paces_the_others_at_t_star(frontier: Frontier, profile: Profile) -> None:
    evaluation = evaluate_straggler(frontier, profile, 4, 2.0)
    assert evaluation.others_plan == frontier.plans[-1]


def test_without_a_straggler_the_saving_is_the_intrinsic_one(frontier: Frontier, profile: Profile) -> None:
    evaluation = evaluate_straggler(frontier, profile, 6, 1.0)
    assert evaluation.others_plan == frontier.fastest
    assert evaluation.saving == pytest.approx(1 - frontier.fastest.energy / frontier.baseline_energy, rel=1e-12)


def test_saving_grows_with_the_straggler_slowdown(frontier: Frontier, profile: Profile) -> None:
    savings = [evaluate_straggler(frontier, profile, 16, s).saving for s in (1.0, 1.05, 1.1, 1.2)]
    assert all(a < b for a, b in zip(savings, savings[1:])), savings


# --------------------------------------------------------------------------- CLI


def plan_args(profile_csv: Path, microbatches: int, output: Path, *extra: str) -> list[str]:
    return ["plan", str(profile_csv), "--microbatches", str(microbatches), "--p2p-power", str(P2P_POWER),
            "--output", str(output), *extra]


def test_plan_writes_a_frontier_a_plot_and_zeus_files(
    capsys: pytest.CaptureFixture[str], example_csv: Path, tmp_path: Path
) -> None:
    output, plot, zeus = tmp_path / "f.json", tmp_path / "f.png", tmp_path / "zeus"
    code, out, err = run_cli(capsys, *plan_args(example_csv, 8, output, "--plot", str(plot), "--zeus-dir", str(zeus)))
    assert code == 0, err
    frontier = Frontier.load(output)
    assert frontier.dag.schedule.name == "1f1b"
    assert (frontier.dag.num_ranks, frontier.dag.schedule.num_microbatches) == (4, 8)
    assert len(frontier.plans) >= 2
    assert frontier.fastest.energy < frontier.baseline_energy
    assert "zero slowdown" in out and "T*" in out
    assert f"{100 * (1 - frontier.fastest.energy / frontier.baseline_energy):.2f} %" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in zeus.iterdir()) == [f"freqs_pipeline_{i:05d}.py" for i in range(len(frontier.plans))]


def test_plan_points_limits_the_plans(capsys: pytest.CaptureFixture[str], example_csv: Path, tmp_path: Path) -> None:
    output = tmp_path / "f.json"
    code, _, err = run_cli(capsys, *plan_args(example_csv, 8, output, "--points", "5"))
    assert code == 0, err
    assert 2 <= len(Frontier.load(output).plans) <= 5


def test_plan_exact_seconds_bounds_the_milp(capsys: pytest.CaptureFixture[str], example_csv: Path, tmp_path: Path) -> None:
    heuristic, exact = tmp_path / "heuristic.json", tmp_path / "exact.json"
    assert run_cli(capsys, *plan_args(example_csv, 8, heuristic, "--exact-seconds", "0"))[0] == 0
    assert run_cli(capsys, *plan_args(example_csv, 8, exact, "--exact-seconds", "2"))[0] == 0
    assert Frontier.load(exact).fastest.energy <= Frontier.load(heuristic).fastest.energy * (1 + 1e-12)
    code, _, err = run_cli(capsys, *plan_args(example_csv, 8, tmp_path / "f.json", "--exact-seconds", "-1"))
    assert code == 2
    assert err.count("\n") == 1 and "exact_seconds is -1.0" in err and "Fix:" in err


def test_plan_workers_must_be_positive(capsys: pytest.CaptureFixture[str], example_csv: Path, tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, *plan_args(example_csv, 8, tmp_path / "f.json", "--workers", "0"))
    assert code == 2
    assert err.count("\n") == 1 and "workers is 0" in err and "Fix:" in err


def test_ctrl_c_ends_a_command_with_one_line_and_exit_code_130(
    capsys: pytest.CaptureFixture[str], example_csv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # what Python raises in the main thread on Ctrl-C

    monkeypatch.setattr(plan_cli, "plan_frontier", interrupted)
    code, out, err = run_cli(capsys, *plan_args(example_csv, 8, tmp_path / "f.json"))
    assert (code, out, err) == (130, "", "perseus plan: interrupted\n")
    assert not (tmp_path / "f.json").exists()


def test_plan_refuses_zeus_files_for_other_schedules(
    capsys: pytest.CaptureFixture[str], example_csv: Path, tmp_path: Path
) -> None:
    argv = plan_args(example_csv, 8, tmp_path / "f.json", "--schedule", "gpipe", "--points", "2", "--zeus-dir", str(tmp_path / "z"))
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and "1F1B only" in err and "Fix:" in err


def test_simulate_with_a_frontier_reports_straggler_savings(
    capsys: pytest.CaptureFixture[str], example_csv: Path, tmp_path: Path
) -> None:
    output = tmp_path / "f.json"
    assert run_cli(capsys, *plan_args(example_csv, 8, output))[0] == 0
    code, out, err = run_cli(
        capsys, "simulate", str(example_csv), "--microbatches", "8", "--p2p-power", str(P2P_POWER),
        "--frontier", str(output), "--pipelines", "4", "--straggler-slowdown", "1.2", "--json",
    )
    assert code == 0, err
    straggler = json.loads(out)["straggler"]
    assert (straggler["pipelines"], straggler["straggler_slowdown"]) == (4, 1.2)
    assert straggler["saving"] > 0
    assert straggler["perseus_energy"] < straggler["baseline_energy"]
    expected = evaluate_straggler(Frontier.load(output), Profile.load(example_csv), 4, 1.2)
    assert straggler["baseline_energy"] == pytest.approx(expected.baseline.energy, rel=1e-12)
    assert straggler["perseus_energy"] == pytest.approx(expected.perseus.energy, rel=1e-12)


def test_simulate_rejects_a_frontier_of_another_pipeline(
    capsys: pytest.CaptureFixture[str], example_csv: Path, tmp_path: Path
) -> None:
    output = tmp_path / "f4.json"
    assert run_cli(capsys, *plan_args(example_csv, 4, output, "--points", "2"))[0] == 0
    code, out, err = run_cli(
        capsys, "simulate", str(example_csv), "--microbatches", "8", "--p2p-power", str(P2P_POWER), "--frontier", str(output),
    )
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert "4 microbatches" in err and "Fix:" in err


def test_plan_help_explains_the_frontier(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "plan", "--help")
    assert code == 0
    assert "T*" in out and "frontier.json" in out and "--zeus-dir" in out
