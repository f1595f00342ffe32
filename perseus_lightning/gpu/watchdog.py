"""A process that resets GPU clocks when the training process dies, even by SIGKILL.

:class:`~perseus_lightning.gpu.safety.ClockGuard` starts it as
``python -m perseus_lightning.gpu.watchdog --parent-pid PID DESCRIPTION`` in a session of its own
(so a Ctrl-C to the trainer's process group does not reach it), with a pipe from the trainer as its
stdin. ``DESCRIPTION`` is a JSON list of the devices to watch (see :func:`describe_device`). The
watchdog re-opens them, prints ``ready`` on stdout, and waits:

- the line ``disarm`` on stdin: the trainer reset the clocks itself; exit without touching them;
- end of file on stdin (every copy of the pipe's write end is closed: the trainer died), or the
  trainer's pid is no longer its parent (it died while a forked child kept the pipe open):
  reset every watched device's clock and exit.

It ignores SIGINT, SIGTERM and SIGHUP, so that a signal sent to every process of a job does not
stop it before the trainer: it ends when its trainer does. Until then it imports only the device
backends it watches (no torch, no lightning) and sleeps in ``select``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import select
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from perseus_lightning.gpu.device import GPUDevice

DISARM = b"disarm\n"
"""What the trainer writes on the pipe after resetting the clocks itself."""
READY = "ready"
"""The line the watchdog prints on stdout once it has opened its devices."""
PARENT_CHECK_PERIOD = 1.0
"""Seconds between checks that the trainer is still the watchdog's parent."""


def describe_device(device: GPUDevice) -> dict[str, Any] | None:
    """A JSON-able description from which :func:`reopen_device` opens the same GPU in another process.

    ``None`` for a device the watchdog cannot re-open (neither NVML nor emulated).
    """
    # Only a loaded backend can have made ``device``; looking it up avoids importing the others.
    nvml = sys.modules.get("perseus_lightning.gpu.nvml")
    if nvml is not None and isinstance(device, nvml.NVMLDevice):
        return {"backend": "nvml", "index": device.index, "nvml_index": device.nvml_index, "uuid": device.uuid}
    emulated = sys.modules.get("perseus_lightning.gpu.emulated")
    if emulated is not None and isinstance(device, emulated.EmulatedGPU):
        return {
            "backend": "emulated", "index": device.index, "uuid": device.uuid,
            "state_dir": str(device.state_path.parent), "model": dataclasses.asdict(device.model),
        }
    return None


def reopen_device(description: dict[str, Any]) -> GPUDevice:
    """Open the GPU that :func:`describe_device` described."""
    if description["backend"] == "nvml":
        from perseus_lightning.gpu.nvml import NVMLDevice

        device: GPUDevice = NVMLDevice(description["index"], description["nvml_index"])
    elif description["backend"] == "emulated":
        from perseus_lightning.core.gpu_model import GPUModel
        from perseus_lightning.gpu.emulated import EmulatedGPU

        fields = dict(description["model"], frequencies=tuple(description["model"]["frequencies"]))
        device = EmulatedGPU(description["index"], GPUModel(**fields), state_dir=description["state_dir"])
    else:
        raise ValueError(f"unknown GPU backend {description['backend']!r}")
    if device.uuid != description["uuid"]:
        raise ValueError(f"GPU {description['index']} is {device.uuid}, not {description['uuid']}")
    return device


def wait_for_parent(parent_pid: int, stdin_fd: int = 0) -> bool:
    """Block until the trainer disarms (``False``) or dies (``True``)."""
    received = b""
    while os.getppid() == parent_pid:
        readable, _, _ = select.select([stdin_fd], [], [], PARENT_CHECK_PERIOD)
        if not readable:
            continue
        chunk = os.read(stdin_fd, 4096)
        if not chunk:
            return True
        received += chunk
        if DISARM in received:
            return False
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the watchdog; exit code 0 unless it could not open or reset a device."""
    parser = argparse.ArgumentParser(prog="python -m perseus_lightning.gpu.watchdog", description=__doc__.splitlines()[0])
    parser.add_argument("--parent-pid", type=int, required=True, help="the training process")
    parser.add_argument("description", help="JSON list of devices, as describe_device() writes them")
    args = parser.parse_args(argv)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    prog = "perseus watchdog"
    try:
        devices = [reopen_device(d) for d in json.loads(args.description)]
    except Exception as exc:  # noqa: BLE001 - any failure means no protection: say so and stop
        print(f"{prog}: cannot open the GPUs to watch: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(READY, flush=True)
    sys.stdout.close()
    if not wait_for_parent(args.parent_pid):
        return 0
    reset = []
    for device in devices:
        try:
            device.reset_clock()
        except Exception as exc:  # noqa: BLE001 - reset the other devices regardless
            print(
                f"{prog}: could not reset the clock of GPU {device.index} ({device.uuid}): {exc}. "
                "Fix: `perseus reset --all`, or `nvidia-smi -rgc` as root.",
                file=sys.stderr,
            )
        else:
            reset.append(str(device.index))
    if reset:
        print(
            f"{prog}: process {args.parent_pid} ended without resetting its GPU clocks; reset GPU(s) {', '.join(reset)}",
            file=sys.stderr,
        )
    return 0 if len(reset) == len(devices) else 1

if __name__ == "__main__":
    sys.exit(main())
