"""The emulated GPU (state shared across processes, compute stretching, energy counter) and GPU selection."""

from __future__ import annotations

import gc
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from perseus_lightning.core.gpu_model import A100_LIKE, H100_LIKE
from perseus_lightning.gpu import selection
from perseus_lightning.gpu.device import GPUControlError, GPULibraryNotFoundError
from perseus_lightning.gpu.emulated import ENV_DIR, ENV_UPDATE_PERIOD, EmulatedGPU, RunQueueWait, emulated_gpu_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
PERIOD = 0.02
IDLE = A100_LIKE.blocking_power


@pytest.fixture(autouse=True)
def gpu_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private emulated-GPU directory, and no GPU configuration from the caller's environment."""
    for name in (selection.ENV_BACKEND, selection.ENV_COUNT, selection.ENV_MODEL, selection.ENV_BLOCKING_POWER):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(ENV_UPDATE_PERIOD, raising=False)
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "gpus"))
    return tmp_path / "gpus"


def gpu(index: int = 0, **kwargs) -> EmulatedGPU:
    return EmulatedGPU(index, A100_LIKE, update_period=PERIOD, **kwargs)


def in_subprocess(code: str) -> str:
    """Run ``code`` in a fresh interpreter (same environment, so the same GPU directory); its stdout."""
    command = [sys.executable, "-c", textwrap.dedent(code)]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_identity_and_clocks(gpu_dir: Path) -> None:
    dev = gpu(3)
    assert dev.name == "Emulated A100-like"
    assert dev.uuid.startswith("GPU-emulated-0003-") and dev.uuid == gpu(3).uuid != gpu(2).uuid
    assert dev.supported_clocks() == tuple(sorted(A100_LIKE.frequencies, reverse=True))
    assert dev.supported_clocks()[0] == 1410 and not dev.observe_only
    assert dev.locked_clock() is None
    state = json.loads((gpu_dir / "gpu-3.json").read_text())
    assert state["format"] == "perseus-emulated-gpu" and state["locked_clock_mhz"] is None and state["uuid"] == dev.uuid


def test_default_dir_is_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DIR)
    assert emulated_gpu_dir().name.startswith("perseus-emulated-gpus-")


def test_lock_and_reset_are_visible_across_processes() -> None:
    dev = gpu()
    dev.lock_clock(1200)
    assert dev.locked_clock() == 1200
    seen = in_subprocess("""
        from perseus_lightning.gpu.emulated import EmulatedGPU
        other = EmulatedGPU(0)
        print(other.locked_clock())
        other.reset_clock()
    """)
    assert seen == "1200"
    assert dev.locked_clock() is None


def test_invalid_clock_names_the_supported_range() -> None:
    dev = gpu()
    for bad in (1000, 2000, 0):
        with pytest.raises(GPUControlError, match="855-1410 MHz"):
            dev.lock_clock(bad)
    assert dev.locked_clock() is None


def test_observe_only_never_changes_clocks() -> None:
    gpu().lock_clock(1200)
    watcher = gpu(observe_only=True)
    assert watcher.observe_only
    watcher.reset_clock()
    watcher.lock_clock(900)
    assert watcher.locked_clock() == 1200


def test_counter_advances_per_update_period_and_is_monotone() -> None:
    dev = gpu()
    readings = []
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < 12 * PERIOD:
        readings.append(dev.energy_j())
    changes = sum(b != a for a, b in zip(readings, readings[1:]))
    assert all(b >= a for a, b in zip(readings, readings[1:]))
    assert 4 <= changes <= elapsed / PERIOD + 1  # one step per tick, not one per read
    assert len(readings) > 5 * changes
    # At the last tick it read the exact integral, up to noise; since then at most one period passed.
    assert dev.energy_j() == pytest.approx(dev.true_energy_j(), abs=IDLE * PERIOD * 1.5 + 0.05 * dev.true_energy_j())


def test_idle_energy_and_power() -> None:
    dev = gpu(noise=0.0)
    before0, e0, after0 = time.monotonic(), dev.true_energy_j(), time.monotonic()
    time.sleep(0.1)
    before1, e1, after1 = time.monotonic(), dev.true_energy_j(), time.monotonic()
    assert dev.power_w() == IDLE
    # The emulator reads its own clock somewhere within each pair of reads here, so the idle power lies
    # between the energy over the longest and over the shortest interval they allow (2 % either way). A
    # thread switch between a read here and the emulator's (a CI run once: 86.5 W over one interval) only
    # widens that range.
    assert (e1 - e0) / (after1 - before0) * (1 - 0.02) <= IDLE <= (e1 - e0) / (before1 - after0) * (1 + 0.02)
    assert dev.energy_j() == pytest.approx(e1, abs=IDLE * PERIOD * 1.5)


def test_computing_at_a_lower_clock_stretches_time_and_costs_busy_power() -> None:
    dev = gpu(noise=0.005)
    dev.lock_clock(855)
    factor = A100_LIKE.time_factor(855)
    e0 = dev.true_energy_j()
    start = time.monotonic()
    with dev.computing():
        assert dev.power_w() == A100_LIKE.power(855)
        time.sleep(0.05)
    duration = time.monotonic() - start
    busy = dev.true_energy_j() - e0
    assert dev.power_w() == IDLE
    assert 0.05 * factor * 0.98 <= duration <= 0.05 * factor + 0.1
    assert busy == pytest.approx(A100_LIKE.power(855) * duration, rel=0.05)
    time.sleep(2 * PERIOD)
    counter, truth = dev.energy_j(), dev.true_energy_j()
    assert counter == pytest.approx(truth, abs=IDLE * PERIOD * 1.5 + 0.02 * truth)


def test_unlocked_gpu_runs_at_max_clock_and_a_straggler_is_slower() -> None:
    assert 0.04 <= gpu().compute_window(0.04) <= 0.04 + 0.05
    slow = gpu(1, slowdown=1.5)
    assert 0.06 * 0.98 <= slow.compute_window(0.04) <= 0.06 + 0.05
    with pytest.raises(ValueError, match="slowdown"):
        gpu(slowdown=0.5)


def test_reset_from_another_process_restores_max_speed() -> None:
    dev = gpu()
    dev.lock_clock(855)
    in_subprocess("from perseus_lightning.gpu.emulated import EmulatedGPU; EmulatedGPU(0).reset_clock()")
    assert dev.compute_window(0.04) <= 0.04 * 1.2


def test_other_instances_follow_the_computing_instances_counter(gpu_dir: Path) -> None:
    owner, watcher = gpu(publish_period=0.0), gpu()  # publish at every counter update
    owner.compute_window(0.06)
    time.sleep(PERIOD)
    published = owner.energy_j()  # a tick passed since the busy window: the counter is written
    state = json.loads((gpu_dir / "gpu-0.json").read_text())
    assert state["energy_j"] == published and state["power_w"] == IDLE
    time.sleep(PERIOD)
    assert watcher.energy_j() >= published > IDLE * 0.1  # it includes the owner's busy energy
    fresh = float(in_subprocess("from perseus_lightning.gpu.emulated import EmulatedGPU; print(EmulatedGPU(0).energy_j())"))
    assert fresh >= published


def test_corrupt_state_file_is_reported(gpu_dir: Path) -> None:
    gpu_dir.mkdir(parents=True)
    (gpu_dir / "gpu-0.json").write_text("{}")
    with pytest.raises(GPUControlError, match="Fix: delete the file"):
        gpu()


# ----------------------------------------------------------------- selection
@pytest.fixture()
def fresh_notice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(selection, "_fallback_announced", False)


def nvml_driver_present() -> bool:
    from perseus_lightning.gpu.nvml import nvml_devices

    try:
        nvml_devices()
    except GPULibraryNotFoundError:
        return False
    return True


def test_auto_falls_back_to_emulated_with_one_notice(fresh_notice: None, caplog: pytest.LogCaptureFixture) -> None:
    if nvml_driver_present():
        pytest.skip("an NVIDIA driver is present: auto selects NVML")
    with caplog.at_level(logging.INFO, logger=selection.__name__):
        devices = selection.open_devices("auto", count=2)
        one = selection.open_device("auto", 5)
    assert [type(d) for d in devices] == [EmulatedGPU, EmulatedGPU] and isinstance(one, EmulatedGPU) and one.index == 5
    notices = [r for r in caplog.records if r.name == selection.__name__]
    assert len(notices) == 1 and notices[0].levelno == logging.WARNING and "emulated" in notices[0].getMessage()
    with pytest.raises(GPULibraryNotFoundError):
        selection.open_devices("nvml")


def test_env_configures_backend_count_and_model(monkeypatch: pytest.MonkeyPatch, fresh_notice: None,
                                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(selection.ENV_BACKEND, "emulated")
    monkeypatch.setenv(selection.ENV_COUNT, "3")
    monkeypatch.setenv(selection.ENV_MODEL, "H100")
    monkeypatch.setenv(ENV_UPDATE_PERIOD, "0.05")
    with caplog.at_level(logging.INFO):
        devices = selection.open_devices()
    assert not caplog.records  # chosen explicitly: no notice
    assert [d.index for d in devices] == [0, 1, 2]
    assert all(d.name == "Emulated H100-like" and d.supported_clocks()[0] == 1980 and d.update_period == 0.05 for d in devices)
    assert len(selection.open_devices(count=1)) == 1
    with pytest.raises(GPUControlError, match=selection.ENV_COUNT):
        selection.open_device(index=3)


def test_env_model_from_a_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "measured.csv"
    H100_LIKE.profile([(0.05, 0.1), (0.04, 0.09)]).save(path)
    monkeypatch.setenv(selection.ENV_MODEL, str(path))
    monkeypatch.setenv(selection.ENV_BLOCKING_POWER, "120")
    dev = selection.open_device("emulated", 1)
    assert dev.name == "Emulated measured" and dev.supported_clocks() == H100_LIKE.frequencies[::-1]
    assert dev.power_w() == 120.0
    assert dev.model.power(1980) == pytest.approx(700.0, rel=1e-4)


@pytest.mark.parametrize(("name", "value"), [
    (selection.ENV_BACKEND, "cuda"), (selection.ENV_COUNT, "zero"), (selection.ENV_COUNT, "0"),
    (selection.ENV_MODEL, "b200"), (ENV_UPDATE_PERIOD, "fast"), (ENV_UPDATE_PERIOD, "0"),
])
def test_bad_env_values_are_reported(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(selection.ENV_BACKEND, "emulated")
    monkeypatch.setenv(name, value)
    with pytest.raises(GPUControlError, match=name):
        selection.open_devices()


def test_unknown_backend_argument() -> None:
    with pytest.raises(GPUControlError, match="nvml, emulated"):
        selection.open_devices("rocm")


def test_a_clock_locked_mid_block_applies_from_then_on(tmp_path: Path) -> None:
    gpu = EmulatedGPU(0, state_dir=tmp_path, noise=0.0)
    low = min(gpu.supported_clocks())
    with gpu.computing():  # 20 ms of work at max clock, then 60 ms of work at the low clock
        time.sleep(0.02)
        gpu.lock_clock(low)
        time.sleep(0.06)
    block = gpu.compute_log[-1]
    assert block.clock_mhz == low  # the clock it spent most of its time at
    expected = 0.02 + 0.06 * gpu.model.time_factor(low)
    assert block.end - block.start == pytest.approx(expected, rel=0.15)
    with gpu.computing():
        time.sleep(0.01)
    assert gpu.compute_log[-1].clock_mhz == low  # the lock stays


@pytest.fixture
def one_busy_cpu() -> Iterator[None]:
    """This thread and two busy processes pinned to one CPU: the thread gets about a third of it."""
    if not hasattr(os, "sched_setaffinity") or not RunQueueWait().available:
        pytest.skip("needs Linux's sched_setaffinity and /proc/thread-self/schedstat")
    cpus = os.sched_getaffinity(0)
    cpu = min(cpus)
    spin = f"import os; os.sched_setaffinity(0, {{{cpu}}}); print(flush=True)\nwhile True: pass"
    competitors = [subprocess.Popen([sys.executable, "-c", spin], stdout=subprocess.PIPE) for _ in range(2)]
    try:
        for process in competitors:
            process.stdout.readline()  # pinned and spinning
        os.sched_setaffinity(0, {cpu})
        yield
    finally:
        os.sched_setaffinity(0, cpus)
        for process in competitors:
            process.kill()
            process.wait()


def busy_for(cpu_seconds: float) -> None:
    start = time.thread_time()
    while time.thread_time() - start < cpu_seconds:
        pass


def test_work_not_contention_sets_a_blocks_duration(one_busy_cpu: None) -> None:
    dev = gpu(time_scale=4.0)  # room for the host's ~3x stretch
    dev.lock_clock(1005)
    gc.disable()  # a collection in the block's entry or exit would cost wall time that is not the block's work
    try:
        start = time.monotonic()
        with dev.computing():
            cpu = time.thread_time()
            busy_for(0.1)
            cpu = time.thread_time() - cpu
            host = time.monotonic() - start
        duration = time.monotonic() - start
    finally:
        gc.enable()
    assert host > 2 * cpu  # the CPU really was contended ...
    expected = cpu * 4.0 * A100_LIKE.time_factor(1005)
    assert duration == pytest.approx(expected, rel=0.1)  # ... yet the block lasted its work's emulated time
    assert duration < 0.75 * host * 4.0 * A100_LIKE.time_factor(1005)  # not the stretched wall time's


def test_time_scale_stretches_sleeps_too_and_must_be_at_least_one() -> None:
    assert 0.08 * 0.98 <= gpu(time_scale=2.0).compute_window(0.04) <= 0.08 + 0.05
    with pytest.raises(ValueError, match="time_scale"):
        gpu(time_scale=0.9)


def timed_block(dev: EmulatedGPU, host_seconds: float, kernel: object = None) -> float:
    start = time.monotonic()
    with dev.computing(kernel):
        time.sleep(host_seconds)
    return time.monotonic() - start


def test_a_named_kernel_runs_the_median_work_of_its_blocks_after_the_first() -> None:
    dev = gpu(kernel_samples=3)
    calibrating = [timed_block(dev, s, "stage0/forward") for s in (0.06, 0.06, 0.06, 0.02, 0.04, 0.03)]
    assert calibrating == pytest.approx([0.06, 0.06, 0.06, 0.02, 0.04, 0.03], abs=0.006)  # their own work, until 6 ran
    assert timed_block(dev, 0.005, "stage0/forward") == pytest.approx(0.03, abs=0.006)  # now blocks 4-6's median: 30 ms
    dev.lock_clock(1005)
    assert timed_block(dev, 0.005, "stage0/forward") == pytest.approx(0.03 * A100_LIKE.time_factor(1005), abs=0.006)
    assert timed_block(dev, 0.08, "stage0/forward") == pytest.approx(0.08, abs=0.006)  # never shorter than the host took
    assert timed_block(dev, 0.005, "stage1/forward") == pytest.approx(0.005 * A100_LIKE.time_factor(1005), abs=0.004)
    assert timed_block(dev, 0.005) == pytest.approx(0.005 * A100_LIKE.time_factor(1005), abs=0.004)  # unnamed: its own
    with pytest.raises(ValueError, match="kernel_samples"):
        gpu(kernel_samples=0)


def test_a_forked_child_reads_its_own_run_queue_wait() -> None:
    waits = RunQueueWait()
    if not waits.available or not hasattr(os, "fork"):
        pytest.skip("needs Linux's /proc/thread-self/schedstat and fork")

    def reads() -> str:  # the file the calling thread's reads come from: /proc/<pid>/task/<tid>/schedstat
        waits.seconds()
        return os.readlink(f"/proc/self/fd/{waits._file().fd}")

    assert reads().startswith(f"/proc/{os.getpid()}/task/")
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(writer, reads().encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(reader, 200).decode().startswith(f"/proc/{child}/task/")
