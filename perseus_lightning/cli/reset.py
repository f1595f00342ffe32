"""``perseus reset``: unlock GPU clocks, e.g. those a killed run left locked."""

from __future__ import annotations

import argparse
import warnings

from perseus_lightning.cli.gpu_args import add_backend_argument, clock_permission, open_backend
from perseus_lightning.gpu.device import GPUControlError, GPUPermissionError, PerseusGPUWarning

DESCRIPTION = """\
Remove the SM clock lock of local GPUs, returning them to the driver's clock management.
A locked clock outlives the process that set it: Perseus resets its clocks on every exit,
and a watchdog process does so after a SIGKILL, but a power loss, or a watchdog killed
with its trainer, can still leave a GPU slow. Resetting an unlocked GPU does nothing.
Real GPUs need root or CAP_SYS_ADMIN (as for `nvidia-smi -rgc`).
"""


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "reset", help="unlock GPU clocks (e.g. left locked by a killed run)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--device", type=int, metavar="N", help="reset only GPU N (CUDA index)")
    which.add_argument("--all", action="store_true", help="reset every GPU (the default)")
    add_backend_argument(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    backend, devices, _ = open_backend(args.backend)
    if args.device is not None:
        if not 0 <= args.device < len(devices):
            raise GPUControlError(f"no GPU {args.device}: {len(devices)} {backend} GPU(s). Fix: use --device 0-{len(devices) - 1}.")
        devices = [devices[args.device]]
    refused: list[str] = []
    for device in devices:
        label = f"GPU {device.index} ({device.name}, {device.uuid})"
        before = device.locked_clock()
        with warnings.catch_warnings():  # a refusal is reported below, as one line
            warnings.simplefilter("ignore", PerseusGPUWarning)
            device.reset_clock()
        if device.observe_only:
            refused.append(str(device.index))
        elif backend == "nvml":
            print(f"{label}: locked clocks reset (NVML cannot tell whether they were locked)")
        else:
            print(f"{label}: {f'unlocked (was locked at {before} MHz)' if before is not None else 'not locked'}")
    if refused:
        allowed, why = clock_permission()
        reason = f"no permission ({why})" if not allowed else "the GPU or driver does not support locked clocks"
        raise GPUPermissionError(
            f"NVML refused to reset GPU(s) {', '.join(refused)}: {reason}. "
            "Fix: run `sudo perseus reset --all`, or `sudo nvidia-smi -rgc`."
        )
    print(f"reset {len(devices)} {backend} GPU(s)")
    return 0
