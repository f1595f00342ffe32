"""The ``perseus`` command line: help, JSON output, exit codes, and the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_runner import run_cli


@pytest.mark.parametrize(
    ("command", "phrases"),
    [
        ((), ["demo", "plan", "simulate", "show", "stage,instruction,frequency,time,energy", "examples:"]),
        (("simulate",), ["--p2p-power", "longest path", "blocking power", "--plan", "--timeline", "--straggler-slowdown"]),
        (("show",), ["Pareto", "--plot", "--stage"]),
        (("demo",), ["--output-dir", "straggler", "frontier"]),
        (("plan",), ["T*", "frontier.json", "--zeus-dir", "--points"]),
    ],
)
def test_help_is_useful(capsys: pytest.CaptureFixture[str], command: tuple[str, ...], phrases: list[str]) -> None:
    code, out, _ = run_cli(capsys, *command, "--help")
    assert code == 0
    for phrase in phrases:
        assert phrase in out


def test_simulate_json_reference(capsys: pytest.CaptureFixture[str], shared_profile_path: Path) -> None:
    code, out, _ = run_cli(
        capsys, "simulate", str(shared_profile_path), "--stages", "8", "--microbatches", "12", "--p2p-power", "83.64", "--json"
    )
    assert code == 0
    result = json.loads(out)
    assert result["iteration_time"] == pytest.approx(2.83651, rel=1e-4)
    assert result["energy"] == pytest.approx(7339.00, rel=1e-4)
    assert len(result["stages"]) == 8
    assert {"busy", "idle"} <= result["stages"][0].keys()
    assert result["stages"][0]["busy"] + result["stages"][0]["idle"] == pytest.approx(result["iteration_time"])
    assert len(result["timeline"]) == 8 * 12 * 2


def test_simulate_plan_and_data_parallel(capsys: pytest.CaptureFixture[str], example_csv: Path, tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    base_args = ("simulate", str(example_csv), "--microbatches", "4", "--p2p-power", "83.64", "--json")
    code, out, _ = run_cli(capsys, *base_args)
    baseline = json.loads(out)
    # A uniform plan at 1200 MHz, written in the schedule's own order.
    lists = []
    for stage in range(4):
        warmup = min(3 - stage, 4)
        kinds = ["forward"] * warmup + ["forward", "backward"] * (4 - warmup) + ["backward"] * warmup
        lists.append([[kind, 1200] for kind in kinds])
    plan.write_text(json.dumps({"frequencies": lists}))
    code, out, _ = run_cli(capsys, *base_args, "--plan", str(plan), "--pipelines", "3", "--straggler-slowdown", "1.5")
    assert code == 0
    slowed = json.loads(out)
    assert slowed["iteration_time"] > baseline["iteration_time"]
    assert {entry["frequency"] for entry in slowed["timeline"]} == {1200}
    dp = slowed["data_parallel"]
    assert dp["pipelines"] == 3
    assert dp["sync_time"] == pytest.approx(1.5 * baseline["iteration_time"])


@pytest.mark.parametrize(
    ("args", "phrase"),
    [
        (("--stages", "3"), "has 4 stages but the pipeline needs 3"),
        (("--schedule", "zigzag"), "invalid choice: 'zigzag'"),
        (("--schedule", "gpipe", "--virtual-stages", "2"), "has one stage per rank"),
        (("--schedule", "interleaved-1f1b", "--virtual-stages", "2", "--microbatches", "9"), "multiple of 2"),
        (("--microbatches", "0"), "must all be at least 1"),
        (("--p2p-power", "-3"), "blocking power is -3.0 W"),
        (("--plan", "absent.json"), "no such plan file"),
    ],
)
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], example_csv: Path, args: tuple[str, ...], phrase: str
) -> None:
    argv = ["simulate", str(example_csv), "--microbatches", "4", "--p2p-power", "83.64", *args]
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert phrase in err


def test_bad_profile_exits_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("stage,instruction,frequency,time,energy\n0,forward,1410,nan,3\n")
    code, _, err = run_cli(capsys, "show", str(bad))
    assert code == 2
    assert f"{bad}, row 1 (line 2): time is nan" in err


def test_show_lists_every_clock(capsys: pytest.CaptureFixture[str], example_csv: Path, tmp_path: Path) -> None:
    plot = tmp_path / "profile.png"
    code, out, _ = run_cli(capsys, "show", str(example_csv), "--stage", "3", "--plot", str(plot), "--p2p-power", "83.64")
    assert code == 0
    assert "stage 3" in out and "1410" in out and "855" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_writes_a_plan_that_saves_energy_at_the_same_time(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_dir = tmp_path / "demo"
    code, out, _ = run_cli(capsys, "demo", "--output-dir", str(out_dir))
    assert code == 0
    assert "max clock" in out and "Perseus plan" in out and "others paced" in out
    for name in ("profile.csv", "frontier.json", "frontier.png", "timeline_baseline.png", "timeline_plan.png"):
        assert (out_dir / name).stat().st_size > 0
    # The written plan, simulated through the CLI, keeps the iteration time and saves energy.
    common = ("simulate", str(out_dir / "profile.csv"), "--microbatches", "8", "--p2p-power", "83.64", "--json")
    _, base_out, _ = run_cli(capsys, *common)
    _, plan_out, _ = run_cli(capsys, *common, "--plan", str(out_dir / "frontier.json"))
    baseline, planned = json.loads(base_out), json.loads(plan_out)
    assert planned["iteration_time"] <= baseline["iteration_time"] * (1 + 1e-9)
    assert planned["energy"] < 0.95 * baseline["energy"]


def test_console_script_starts_without_torch(example_csv: Path) -> None:
    code = (
        "import sys; from perseus_lightning.cli.main import main; "
        f"rc = main(['simulate', {str(example_csv)!r}, '--microbatches', '2', '--p2p-power', '80', '--json']); "
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, 'core imported torch'; sys.exit(rc)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["energy"] > 0
