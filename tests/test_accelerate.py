"""PerseusPlugin in Accelerate: in-process training (Accelerator(cpu=True)), config errors, the
`perseus launch` wrapper, and the GPT recipe under `accelerate launch` (gloo, emulated GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.tracking import GeneralTracker
from torch import nn
from torchrun import REPO_ROOT, free_port

from perseus_lightning.accelerate import ENV_CONFIG, PerseusPlugin
from perseus_lightning.cli.main import main as perseus_main
from perseus_lightning.gpu.emulated import EmulatedGPU
from perseus_lightning.runtime.config import ConfigError

FAST = "cache_dir: null\nprofiling: {max_clocks: 4, iterations_per_clock: 2}\n"
QUICK_PHASES = FAST + "warmup_iterations: 1\nbaseline_iterations: 2\ndeploy_iterations: 2\n"


@pytest.fixture(autouse=True)
def emulated_gpus(tmp_path, monkeypatch) -> Iterator[Path]:
    """Emulated GPUs of this test's own, Perseus off unless a test sets PERSEUS_CONFIG, and a fresh
    Accelerate state afterwards (it is per process)."""
    directory = tmp_path / "gpus"
    monkeypatch.setenv("PERSEUS_GPU_BACKEND", "emulated")
    monkeypatch.setenv("PERSEUS_EMULATED_GPU_DIR", str(directory))
    monkeypatch.setenv("PERSEUS_EMULATED_GPU_UPDATE_PERIOD", "0.01")
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    yield directory
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def use_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> Path:
    path = tmp_path / "perseus.yaml"
    path.write_text(text)
    monkeypatch.setenv(ENV_CONFIG, str(path))
    return path


class SleepyRegressor(nn.Module):
    """A linear model whose forward and backward also sleep, so they take measurable time."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        time.sleep(0.003)
        output = self.layer(inputs)
        output.register_hook(lambda grad: time.sleep(0.006))  # the backward's share of the work
        return output


class RecordingTracker(GeneralTracker):
    """An Accelerate tracker that keeps what is logged."""

    name = "recording"
    requires_logging_directory = False

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def tracker(self) -> list[tuple[int | None, dict[str, float]]]:
        return self.logged

    def store_init_configuration(self, values: dict) -> None:
        pass

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        self.logged.append((step, dict(values)))


class Run:
    """An Accelerator, the model and optimizer it prepared, and the plugin ``PERSEUS_CONFIG`` configures."""

    def __init__(self, accumulation: int = 1, **accelerator_kwargs) -> None:
        self.accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation, **accelerator_kwargs)
        self.perseus = PerseusPlugin.from_env(self.accelerator)
        torch.manual_seed(0)
        model = SleepyRegressor()
        self.model, self.optimizer = self.accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.01))
        self.accumulation = accumulation
        self.phases: list[str] = []

    def train(self, iterations: int, fail_at: int | None = None) -> None:
        for batch in range(iterations * self.accumulation):
            with self.accelerator.accumulate(self.model), self.perseus.step():
                if fail_at is not None and batch // self.accumulation == fail_at:
                    raise RuntimeError("the user's training step failed")
                loss = self.model(torch.randn(4, 8)).pow(2).mean()
                self.accelerator.backward(loss)
                self.optimizer.step()
                self.optimizer.zero_grad()
            if self.perseus.runtime is not None and self.accelerator.sync_gradients:
                self.phases.append(self.perseus.runtime.phase)


# ------------------------------------------------------------------ enabling, or not
@pytest.mark.parametrize("config", [None, "", "mode: off\n"])
def test_without_a_config_nothing_is_instrumented_and_no_clock_is_touched(config, tmp_path, monkeypatch, emulated_gpus) -> None:
    if config is not None:
        monkeypatch.setenv(ENV_CONFIG, "")
        if config:
            use_config(tmp_path, monkeypatch, config)
    threads = threading.active_count()
    run = Run()
    perseus, accelerator = run.perseus, run.accelerator
    assert perseus.runtime is None and not perseus.enabled
    assert "backward" not in vars(accelerator) and "end_training" not in vars(accelerator)
    assert perseus.step() is perseus.step()  # one shared no-op context
    run.train(3)
    assert threading.active_count() == threads
    assert not emulated_gpus.exists()  # no GPU was opened, so no clock was locked
    assert perseus.state_dict() == {} and perseus.summary() == {"mode": "off", "phase": "off"}
    accelerator.end_training()


def test_gradient_accumulation_makes_each_backward_a_microbatch(tmp_path, monkeypatch) -> None:
    use_config(tmp_path, monkeypatch, "mode: observe\ncache_dir: null\n")
    run = Run(accumulation=3)
    assert run.perseus.enabled and "backward" in vars(run.accelerator)
    run.train(4)
    runtime = run.perseus.runtime
    assert [ins.action for ins in runtime._observed] == ["0F0", "0B0", "0F1", "0B1", "0F2", "0B2"]
    assert runtime.iteration == run.perseus.iteration == 4
    run.accelerator.end_training()
    assert "backward" not in vars(run.accelerator) and not run.perseus.enabled


def test_metrics_go_through_the_accelerators_trackers(tmp_path, monkeypatch) -> None:
    use_config(tmp_path, monkeypatch, "mode: observe\ncache_dir: null\nwarmup_iterations: 1\nbaseline_iterations: 2\n")
    tracker = RecordingTracker()
    run = Run(log_with=[tracker])
    run.accelerator.init_trackers("perseus-test")
    run.train(6)
    assert [step for step, _ in tracker.logged] == [1, 2, 3, 4, 5, 6]
    metrics = tracker.logged[-1][1]
    assert {"perseus/phase", "perseus/iteration_time_s"} <= set(metrics)
    assert metrics["perseus/iteration_time_s"] > 0.009
    run.accelerator.end_training()


def test_a_resumed_run_does_not_profile_again(tmp_path, monkeypatch) -> None:
    use_config(tmp_path, monkeypatch, QUICK_PHASES)
    first = Run()
    first.train(60)
    assert first.phases[-1] == "monitor" and first.perseus.summary()["profiling_iterations"] > 0
    checkpoint = tmp_path / "checkpoint"
    first.accelerator.save_state(str(checkpoint))
    first.accelerator.end_training()
    saved = torch.load(checkpoint / "custom_checkpoint_0.pkl", weights_only=False)
    assert saved["iteration"] == 60 and saved["runtime"]["frontier"] is not None

    AcceleratorState._reset_state(True)
    resumed = Run()
    resumed.accelerator.load_state(str(checkpoint))
    resumed.train(6)
    assert resumed.phases == ["monitor"] * 6
    assert resumed.perseus.iteration == 66
    assert resumed.perseus.summary()["profiling_iterations"] == first.perseus.summary()["profiling_iterations"]
    assert resumed.perseus.summary()["plan"] == first.perseus.summary()["plan"]
    resumed.accelerator.end_training()


# ------------------------------------------------------------------ clocks on every exit path
def test_an_exception_in_a_step_restores_the_clock(tmp_path, monkeypatch, emulated_gpus) -> None:
    use_config(tmp_path, monkeypatch, FAST + "warmup_iterations: 1\nbaseline_iterations: 5\n")
    run = Run()
    gpu = EmulatedGPU(0, state_dir=emulated_gpus)
    with pytest.raises(RuntimeError, match="the user's training step failed"):
        run.train(10, fail_at=3)
    assert run.perseus.runtime.phase == "baseline"  # the max clock was locked ...
    assert gpu.locked_clock() is None  # ... and is restored
    assert not run.perseus.enabled and "backward" not in vars(run.accelerator)


def test_end_training_and_close_restore_the_clock(tmp_path, monkeypatch, emulated_gpus) -> None:
    use_config(tmp_path, monkeypatch, FAST + "warmup_iterations: 1\nbaseline_iterations: 5\n")
    threads = threading.active_count()
    run = Run()
    run.train(3)
    gpu = EmulatedGPU(0, state_dir=emulated_gpus)
    assert gpu.locked_clock() == max(gpu.supported_clocks())
    run.accelerator.end_training()
    assert gpu.locked_clock() is None and threading.active_count() == threads
    assert "end_training" not in vars(run.accelerator)
    run.perseus.close()  # idempotent


def test_attach_rejects_what_is_not_a_pipelining_schedule(tmp_path, monkeypatch) -> None:
    use_config(tmp_path, monkeypatch, FAST)
    run = Run()
    with pytest.raises(ConfigError, match=r"cannot see the pipeline stages of object.*Fix"):
        run.perseus.attach(object())
    run.accelerator.end_training()


# ------------------------------------------------------------------ config errors
@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, r"PERSEUS_CONFIG=.*missing\.yaml: no such config file\. Fix: check the path"),
        ("profilng: {}\n", r"PERSEUS_CONFIG=.*perseus\.yaml: profilng: unknown key\. Fix: did you mean 'profiling'\?"),
        ("perseus:\n  mode: aply\n", r"perseus\.yaml: perseus\.mode: unknown mode 'aply'\. Fix: .*did you mean 'apply'"),
        ("straggler: {threshold: -1}\n", r"perseus\.yaml: straggler\.threshold: is -1, must be > 0\. Fix"),
        ("mode: [apply\n", r"perseus\.yaml: line \d+, column \d+: not valid YAML.*Fix"),
    ],
)
def test_a_bad_perseus_config_names_the_file_and_the_fix(text, message, tmp_path, monkeypatch) -> None:
    if text is None:
        monkeypatch.setenv(ENV_CONFIG, str(tmp_path / "missing.yaml"))
    else:
        use_config(tmp_path, monkeypatch, text)
    with pytest.raises(ConfigError, match=message):
        PerseusPlugin.from_env(Accelerator(cpu=True))


def test_from_env_puts_keyword_overrides_on_top_of_the_file(tmp_path, monkeypatch) -> None:
    use_config(tmp_path, monkeypatch, "mode: observe\ncache_dir: null\nemulation: {straggler_slowdown: 1.5}\n")
    accelerator = Accelerator(cpu=True)
    perseus = PerseusPlugin.from_env(accelerator, emulation={"straggler_ranks": [1]}, warmup_iterations=5)
    emulation = perseus.config.emulation
    assert (emulation.straggler_ranks, emulation.straggler_slowdown, perseus.config.warmup_iterations) == ((1,), 1.5, 5)
    perseus.close()
    with pytest.raises(ConfigError, match=r"^PerseusConfig\.replace: emulation\.straggler_slowdown: is 0\.5"):
        PerseusPlugin.from_env(accelerator, emulation={"straggler_slowdown": 0.5})


def test_perseus_launch_reports_a_bad_config_before_launching(tmp_path, capsys) -> None:
    path = tmp_path / "perseus.yaml"
    path.write_text("mode: aply\n")
    assert perseus_main(["launch", "--perseus-config", str(path), "--multi_gpu", "train.py"]) == 2
    assert f"perseus launch: error: {path}: mode: unknown mode 'aply'. Fix:" in capsys.readouterr().err


def test_perseus_launch_hands_every_other_argument_to_accelerate(tmp_path, monkeypatch) -> None:
    import accelerate.commands.launch

    path = tmp_path / "perseus.yaml"
    path.write_text(FAST)
    launched = []
    monkeypatch.setattr(accelerate.commands.launch, "launch_command", launched.append)
    monkeypatch.setenv(ENV_CONFIG, "")  # restored after the test
    script_args = ["--perseus-config", "the script's own", "--lr", "1"]
    argv = ["launch", "--multi_gpu", "--num_processes", "2", "--perseus-config", str(path), "train.py", *script_args]
    assert perseus_main(argv) == 0
    (args,) = launched
    assert (args.multi_gpu, args.num_processes, args.training_script) == (True, 2, "train.py")
    assert args.training_script_args == script_args and not hasattr(args, "perseus_config")
    assert os.environ[ENV_CONFIG] == str(path.resolve())


# ---------------------------------------------------------------- the recipe, 2 processes
RECIPE = REPO_ROOT / "recipes" / "gpt_accelerate.py"
RECIPE_ARGS = ["--pp", "2", "--log-interval", "1000"]  # the default GPT: instructions of tens of ms, an imbalanced pipeline
RECIPE_CONFIG = FAST + "warmup_iterations: 4\nbaseline_iterations: 5\ndeploy_iterations: 5\n"  # monitor by iteration 47
ATTEMPTS = 2  # about 1 in 30 two-process gloo jobs aborts at exit: a job is retried once


def launch_recipe(launcher: list[str], args: list[str], summary: Path, env: dict[str, str]) -> dict:
    """Run the recipe on 2 CPU processes with ``launcher`` (its own arguments first); its summary."""
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path, **env}
    for _attempt in range(ATTEMPTS):
        with tempfile.TemporaryDirectory(prefix="torchrun-logs-") as logs:  # else torchrun leaves one in the temp folder
            command = [
                *launcher, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--main_process_port", str(free_port()), "--log_dir", logs,
                str(RECIPE), *RECIPE_ARGS, *args, "--summary", str(summary),
            ]  # fmt: skip
            result = subprocess.run(
                command, check=False, env=full_env, capture_output=True, text=True, timeout=240, cwd=REPO_ROOT
            )
        if summary.is_file():
            return json.loads(summary.read_text())
    raise AssertionError(result.stdout[-2000:] + result.stderr[-4000:])


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> dict:
    """The recipe with ``PERSEUS_CONFIG`` under ``accelerate launch``, checkpointed at the end."""
    directory = tmp_path_factory.mktemp("accelerate-recipe")
    config = directory / "perseus.yaml"
    config.write_text(RECIPE_CONFIG)
    env = {ENV_CONFIG: str(config), "PERSEUS_GPU_BACKEND": "emulated", "PERSEUS_EMULATED_GPU_DIR": str(directory / "gpus"),
           "PERSEUS_EMULATED_GPU_UPDATE_PERIOD": "0.01"}
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    args = ["--steps", "50", "--save-state", str(directory / "checkpoint")]
    for attempt in range(3):  # other processes on a shared CPU can stretch one window and mask the saving
        summary = launch_recipe(launcher, args, directory / f"first-{attempt}.json", env)
        if (summary.get("saving_pct") or 0) > 0:
            break
    return {"summary": summary, "directory": directory, "env": env}


@pytest.mark.distributed
def test_perseus_config_enables_perseus_on_the_recipe_and_it_saves_energy(first_run) -> None:
    from perseus_lightning.core.planner import Frontier

    summary, directory = first_run["summary"], first_run["directory"]
    assert (summary["mode"], summary["phase"]) == ("apply", "monitor")
    assert summary["deployed"]["energy_j"] < summary["baseline"]["energy_j"] and summary["saving_pct"] > 0
    light, heavy = ([entry[-1] for entry in rank] for rank in summary["plan"]["frequencies"])
    assert sum(light) / len(light) < sum(heavy) / len(heavy)  # the last stage (LM head) is the heavy one
    # The main process's checkpoint holds every rank's plan.
    saved = torch.load(directory / "checkpoint" / "custom_checkpoint_0.pkl", weights_only=False)["runtime"]
    frontier = Frontier.from_dict(saved["frontier"], "checkpoint")
    assert frontier.fastest.plan.rank_lists(frontier.dag) == summary["plan"]["frequencies"]
    # Each rank drove the emulated GPU of its local rank, and end_training restored both clocks.
    for index in (0, 1):
        assert EmulatedGPU(index, state_dir=directory / "gpus").locked_clock() is None
    assert len(list((directory / "gpus").glob("gpu-*.json"))) == 2


@pytest.mark.distributed
def test_perseus_launch_enables_perseus_and_a_resumed_run_skips_profiling(first_run) -> None:
    first, directory = first_run["summary"], first_run["directory"]
    env = {key: value for key, value in first_run["env"].items() if key != ENV_CONFIG}
    launcher = [sys.executable, "-m", "perseus_lightning.cli.main", "launch", "--perseus-config", first_run["env"][ENV_CONFIG]]
    args = ["--steps", "60", "--resume-from", str(directory / "checkpoint")]
    resumed = launch_recipe(launcher, args, directory / "resumed.json", env)
    assert (resumed["mode"], resumed["phase"], resumed["iterations"]) == ("apply", "monitor", 10)
    assert resumed["profiling_iterations"] == first["profiling_iterations"]  # no second profiling phase
    assert resumed["plan"] == first["plan"] and resumed["saving_pct"] == first["saving_pct"]
    assert len(resumed["recipe"]["loss"]) == 10
