"""PerseusCallback in Lightning: plain and accumulated training in-process, pipelines on gloo (EmulatedGPU)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchrun import torchrun

from perseus_lightning.core.schedules import build_schedule
from perseus_lightning.integrations.lightning import PerseusCallback
from perseus_lightning.runtime.config import ConfigError

WORKER = Path(__file__).parent / "distributed" / "lightning_worker.py"
DDP_WORKER = Path(__file__).parent / "distributed" / "ddp_worker.py"
FAST_PROFILING = {"max_clocks": 4, "iterations_per_clock": 2}
TIME_TOLERANCE = 1.1
"""Median iteration times of a CPU job on 2 shared cores vary by several percent between phases."""
EMULATED_TIME_SCALE = 2.0
"""The emulated GPUs' pace in the multi-process tests, as in recipes/perseus-cpu.yaml. At 1, a block at max clock
lasts as long as its contended host took and a slowed block does not, so CPU contention entered the profiles and
pace calibrations but not the slowed plans (each test below notes how that once failed it)."""


@pytest.fixture(autouse=True)
def emulated_gpus(tmp_path, monkeypatch) -> Path:
    directory = tmp_path / "gpus"
    monkeypatch.setenv("PERSEUS_GPU_BACKEND", "emulated")
    monkeypatch.setenv("PERSEUS_EMULATED_GPU_DIR", str(directory))
    monkeypatch.setenv("PERSEUS_EMULATED_GPU_UPDATE_PERIOD", "0.01")
    return directory


class SleepyRegressor(LightningModule):
    """A linear model whose forward and backward also sleep, so they take measurable time."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.layer = nn.Linear(8, 1)
        self.fail_at_step = fail_at_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.fail_at_step is not None and self.global_step >= self.fail_at_step:
            raise RuntimeError("the user's training step failed")
        time.sleep(0.003)
        inputs, targets = batch
        return nn.functional.mse_loss(self.layer(inputs), targets)

    def on_before_backward(self, loss: torch.Tensor) -> None:
        time.sleep(0.006)  # the backward's share of the work

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(0)
        return DataLoader(TensorDataset(torch.randn(4096, 8, generator=generator), torch.randn(4096, 1, generator=generator)), batch_size=4)


def fit(callback: PerseusCallback, steps: int, tmp_path: Path, model: LightningModule | None = None,
        ckpt_path: Path | None = None, **trainer_kwargs) -> Trainer:
    trainer = Trainer(
        accelerator="cpu", devices=1, max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, **trainer_kwargs,
    )
    trainer.fit(model or SleepyRegressor(), ckpt_path=ckpt_path)
    return trainer


def test_gradient_accumulation_makes_each_batch_a_microbatch(tmp_path) -> None:
    callback = PerseusCallback(mode="observe", cache_dir=None, warmup_iterations=2)
    fit(callback, 4, tmp_path, accumulate_grad_batches=3)
    runtime = callback.runtime
    assert [ins.action for ins in runtime._observed] == ["0F0", "0B0", "0F1", "0B1", "0F2", "0B2"]
    assert runtime.iteration == 4


def test_a_resumed_run_does_not_profile_again(tmp_path) -> None:
    options = {"cache_dir": None, "warmup_iterations": 1, "baseline_iterations": 2, "deploy_iterations": 2, "profiling": FAST_PROFILING}
    first = PerseusCallback(**options)
    trainer = fit(first, 60, tmp_path)
    assert first.runtime.phase == "monitor" and first.summary()["profiling_iterations"] > 0
    checkpoint = tmp_path / "run.ckpt"
    trainer.save_checkpoint(checkpoint)

    resumed = PerseusCallback(**options)
    phases: list[str] = []
    original = resumed.on_train_batch_end

    def record(*args, **kwargs) -> None:
        original(*args, **kwargs)
        phases.append(resumed.runtime.phase)

    resumed.on_train_batch_end = record
    fit(resumed, 66, tmp_path, ckpt_path=checkpoint)
    assert phases == ["monitor"] * 6
    assert resumed.summary()["profiling_iterations"] == first.summary()["profiling_iterations"]
    assert resumed.summary()["plan"] == first.summary()["plan"]


def test_metrics_reach_the_trainers_loggers(tmp_path) -> None:
    callback = PerseusCallback(mode="observe", cache_dir=None, warmup_iterations=1, baseline_iterations=2)
    trainer = fit(callback, 8, tmp_path)
    metrics = trainer.logged_metrics
    assert {"perseus/phase", "perseus/iteration_time_s"} <= set(metrics)
    assert float(metrics["perseus/iteration_time_s"]) > 0.009


def test_an_exception_in_training_restores_the_clock(tmp_path, emulated_gpus) -> None:
    from perseus_lightning.gpu.emulated import EmulatedGPU

    callback = PerseusCallback(cache_dir=None, warmup_iterations=1, baseline_iterations=3)
    with pytest.raises(RuntimeError, match="the user's training step failed"):
        fit(callback, 20, tmp_path, model=SleepyRegressor(fail_at_step=3))
    assert callback.runtime.phase == "baseline"  # the max clock was locked ...
    assert EmulatedGPU(0, state_dir=emulated_gpus).locked_clock() is None  # ... and is restored


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"mode": "fast"}, r"mode.*Fix: .*apply"),
        ({"gpu_backend": "cuda"}, r"gpu_backend.*Fix: .*nvml"),
        ({"straggler": {"threshold": -1}}, r"straggler.threshold.*Fix"),
    ],
)
def test_invalid_arguments_name_the_fix(kwargs, message) -> None:
    with pytest.raises(ConfigError, match=message):
        PerseusCallback(**kwargs)


def test_a_schedule_the_callback_cannot_see_is_an_error(tmp_path) -> None:
    class OpaqueSchedule(SleepyRegressor):
        def setup(self, stage: str) -> None:
            self.pipeline_schedule = object()

    with pytest.raises(ConfigError, match=r"cannot see the pipeline stages of object.*Fix"):
        fit(PerseusCallback(cache_dir=None), 2, tmp_path, model=OpaqueSchedule())


def test_from_config_reads_the_shared_yaml_with_overrides(tmp_path) -> None:
    path = tmp_path / "perseus.yaml"
    path.write_text("perseus:\n  mode: observe\n  straggler:\n    threshold: 0.2\n    patience: 4\n")
    callback = PerseusCallback.from_config(path, warmup_iterations=5)
    assert (callback.config.mode, callback.config.straggler.patience, callback.config.warmup_iterations) == ("observe", 4, 5)
    assert callback.state_key == "PerseusCallback{'mode': 'observe'}"


def test_lightning_cli_configures_the_callback(tmp_path) -> None:
    cli = LightningCLI(
        SleepyRegressor,
        run=False,
        save_config_callback=None,
        args=[
            "--trainer.accelerator=cpu", "--trainer.max_steps=4", "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=perseus_lightning.integrations.lightning.PerseusCallback",
            "--trainer.callbacks.mode=observe", "--trainer.callbacks.cache_dir=null",
            "--trainer.callbacks.straggler={threshold: 0.3}",
        ],
    )
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, PerseusCallback))
    assert callback.config.mode == "observe" and callback.config.straggler.threshold == 0.3
    cli.trainer.fit(cli.model)
    assert callback.runtime.iteration == 4


# ---------------------------------------------------------------- multi-process (gloo)
def run_worker(tmp_path: Path, processes: int, pp: int, steps: int, callback: dict, timeout: float = 240,
               worker: Path = WORKER) -> list[dict]:
    output = tmp_path / "out"
    args = [str(output), "--steps", str(steps), "--callback", json.dumps(callback), *(["--pp", str(pp)] if pp else [])]
    result = torchrun(processes, worker, args, timeout=timeout, done=lambda: len(list(output.glob("rank*.json"))) == processes)
    results = sorted(output.glob("rank*.json"))
    assert len(results) == processes, result.stderr[-4000:]
    return [json.loads(path.read_text()) for path in results]


@pytest.mark.distributed
def test_two_stage_pipeline_saves_energy_at_baseline_speed(tmp_path) -> None:
    # At time_scale 1, one CI run failed all 3 attempts, the last deploying a plan 27 % slower than the baseline.
    callback = {"cache_dir": None, "warmup_iterations": 2, "baseline_iterations": 6, "deploy_iterations": 8,
                "profiling": FAST_PROFILING, "emulation": {"time_scale": EMULATED_TIME_SCALE}}
    for attempt in range(3):  # other jobs on this machine's 2 cores can swing one run's timing: another run decides
        ranks = run_worker(tmp_path / str(attempt), processes=2, pp=2, steps=34, callback=callback)
        summary = ranks[0]["summary"]
        deployed, baseline = summary["deployed"], summary["baseline"]
        if deployed["energy_j"] < baseline["energy_j"] and deployed["iteration_time_s"] <= TIME_TOLERANCE * baseline["iteration_time_s"]:
            break
    expected = build_schedule("1f1b", 2, 4).actions()
    for result in ranks:
        assert result["instrumented"] == 1
        assert result["last_iteration"] == expected[result["pipeline_rank"]]  # the order is observed
        assert result["summary"] == summary  # every rank agrees
        assert result["phases"][-1] == "monitor"
        planned = [entry[-1] for entry in summary["plan"]["frequencies"][result["pipeline_rank"]]]
        applied = result["compute_clocks"]  # the emulator's log: the clock each instruction ran at
        assert len(applied) == 5 * len(planned)
        matches = sum(a == p for a, p in zip(applied, planned * 5))
        assert matches >= 0.9 * len(applied), (applied, planned)
    heavy, light = ([entry[-1] for entry in rank] for rank in summary["plan"]["frequencies"])
    assert sum(light) / len(light) < sum(heavy) / len(heavy)  # the light stage is slowed more
    assert summary["deployed"]["energy_j"] < summary["baseline"]["energy_j"]
    assert summary["deployed"]["iteration_time_s"] <= TIME_TOLERANCE * summary["baseline"]["iteration_time_s"]


def is_open_at(episode: dict, iteration: int) -> bool:
    """Whether a summary's straggler episode covers ``iteration``."""
    return episode["start_iteration"] <= iteration and (episode["end_iteration"] is None or episode["end_iteration"] > iteration)


@pytest.mark.distributed
def test_a_straggler_pipeline_slows_the_other_and_recovery_restores_it(tmp_path) -> None:
    # At time_scale 1, with a busy loop beside it, 1 run of 2 read the 3x throttling as 1.0-1.5x and found it too late.
    callback = {
        "cache_dir": None, "warmup_iterations": 2, "baseline_iterations": 3, "deploy_iterations": 4,
        "profiling": FAST_PROFILING, "straggler": {"threshold": 0.4, "patience": 3, "recovery": 0.25},
        "emulation": {"straggler_ranks": [2, 3], "straggler_slowdown": 3.0, "straggler_iterations": [22, 32],
                      "time_scale": EMULATED_TIME_SCALE},
    }
    ranks = run_worker(tmp_path, processes=4, pp=2, steps=48, callback=callback, timeout=400)
    summary = ranks[0]["summary"]
    assert ranks[0]["phases"][20] == "monitor"  # monitoring began before the throttling (at 17 when measured)
    episodes = summary["straggler_episodes"]
    # The throttling (iterations 22-31) is detected within patience plus a few noisy iterations: a
    # pipeline-1 episode is open by iteration 29 (it opened at 25 and closed at 34 when measured). 4
    # processes share 2 cores, so CPU time-sharing alone may make short episodes too, and one that
    # starts just before 22 simply goes on as the throttling's.
    episode = next((e for e in episodes if e["pipeline"] == 1 and is_open_at(e, 29)), None)
    assert episode is not None, f"no pipeline-1 episode open at iteration 29: {episodes}"
    assert episode["plan_iteration_time_s"] > summary["fastest_iteration_time_s"]  # pipeline 0 paced itself
    assert episode["end_iteration"] is not None and 32 <= episode["end_iteration"] <= 43
    assert episode["energy_j"] > 0 and episode["predicted_saving_pct"] > 0
    assert all(rank["summary"]["straggler_episodes"] == episodes for rank in ranks)  # every rank agrees


@pytest.mark.distributed
def test_ddp_ranks_slow_down_to_a_straggling_rank(tmp_path) -> None:
    # At time_scale 1, rank 0's paced plan read up to 1.4x slow and hid the straggler (with a busy loop beside it:
    # no episode at all; at 2, 4 runs of 4 found it, at 1.79x or more).
    callback = {
        "cache_dir": None, "warmup_iterations": 2, "baseline_iterations": 4, "deploy_iterations": 4,
        "profiling": FAST_PROFILING, "straggler": {"threshold": 0.4, "patience": 3, "recovery": 0.25},
        "emulation": {"straggler_ranks": [1], "straggler_slowdown": 2.0, "straggler_iterations": [26, 36],
                      "time_scale": EMULATED_TIME_SCALE},
    }
    ranks = run_worker(tmp_path, processes=2, pp=0, steps=52, callback=callback, worker=DDP_WORKER)
    episodes = ranks[0]["summary"]["straggler_episodes"]
    # Other jobs on this machine's 2 cores may make short episodes too, and one that starts just
    # before the throttling (iterations 26-35) goes on as its episode: find the one open at 33 (it
    # opened at 29 and closed at 38 when measured; monitoring begins at about 21).
    episode = next((e for e in episodes if e["pipeline"] == 1 and is_open_at(e, 33)), None)
    assert episode is not None, f"no pipeline-1 episode open at iteration 33: {episodes}"
    assert episode["end_iteration"] is not None and 36 <= episode["end_iteration"] <= 47
    assert episode["plan_iteration_time_s"] > ranks[0]["summary"]["fastest_iteration_time_s"]  # rank 0 paced itself
    assert all(rank["summary"]["straggler_episodes"] == episodes for rank in ranks)
