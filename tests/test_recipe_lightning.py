"""The Lightning GPT recipe (``recipes/gpt_lightning.py``) and its pipeline helpers (``recipes/gpt_pipeline.py``).

The ``distributed`` tests launch the recipe with torchrun on gloo processes: training alone
(``--no-perseus``, 2 processes), and with ``PerseusCallback`` on emulated GPUs through to its
monitor phase (4 processes, 2 pipelines of 2 stages; and 2 processes with multi-stage schedules).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("lightning")

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = REPO_ROOT / "recipes"
if str(RECIPES) not in sys.path:  # the recipes import each other as top-level scripts
    sys.path.insert(0, str(RECIPES))

import gpt_cli
from gpt_pipeline import GPTConfig, SyntheticTokens, build_stages
from torchrun import torchrun

LAUNCH_TIMEOUT_S = 120
TINY = GPTConfig(vocab_size=64, seq_len=16, n_layer=4, n_embd=32, n_head=4)


def test_stages_compose_to_the_whole_causal_model() -> None:
    whole = build_stages(TINY, [4], [0])[0]
    stages = build_stages(TINY, [1, 2, 1], [0, 1, 2])
    tokens = torch.randint(TINY.vocab_size, (2, TINY.seq_len))
    with torch.no_grad():
        logits = whole(tokens)
        piped = stages[2](stages[1](stages[0](tokens)))
        changed = tokens.clone()
        changed[:, 8:] = 0
        prefix = whole(changed)[:, :8]
    assert logits.shape == (2, TINY.seq_len, TINY.vocab_size)
    torch.testing.assert_close(piped, logits)
    torch.testing.assert_close(prefix, logits[:, :8])  # later tokens do not leak into earlier logits
    assert stages[0].wte is not None and stages[0].lm_head is None
    assert stages[2].wte is None and stages[2].lm_head is not None


def test_synthetic_batches_depend_only_on_seed_and_index() -> None:
    data = SyntheticTokens(4, batch_size=2, seq_len=8, vocab_size=TINY.vocab_size, seed=0)
    inputs, targets = data[1]
    assert inputs.shape == targets.shape == (2, 8)
    torch.testing.assert_close(inputs[:, 1:], targets[:, :-1])
    torch.testing.assert_close(data[1][0], inputs)
    assert not torch.equal(data[2][0], inputs)
    assert not torch.equal(SyntheticTokens(4, 2, 8, TINY.vocab_size, seed=1)[1][0], inputs)


def test_report_shows_a_perseus_summary(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(gpt_cli.BACKEND_ENV, raising=False)
    summary = {
        "mode": "apply",
        "phase": "deployed",
        "baseline": {"iteration_time_s": 0.200, "energy_j": 150.0},
        "deployed": {"iteration_time_s": 0.204, "energy_j": 120.0},
        "saving_pct": 20.0,
        "profiling_iterations": 35,
        "planned_saving_pct": 21.5,
        "plan": {"iteration_time_s": 0.203, "energy_j": 118.0,
                 "frequencies": [[["forward", 0, 1410], ["forward", 1, 1200], ["backward", 0, 900]], [["forward", 0, 1410]]]},
        "straggler_episodes": [{"start_iteration": 60, "end_iteration": 80, "pipeline": 1, "slowdown": 1.2,
                                "peak_slowdown": 1.5, "iteration_time_s": 0.3, "energy_j": 200.0, "predicted_saving_pct": 14.0}],
        "recipe": {"loss": [9.0, 8.0], "median_iteration_time_s": 0.21, "args": {"dp": 2}},
    }
    gpt_cli.print_report(summary)
    out = capsys.readouterr().out
    for expected in ("204.0 ms", "120.0 J", "+2.0 %", "-20.0 %", "-21.5 %", "35", "900 / 1170 / 1410 MHz", "9.0000 -> 8.0000",
                     "60-80", "up to 1.50x", "300.0 ms / 200.0 J", "14.0 %",
                     "236.0 J"):  # the plan's energy on both pipelines' GPUs
        assert expected in out
    assert "leaves out the host's work between instructions" in " ".join(out.split())  # the caption, wrapped
    assert "Emulated GPUs" not in out  # measured on a real GPU: no caveat
    monkeypatch.setenv(gpt_cli.BACKEND_ENV, "emulated")
    gpt_cli.print_report(summary)
    assert "Emulated GPUs: that work runs on shared CPU cores" in " ".join(capsys.readouterr().out.split())


def _run_recipe(summary: Path, *args: str) -> dict[str, Any]:
    """Launch the recipe on 2 processes; a job that dies at exit still counts if it wrote its summary."""
    script = RECIPES / "gpt_lightning.py"
    result = torchrun(2, script, ["--summary", str(summary), *args], timeout=LAUNCH_TIMEOUT_S, done=summary.exists)
    if not summary.exists():
        pytest.fail(f"recipe wrote no summary (exit code {result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(summary.read_text())


@pytest.mark.distributed
@pytest.mark.parametrize("schedule", ["1f1b", "gpipe"])
def test_recipe_trains_a_two_stage_pipeline(schedule: str, tmp_path: Path) -> None:
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    steps = 6
    summary = _run_recipe(
        tmp_path / "summary.json", "--pp", "2", "--schedule", schedule, "--steps", str(steps), "--no-perseus"
    )
    recipe = summary["recipe"]
    assert "mode" not in summary  # no Perseus section without the callback
    assert recipe["args"]["schedule"] == schedule and recipe["args"]["layers_per_stage"] == [2, 2]
    loss = recipe["loss"]
    assert len(loss) == steps and all(math.isfinite(x) for x in loss)
    assert loss[-1] < loss[0] - 0.3  # the Zipf-like token frequencies are learnt within a few steps
    assert len(recipe["iteration_times_s"]) == steps and recipe["median_iteration_time_s"] > 0


@pytest.mark.distributed
def test_recipe_on_four_processes_reports_the_measured_saving(tmp_path: Path) -> None:
    config = tmp_path / "perseus.yaml"
    config.write_text(
        "gpu_backend: emulated\ncache_dir: null\nbaseline_iterations: 4\ndeploy_iterations: 4\n"
        "profiling: {max_clocks: 4, iterations_per_clock: 2}\nstraggler: {threshold: 0.3, patience: 3, recovery: 0.1}\n"
    )
    summary_path = tmp_path / "summary.json"
    args = ["--summary", str(summary_path), "--pp", "2", "--dp", "2", "--steps", "30", "--perseus-config", str(config)]
    result = torchrun(4, RECIPES / "gpt_lightning.py", args, timeout=LAUNCH_TIMEOUT_S * 2, done=summary_path.exists,
                      env={"PERSEUS_EMULATED_GPU_UPDATE_PERIOD": "0.02"})
    assert summary_path.exists(), result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["phase"] == "monitor" and summary["profiling_iterations"] > 0
    assert summary["baseline"]["energy_j"] > 0 and summary["deployed"]["energy_j"] > 0
    assert math.isfinite(summary["saving_pct"])
    assert len(summary["plan"]["frequencies"]) == 2  # one list per pipeline rank


@pytest.mark.distributed
@pytest.mark.parametrize(("schedule", "kinds"), [("interleaved-1f1b", {"forward", "backward"}),
                                                 ("zero-bubble", {"forward", "backward_input", "backward_weight"})])
def test_callback_plans_multi_stage_schedules(schedule: str, kinds: set[str], tmp_path: Path) -> None:
    config = tmp_path / "perseus.yaml"
    config.write_text("gpu_backend: emulated\ncache_dir: null\nbaseline_iterations: 4\ndeploy_iterations: 4\n"
                      "profiling: {max_clocks: 4, iterations_per_clock: 2}\n")
    summary_path = tmp_path / "summary.json"
    args = ["--summary", str(summary_path), "--pp", "2", "--schedule", schedule, "--steps", "30", "--perseus-config", str(config)]
    result = torchrun(2, RECIPES / "gpt_lightning.py", args, timeout=LAUNCH_TIMEOUT_S, done=summary_path.exists,
                      env={"PERSEUS_EMULATED_GPU_UPDATE_PERIOD": "0.02"})
    assert summary_path.exists(), result.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["phase"] == "monitor" and math.isfinite(summary["saving_pct"])
    entries = [entry for rank in summary["plan"]["frequencies"] for entry in rank]
    assert {entry[0] for entry in entries} == kinds  # the observed instructions, I/W split for zero-bubble
    assert {entry[-2] for entry in entries} == {0, 1, 2, 3} or schedule == "zero-bubble"  # [kind, mb, stage, MHz]
