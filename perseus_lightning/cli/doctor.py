"""``perseus doctor``: what Perseus can do with the local GPUs, checked without changing any clock."""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import warnings
from typing import Any

from rich.console import Console
from rich.table import Table

from perseus_lightning.cli.gpu_args import add_backend_argument, clock_permission, open_backend
from perseus_lightning.gpu.device import GPUControlError, GPUDevice, PerseusGPUWarning
from perseus_lightning.gpu.emulated import EmulatedGPU
from perseus_lightning.gpu.safety import ClockGuard

DESCRIPTION = """\
Check the local GPUs for Perseus: the backend (NVML or emulated) and driver, each device,
whether this process may set clocks (NVML: root or CAP_SYS_ADMIN; judged without trying),
the supported SM clocks, the energy counter and how often it updates (measured by polling it
for --energy-window seconds, all devices at once), and clocks left locked (emulated GPUs keep
them in their state files; NVML cannot read back a lock set by another process).

Nothing is changed unless --measure-lock-latency is given: it locks each GPU's clock at a
middle clock and resets it, three times, and times both calls (under a ClockGuard). It leaves
every clock unlocked, including one that was locked before.
"""

LATENCY_REPEATS = 3
NVML_LOCKS_UNKNOWN = (
    "NVML has no getter for the locked-clock range that works across drivers, so a lock left by "
    "another or a killed process is invisible here. If a GPU runs slower than it should, run "
    "`perseus reset --all` (or `nvidia-smi -rgc` as root)."
)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "doctor", help="check GPUs, permissions, energy counter and locked clocks (changes nothing)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    add_backend_argument(parser)
    parser.add_argument("--energy-window", type=float, default=1.0, metavar="S", help="seconds to poll each energy counter (default: %(default)s)")
    parser.add_argument("--measure-lock-latency", action="store_true", help="lock and reset each GPU's clock and time it (changes clocks)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    report = diagnose(args.backend, args.energy_window, args.measure_lock_latency)
    if args.json:
        print(json.dumps(report))
    else:
        _print_report(report)
    return 0


def diagnose(backend: str, energy_window: float = 1.0, measure_lock_latency: bool = False) -> dict[str, Any]:
    """The doctor's report as a JSON-able dict (see ``perseus doctor --help``)."""
    backend, devices, why = open_backend(backend)
    if backend == "nvml":
        allowed, permission_reason = clock_permission()
        driver: dict[str, Any] = {"name": "nvml", "version": _nvml_driver_version()}
    else:
        allowed, permission_reason = True, "emulated GPUs accept clock changes from any process"
        driver = {"name": "emulated"}
        if isinstance(devices[0], EmulatedGPU):  # open_devices opens at least one
            driver.update(model=devices[0].model.name, state_dir=str(devices[0].state_path.parent))
    rows = [_device_report(d, backend) for d in devices]
    for row, energy in zip(rows, _measure_energy_counters(devices, energy_window)):
        row["energy_counter"] = energy
    found = [r["index"] for r in rows if r.get("locked_clock_mhz") is not None]
    if measure_lock_latency:
        for row, latency in zip(rows, _measure_lock_latency(devices)):
            row["lock_latency"] = latency
    known = backend != "nvml"
    locked = [{"index": d.index, "mhz": mhz} for d in devices if known and (mhz := d.locked_clock()) is not None]
    report = {
        "backend": backend,
        "backend_reason": why,
        "driver": driver,
        "clock_permission": {"allowed": allowed, "reason": permission_reason},
        "devices": rows,
        "locked_clocks": {
            "known": known,
            "locked": locked,
            "unlocked_by_lock_latency": [i for i in found if i not in {lock["index"] for lock in locked}] if measure_lock_latency else [],
            "note": None if known else NVML_LOCKS_UNKNOWN,
        },
    }
    report["problems"] = _problems(report)
    return report


def _nvml_driver_version() -> str | None:
    import pynvml

    try:
        pynvml.nvmlInit()
        try:
            version = pynvml.nvmlSystemGetDriverVersion()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def _device_report(device: GPUDevice, backend: str) -> dict[str, Any]:
    row: dict[str, Any] = {"index": device.index, "name": device.name, "uuid": device.uuid}
    try:
        clocks = device.supported_clocks()
    except GPUControlError as exc:
        row["supported_clocks"] = {"count": 0, "error": str(exc)}
    else:
        steps = {a - b for a, b in zip(clocks, clocks[1:])}
        row["supported_clocks"] = {
            "count": len(clocks), "min_mhz": min(clocks), "max_mhz": max(clocks),
            "step_mhz": steps.pop() if len(steps) == 1 else None,
        }
    if backend != "nvml":  # NVML cannot read back another process's lock
        row["locked_clock_mhz"] = device.locked_clock()
    return row


def _measure_energy_counters(devices: list[GPUDevice], window: float) -> list[dict[str, Any]]:
    """Poll every device's energy counter for ``window`` seconds at once; see :func:`_poll_energy`."""
    results: list[dict[str, Any]] = [{} for _ in devices]

    def poll(i: int) -> None:
        results[i] = _poll_energy(devices[i], window)

    threads = [threading.Thread(target=poll, args=(i,), daemon=True) for i in range(len(devices))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _poll_energy(device: GPUDevice, window: float) -> dict[str, Any]:
    """Whether the counter works, how often it changed value, and what one read costs."""
    try:
        last = device.energy_j()
    except GPUControlError as exc:
        return {"available": False, "error": str(exc)}
    changes: list[float] = []
    reads: list[float] = []
    start = time.perf_counter()
    while (before := time.perf_counter()) - start < window:
        value = device.energy_j()
        after = time.perf_counter()
        reads.append(after - before)
        if value != last:
            changes.append((before + after) / 2)
            last = value
        time.sleep(0.001)
    periods = [b - a for a, b in zip(changes, changes[1:])]
    return {
        "available": True,
        "window_s": window,
        "updates_seen": len(changes),
        "update_period_s": round(statistics.median(periods), 4) if periods else None,
        "update_period_range_s": [round(min(periods), 4), round(max(periods), 4)] if periods else None,
        "read_cost_ms": round(1000 * statistics.mean(reads), 4) if reads else None,
        "power_w": device.power_w(),
    }


def _measure_lock_latency(devices: list[GPUDevice]) -> list[dict[str, Any]]:
    """Lock each device at a middle clock and reset it, :data:`LATENCY_REPEATS` times, timing both calls."""
    results: list[dict[str, Any]] = []
    with ClockGuard(devices), warnings.catch_warnings():
        warnings.simplefilter("ignore", PerseusGPUWarning)  # a refusal is reported per device
        for device in devices:
            try:
                clocks = device.supported_clocks()
                mhz = clocks[len(clocks) // 2]
                lock_ms, reset_ms = [], []
                for _ in range(LATENCY_REPEATS):
                    t0 = time.perf_counter()
                    device.lock_clock(mhz)
                    t1 = time.perf_counter()
                    device.reset_clock()
                    reset_ms.append(round(1000 * (time.perf_counter() - t1), 3))
                    lock_ms.append(round(1000 * (t1 - t0), 3))
            except (GPUControlError, ValueError) as exc:
                results.append({"error": str(exc)})
                continue
            if device.observe_only:
                results.append({"error": "clock changes refused (no permission, or not supported): nothing was changed"})
            else:
                results.append({"clock_mhz": mhz, "lock_ms": lock_ms, "reset_ms": reset_ms})
    return results


def _problems(report: dict[str, Any]) -> list[str]:
    """One line per thing that stops Perseus from saving energy, each with its fix."""
    problems = []
    if not report["devices"]:
        problems.append("no GPUs. Fix: check CUDA_VISIBLE_DEVICES, or use the emulated backend.")
    if not report["clock_permission"]["allowed"]:
        problems.append(
            f"cannot set clocks: {report['clock_permission']['reason']}; Perseus would run observe-only. "
            "Fix: run as root or with CAP_SYS_ADMIN (e.g. `docker run --cap-add SYS_ADMIN`)."
        )
    for lock in report["locked_clocks"]["locked"]:
        problems.append(f"GPU {lock['index']} is locked at {lock['mhz']} MHz. Fix: `perseus reset --device {lock['index']}`.")
    for row in report["devices"]:
        counter = row["energy_counter"]
        if not counter["available"]:
            problems.append(f"GPU {row['index']} has no energy counter ({counter['error']}).")
        elif counter["update_period_s"] is None:
            problems.append(f"GPU {row['index']}: the energy counter changed {counter['updates_seen']} time(s) in {counter['window_s']} s; "
                            "its update period is unknown. Fix: a longer --energy-window.")
        if "error" in row.get("lock_latency", {}):
            problems.append(f"GPU {row['index']}: locking its clock failed: {row['lock_latency']['error']}")
    return problems


def _print_report(report: dict[str, Any]) -> None:
    console = Console()
    driver = report["driver"]
    version = f"driver {driver['version'] or 'unknown'}" if driver["name"] == "nvml" else f"model {driver.get('model')}, state in {driver.get('state_dir')}"
    console.print(f"backend: {report['backend']} ({report['backend_reason']}); {version}")
    permission = report["clock_permission"]
    console.print(f"may set clocks: {'yes' if permission['allowed'] else 'no'} ({permission['reason']})")
    table = Table()
    for column in ("GPU", "name", "uuid", "SM clocks (MHz)", "energy counter", "locked"):
        table.add_column(column, overflow="fold")
    for row in report["devices"]:
        clocks = row["supported_clocks"]
        counter = row["energy_counter"]
        period = counter.get("update_period_s")
        table.add_row(
            str(row["index"]), row["name"], row["uuid"],
            f"{clocks['count']}: {clocks['min_mhz']}-{clocks['max_mhz']}" if clocks["count"] else clocks["error"],
            ("no" if not counter["available"] else f"every {1000 * period:.0f} ms" if period else "no update seen"),
            "?" if not report["locked_clocks"]["known"] else str(row["locked_clock_mhz"] or "no"),
        )
    console.print(table)
    for row in report["devices"]:
        latency = row.get("lock_latency")
        if latency and "lock_ms" in latency:
            console.print(f"GPU {row['index']}: lock at {latency['clock_mhz']} MHz took "
                          f"{', '.join(f'{t:.1f}' for t in latency['lock_ms'])} ms; reset "
                          f"{', '.join(f'{t:.1f}' for t in latency['reset_ms'])} ms")
    for index in report["locked_clocks"]["unlocked_by_lock_latency"]:
        console.print(f"GPU {index} was locked; --measure-lock-latency left it unlocked")
    if report["locked_clocks"]["note"]:
        console.print(f"locked clocks: {report['locked_clocks']['note']}")
    for problem in report["problems"]:
        console.print(f"[bold red]problem:[/] {problem}")
    if not report["problems"]:
        console.print("no problems found")
