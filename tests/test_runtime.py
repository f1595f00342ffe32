"""PerseusRuntime in one process: phases, cache, state, observe/off modes and failures (EmulatedGPU)."""

from __future__ import annotations

import time
import warnings

import pytest

from perseus_lightning.core.profile import BACKWARD, FORWARD
from perseus_lightning.core.schedules import Instruction
from perseus_lightning.gpu.emulated import EmulatedGPU
from perseus_lightning.runtime.cache import CacheMismatchError
from perseus_lightning.runtime.config import PerseusConfig
from perseus_lightning.runtime.runtime import PerseusRuntime

HOST_SECONDS = {FORWARD: 0.003, BACKWARD: 0.006}
MICROBATCHES = 2


def make_config(tmp_path, **overrides) -> PerseusConfig:
    options = {
        "cache_dir": str(tmp_path / "cache"),
        "warmup_iterations": 1,
        "baseline_iterations": 2,
        "deploy_iterations": 2,
        "profiling": {"max_clocks": 4, "iterations_per_clock": 2},
    }
    options.update(overrides)
    return PerseusConfig.from_mapping(options)


def make_gpu(tmp_path, **kwargs) -> EmulatedGPU:
    return EmulatedGPU(0, state_dir=tmp_path / "gpus", update_period=0.01, **kwargs)


def run(runtime: PerseusRuntime, iterations: int) -> list[str]:
    """Run single-stage iterations (F and B of each microbatch); the phase after each one."""
    phases = []
    for _ in range(iterations):
        runtime.iteration_begin()
        for microbatch in range(MICROBATCHES):
            for kind in (FORWARD, BACKWARD):
                instruction = Instruction(0, kind, microbatch)
                runtime.instruction_begin(instruction)
                time.sleep(HOST_SECONDS[kind])
                runtime.instruction_end(instruction)
        time.sleep(0.002)  # the optimizer step: GPU idle
        runtime.iteration_end()
        phases.append(runtime.phase)
    return phases


def test_phases_run_in_order_and_profiling_stays_in_budget(tmp_path, capsys) -> None:
    gpu = make_gpu(tmp_path)
    runtime = PerseusRuntime(make_config(tmp_path), device=gpu)
    runtime.start()
    phases = run(runtime, 60)
    runtime.close()
    assert "Perseus: profiled 4 clocks" in capsys.readouterr().out  # rank 0's progress bar
    seen = [p for i, p in enumerate(phases) if i == 0 or phases[i - 1] != p]
    assert seen == ["baseline", "profile", "deploy", "monitor"]
    profile_blocks = {block.clock_mhz for block in gpu.compute_log}
    assert len(profile_blocks) <= 4 + 1  # the budget, plus the max clock
    summary = runtime.summary()
    assert summary["baseline"]["energy_j"] > 0 and summary["deployed"]["energy_j"] > 0
    assert summary["profiling_iterations"] == phases.count("profile")  # the last one ends in "deploy", the first in "baseline"
    assert summary["plan"]["frequencies"][0][0][0] == FORWARD
    assert gpu.locked_clock() is None  # close() restored the clock


def test_a_rerun_reads_the_cache_and_skips_profiling(tmp_path) -> None:
    first = PerseusRuntime(make_config(tmp_path), device=make_gpu(tmp_path), model_signature="mlp")
    first.start()
    run(first, 60)
    first.close()
    assert first.frontier is not None
    second = PerseusRuntime(make_config(tmp_path), device=make_gpu(tmp_path), model_signature="mlp")
    second.start()
    phases = run(second, 10)
    second.close()
    assert "profile" not in phases and phases[-1] == "monitor"
    assert second.summary()["profiling_iterations"] == first.summary()["profiling_iterations"]
    assert second.frontier.to_dict()["plans"] == first.frontier.to_dict()["plans"]


def test_a_cache_file_from_another_model_is_an_error_that_names_the_fix(tmp_path) -> None:
    cache_file = tmp_path / "plan.json"
    first = PerseusRuntime(make_config(tmp_path, cache_dir=str(cache_file)), device=make_gpu(tmp_path), model_signature="mlp")
    first.start()
    run(first, 60)
    first.close()
    other = PerseusRuntime(make_config(tmp_path, cache_dir=str(cache_file)), device=make_gpu(tmp_path), model_signature="gpt")
    other.start()
    with pytest.raises(CacheMismatchError, match="Fix"):
        run(other, 3)
    assert other.device.locked_clock() is None


def test_a_resumed_run_neither_profiles_nor_measures_the_baseline_again(tmp_path) -> None:
    first = PerseusRuntime(make_config(tmp_path, cache_dir=None), device=make_gpu(tmp_path))
    first.start()
    run(first, 60)
    first.close()
    state = first.state_dict()
    resumed = PerseusRuntime(make_config(tmp_path, cache_dir=None), device=make_gpu(tmp_path))
    resumed.load_state_dict(state)
    resumed.start()
    phases = run(resumed, 5)
    resumed.close()
    assert phases == ["monitor"] * 5
    assert resumed.summary()["saving_pct"] == first.summary()["saving_pct"]


def test_observe_mode_measures_without_touching_clocks(tmp_path) -> None:
    gpu = make_gpu(tmp_path)
    runtime = PerseusRuntime(make_config(tmp_path, mode="observe"), device=gpu)
    runtime.start()
    phases = run(runtime, 8)
    runtime.close()
    assert phases[:3] == ["baseline", "baseline", "monitor"]
    assert {block.clock_mhz for block in gpu.compute_log} == {gpu.model.max_frequency}
    assert runtime.summary()["baseline"]["energy_j"] > 0


def test_the_configured_time_scale_paces_the_emulated_gpu(tmp_path) -> None:
    gpu = make_gpu(tmp_path)
    runtime = PerseusRuntime(make_config(tmp_path, mode="observe", emulation={"time_scale": 2.0}), device=gpu)
    runtime.start()
    run(runtime, 2)
    runtime.close()
    durations = sorted(block.end - block.start for block in gpu.compute_log)
    assert gpu.time_scale == 2.0 and len(durations) == 2 * 2 * MICROBATCHES
    forwards, backwards = durations[: 2 * MICROBATCHES], durations[2 * MICROBATCHES:]  # sleeps of 3 and 6 ms
    assert forwards[0] >= 2 * HOST_SECONDS[FORWARD] * 0.98 and backwards[0] >= 2 * HOST_SECONDS[BACKWARD] * 0.98
    assert backwards[-1] <= 2 * HOST_SECONDS[BACKWARD] + 0.02


def test_each_stage_and_kind_is_one_emulated_kernel(tmp_path) -> None:
    gpu = make_gpu(tmp_path, kernel_samples=MICROBATCHES)
    runtime = PerseusRuntime(make_config(tmp_path, mode="observe"), device=gpu)
    runtime.start()
    run(runtime, 2)  # sets each kind's work: the host sleeps 3 ms per forward, 6 ms per backward
    runtime.iteration_begin()
    for kind in (FORWARD, BACKWARD):  # now without host work: the emulated GPU still runs each kernel's
        runtime.instruction_begin(Instruction(0, kind, 0))
        runtime.instruction_end(Instruction(0, kind, 0))
    runtime.iteration_end()
    runtime.close()
    forward, backward = [block.end - block.start for block in list(gpu.compute_log)[-2:]]
    # Each kernel lasts what its kind's host work measured: never less than the sleeps, and more
    # only by the host's scheduling delays (2.4 ms once in CI on this 2-core machine).
    assert HOST_SECONDS[FORWARD] * 0.98 <= forward <= HOST_SECONDS[FORWARD] + 0.02
    assert HOST_SECONDS[BACKWARD] * 0.98 <= backward <= HOST_SECONDS[BACKWARD] + 0.02


def test_off_mode_opens_nothing(tmp_path) -> None:
    runtime = PerseusRuntime(make_config(tmp_path, mode="off"))
    runtime.start()
    assert run(runtime, 2) == ["off", "off"] and runtime.device is None


class BrokenCounterGPU(EmulatedGPU):
    def energy_j(self) -> float:
        raise OSError("energy counter unreadable")


def test_a_failing_gpu_turns_perseus_off_and_training_goes_on(tmp_path) -> None:
    gpu = BrokenCounterGPU(0, state_dir=tmp_path / "gpus", update_period=0.01)
    runtime = PerseusRuntime(make_config(tmp_path), device=gpu)
    runtime.start()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        phases = run(runtime, 4)
    assert phases[-1] == "off"
    assert sum("Training continues without Perseus" in str(w.message) for w in caught) == 1
    assert gpu.locked_clock() is None


def test_an_announced_straggler_switches_plans_and_recovery_switches_back(tmp_path) -> None:
    runtime = PerseusRuntime(make_config(tmp_path, cache_dir=None), device=make_gpu(tmp_path))
    runtime.start()
    run(runtime, 60)
    fastest = runtime.frontier.fastest
    runtime.announce_straggler(1.15)
    run(runtime, 2)
    assert runtime.plan.iteration_time > fastest.iteration_time
    assert runtime.plan.iteration_time <= 1.15 * fastest.iteration_time * (1 + 1e-9)
    runtime.announce_straggler(None)
    run(runtime, 2)
    runtime.close()
    assert runtime.plan is fastest
    episode = runtime.summary()["straggler_episodes"][0]
    assert episode["slowdown"] == pytest.approx(1.15) and episode["end_iteration"] is not None
